"""The trainer end to end: CLI, mock tfds, 8 devices == 1, two processes == one, exact resume.

Runs that must differ in device or process count, or be killed, are separate `main.py`
processes; the tiny config keeps each to seconds.
"""

import os
import signal
import socket
import subprocess

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from cli_runs import REPO
from cli_runs import cli as _cli
from cli_runs import env as _env
from cli_runs import run as _run
from cli_runs import wait_for_checkpoint as _wait_for_checkpoint

import generate
import train_lib
from configs import tiny

# 8 devices vs 1 reorders the reductions of the batch mean and of the cross-device gradient sum:
# float32 round-off of a few ulps per step, amplified by Adam's normalisation over 12 steps.
# Measured: 1.2e-7 for both 8-vs-1 devices and 2-vs-1 processes. 1e-4 absolute (parameters are
# O(0.1)) leaves margin, while a real divergence (another batch, key or data shard) moves
# parameters by ~1e-3 per step.
DEVICE_TOLERANCE = 1e-4


def _config(**train_overrides):
    config = tiny.get_config()
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def _params(workdir, config, use_ema=False):
    _, params, step = train_lib.restore_params(config, str(workdir), use_ema=use_ema)
    return step, jax.tree.map(np.asarray, jax.device_get(params))


def _max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 8-device run of the tiny config (12 steps): other runs compare to it."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run(workdir, "--config.train.num_steps=12")
    return workdir, proc


@pytest.mark.slow
def test_cli_trains_and_samples_mnist_5k(reference_run, tmp_path):
    workdir, proc = reference_run
    assert "steps/s" in proc.stderr and "ETA" in proc.stderr  # the progress line
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    sample = _run(workdir, mode="sample")
    pngs = list(workdir.glob("samples_*.png"))
    assert len(pngs) == 1, sample.stderr[-2000:]
    data = np.load(next(workdir.glob("samples_*.npz")))
    assert data["images"].shape == (16, 28, 28, 1) and data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["labels"], np.arange(16) * 10 // 16)


def test_train_and_sample_on_mock_cifar10(tmp_path):
    config = _config(num_steps=2, log_every=1, checkpoint_every=2)
    config.data.name = "cifar10"
    config.data.image_size, config.data.num_channels = 32, 3
    config.data.random_flip = True
    config.model.num_classes = 0
    config.diffusion.p_uncond = 0.0
    config.sample.guidance_scale = 0.0
    config.eval.feature_net = "inception_v3"  # the MNIST classifier only fits 28x28x1
    with tfds.testing.mock_data(num_examples=32):
        state = train_lib.train(config, str(tmp_path))
    assert int(state.step) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    paths = generate.generate(config, str(tmp_path))
    assert os.path.exists(paths["png"])
    assert np.load(paths["npz"])["images"].shape == (16, 32, 32, 3)


@pytest.mark.slow
def test_8_devices_equal_1_device(reference_run, tmp_path):
    config = _config(num_steps=12)
    _, params_8 = _params(reference_run[0], config)
    _run(tmp_path, "--config.train.num_steps=12", num_devices=1)
    _, params_1 = _params(tmp_path, config)
    assert _max_abs_diff(params_8, params_1) < DEVICE_TOLERANCE


@pytest.mark.slow
def test_two_processes_equal_one_process(reference_run, tmp_path):
    """Only the last step is compared, so only it is saved (a save across processes is slow)."""
    config = _config(num_steps=12)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        _cli(tmp_path, "--config.train.num_steps=12", "--config.train.checkpoint_every=12",
             "--multihost",
             f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"),
        env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "process 1/2" in outputs[1] or "process 1/2" in outputs[0]
    _, params_2p = _params(tmp_path, config)
    _, params_1p = _params(reference_run[0], config)
    assert _max_abs_diff(params_2p, params_1p) < DEVICE_TOLERANCE


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(reference_run, tmp_path):
    config = _config(num_steps=12)
    proc = subprocess.Popen(_cli(tmp_path, "--config.train.num_steps=12"), env=_env(8), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_after = _wait_for_checkpoint(tmp_path, proc, min_step=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_after < 12
    resumed = _run(tmp_path, "--config.train.num_steps=12")
    assert "Resumed from step" in resumed.stderr
    step, params = _params(tmp_path, config)
    _, ref = _params(reference_run[0], config)
    assert step == 12
    _assert_trees_equal(params, ref)
    _, ema = _params(tmp_path, config, use_ema=True)
    _, ref_ema = _params(reference_run[0], config, use_ema=True)
    _assert_trees_equal(ema, ref_ema)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(_cli(tmp_path, "--config.train.num_steps=400"), env=_env(8),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_checkpoint(tmp_path, proc, min_step=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Preempted: saved step" in err
    saved = int(err.split("Preempted: saved step ")[1].split(";")[0])
    assert saved < 400
    step, _ = _params(tmp_path, _config(num_steps=400))
    assert step == saved
