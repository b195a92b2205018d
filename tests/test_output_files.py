"""Who writes a run's files and what a user sees: only process 0 of a multi-host run writes
samples, figures and JSON results (every process computes them); a JSON result is replaced
whole or not at all; --mode=sample on a CPU prints no library noise (libtpu's INFO line, orbax's
read-only warnings)."""

import errno
import json
import os

import jax
import numpy as np
import pytest
from checkpoint_fixtures import tiny_config, write_checkpoints
from cli_runs import env, run

import figures
import generate
import metric_logging
import sampling_lib


def test_only_process_0_writes_files(monkeypatch):
    assert metric_logging.writes_files()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not metric_logging.writes_files()


def test_the_writers_write_on_process_0_only(tmp_path, monkeypatch):
    images = np.zeros((4, 8, 8, 1), np.float32)
    fig, _ = figures._figure((100, 80))

    def write(directory):
        return (metric_logging.write_json(str(directory / "r.json"), {"a": 1}),
                sampling_lib.write_samples(str(directory), images, None, 2, name="s"),
                figures._save(fig, str(directory / "f.png")))

    first, paths, figure = write(tmp_path / "zero")
    assert json.loads(open(first).read()) == {"a": 1}
    assert np.load(paths["npz"])["images"].shape == (4, 8, 8, 1)
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in (paths["png"], figure))
    monkeypatch.setattr(metric_logging, "writes_files", lambda: False)
    write(tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_json_result_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A value JSON cannot hold, or a full disk while writing, leaves the previous file as it
    was and no temporary file beside it."""
    path = str(tmp_path / "text_eval.json")
    metric_logging.write_json(path, {"scales": {"2": 0.99}})
    with pytest.raises(TypeError):
        metric_logging.write_json(path, {"scales": {"2": 0.5, "3": np.float32(0.9)}})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        metric_logging.write_json(path, {"scales": {"2": 0.5}})
    assert json.loads(open(path).read()) == {"scales": {"2": 0.99}}
    assert os.listdir(tmp_path) == ["text_eval.json"]


def test_sample_mode_on_another_process_samples_but_writes_nothing(tmp_path, monkeypatch):
    config = tiny_config()
    write_checkpoints(tmp_path, config, [2])
    monkeypatch.setattr(metric_logging, "writes_files", lambda: False)
    paths = generate.generate(config, str(tmp_path))
    assert paths["png"].endswith("samples_step2_ancestral5_w0.png")
    assert not list(tmp_path.glob("samples_*"))


def test_sampling_on_a_cpu_prints_no_library_noise(tmp_path):
    """As a user runs it: no JAX_PLATFORMS, so jax also looks for a TPU."""
    write_checkpoints(tmp_path, tiny_config(), [2])
    environment = env(1)
    environment.pop("JAX_PLATFORMS")
    err = run(tmp_path, mode="sample", environment=environment).stderr
    assert "Wrote" in err and list(tmp_path.glob("samples_*.png"))
    for noise in ("Unable to initialize backend", "read_only=True", "is read only"):
        assert noise not in err, err[-3000:]
