"""`--mode=eval` end to end on a tiny trained workdir, and the periodic estimates in training."""

import json

import cli_runs
import numpy as np
import pytest

# Small everything: 24 test digits (a padded second batch of 16), 32 samples for MNIST-FID.
EVAL_FLAGS = ("--config.eval.batch_size=16", "--config.eval.bpd_num_examples=24",
              "--config.eval.bpd_t_chunk=40", "--config.eval.feature_net=mnist_classifier",
              "--config.eval.fid_num_samples=32", "--config.eval.kid_subset_size=16",
              "--config.eval.kid_num_subsets=5", "--config.eval.is_splits=2")


def _run(workdir, *flags, mode="train", check=True):
    return cli_runs.run(workdir, *flags, mode=mode, timeout=300, check=check)


def _event_bytes(workdir) -> bytes:
    return b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("events.out.*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the tiny config (T = 100) with the periodic estimates on at steps 2 and 4, and
    a sample grid at step 4 (by the config's sampler, here DDIM)."""
    workdir = tmp_path_factory.mktemp("eval")
    proc = _run(workdir, "--config.train.num_steps=4", "--config.eval.bpd_every=2",
                "--config.train.sample_every=4", "--config.sample.sampler=ddim",
                "--config.eval.bpd_estimate_batches=1", "--config.eval.bpd_estimate_timesteps=8",
                "--config.eval.batch_size=16", "--config.eval.fid_every=4",
                "--config.eval.fid_every_num_samples=16", "--config.eval.kid_subset_size=8",
                "--config.eval.feature_net=mnist_classifier")
    return workdir, proc


def test_training_writes_the_periodic_estimates(trained):
    workdir, proc = trained
    events = _event_bytes(workdir)
    for tag in (b"eval/bpd_estimate", b"eval/MNIST-FID_16samples", b"eval/MNIST-KID_16samples",
                b"samples/ema"):
        assert tag in events
    assert "bound estimate" in proc.stderr and "MNIST-FID from 16 samples" in proc.stderr
    assert "Sample grids of 16 images: ddim, 5 steps" in proc.stderr


def test_eval_mode_writes_the_bound_and_mnist_fid(trained):
    workdir, _ = trained
    proc = _run(workdir, *EVAL_FLAGS, mode="eval")
    assert "steps/s" in proc.stderr and "ETA" in proc.stderr  # the bound's progress line
    results = json.loads((workdir / "eval" / "eval_step4.json").read_text())
    bpd = results["bpd"]
    assert results["step"] == 4 and results["params"] == "ema" and bpd["num_examples"] == 24
    assert np.isfinite(bpd["total"]) and bpd["total"] > 0 and not bpd["estimate"]
    assert len(bpd["per_timestep"]) == 100 and len(bpd["ranges"]) == 10
    assert bpd["total"] == pytest.approx(bpd["prior"] + bpd["decoder"] + bpd["kl_sum"])
    assert sum(bpd["per_timestep"]) == pytest.approx(bpd["decoder"] + bpd["kl_sum"])
    quality = results["sample_quality"]
    assert quality["feature_net"] == "mnist_classifier" and "not comparable" in quality["note"]
    assert quality["num_samples"] == 32 and quality["MNIST-FID"] > 0
    assert {"MNIST-KID", "MNIST-IS", "MNIST-IS_std"} <= set(quality)
    events = _event_bytes(workdir)
    for tag in (b"eval/bpd", b"eval/bpd_prior_LT", b"eval/bpd_decoder_L0", b"eval/MNIST-FID",
                b"eval/bpd_range/t0000-0009"):
        assert tag in events
    cached = list((workdir / "eval").glob("fid_reference_mnist_5k_train_4500_*.npz"))
    assert len(cached) == 1  # computed once (during training here) and reused


def test_eval_without_inception_weights_says_which_file_and_how(trained, tmp_path):
    workdir, _ = trained
    proc = _run(workdir, "--config.eval.feature_net=inception_v3",
                f"--config.eval.inception_weights={tmp_path / 'missing.npz'}", mode="eval",
                check=False)
    assert proc.returncode == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr
    assert "python -m evaluation.convert_inception" in proc.stderr


@pytest.mark.parametrize("field, value, needle", [
    ("batch_size", 12, "eval.batch_size=12"),
    ("feature_net", "mnist_classifier", "28x28x1"),
    ("feature_net", "clip", "eval.feature_net='clip'"),
    ("bpd_condition", "null", "null label"),
    ("bpd_every", -1, "eval.bpd_every=-1"),
])
def test_config_validation_names_the_field_and_the_fix(field, value, needle):
    import config_lib
    from configs import cifar

    config = cifar.get_config()
    config.eval[field] = value
    with pytest.raises(config_lib.ConfigError, match=needle.replace("(", r"\(")):
        config_lib.validate(config, num_devices=8, evaluating=True)
