"""Evaluation: the variational bound in bits/dim (`likelihood`), FID/KID/IS (`fid`,
`sample_quality`) over pluggable feature networks (`inception`, `mnist_classifier`), and the
config-driven pieces used by --mode=eval and the trainer (`evaluator`)."""
