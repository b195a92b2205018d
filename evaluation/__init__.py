"""Evaluation: the variational bound in bits/dim (`likelihood`), FID/KID/IS (`fid`,
`sample_quality`) over pluggable feature networks (`inception`, `mnist_classifier`), and the
config-driven pieces used by --mode=eval and the trainer (`evaluator`)."""

# The feature networks of `sample_quality.make_feature_net` (legal eval.feature_net values), here so
# that config_lib reads them without importing the networks.
FEATURE_NETS = ("inception_v3", "mnist_classifier")
