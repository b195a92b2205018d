"""The figures: exact pixel sizes, numbers drawn from the data, the reverse chain equal to the
sampler's run, TensorBoard events read back; the checkpoint figures on a 2-step tiny run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import figures
import train_lib
from configs import tiny
from diffusion import samplers, schedules


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(config, workdir) of the tiny class-conditional mnist_5k config trained for 2 steps."""
    workdir = tmp_path_factory.mktemp("figures_run")
    config = tiny.get_config()
    config.train.num_steps = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    train_lib.train(config, str(workdir))
    return config, workdir


def test_forward_and_schedules_figures_have_the_requested_size(tmp_path):
    image = np.linspace(-1, 1, 8 * 8).reshape(8, 8, 1)
    path = figures.forward_process_figure(str(tmp_path / "forward.png"), image,
                                          num_timesteps=50, num_steps=4, size_px=(640, 240))
    assert _size(path) == (640, 240)
    Image.fromarray(np.full((40, 30), 200, np.uint8)).save(tmp_path / "digit.png")
    np.testing.assert_allclose(figures.load_image(str(tmp_path / "digit.png")),
                               np.full((28, 28, 1), 200 / 127.5 - 1), rtol=1e-6)
    path = figures.forward_process_figure(str(tmp_path / "forward_file.png"),
                                          str(tmp_path / "digit.png"), num_timesteps=50,
                                          num_steps=3, size_px=(300, 240))
    assert _size(path) == (300, 240)
    path = figures.schedules_figure(str(tmp_path / "schedules.png"), num_timesteps=50,
                                    size_px=(900, 300))
    assert _size(path) == (900, 300)


def test_isotropy_numbers_come_from_the_data(tmp_path):
    T = 1000
    sqrt_ab = float(np.sqrt(np.cumprod(1.0 - schedules.get_betas("linear", T))[-1]))  # ≈ 0.0064
    images = np.zeros((4000, 4, 4, 1), np.float32)
    results = {}
    for shift in (0.0, 500.0):  # x_T = √ᾱ x_0 + √(1-ᾱ) ε: a huge x_0 moves x_T's mean
        path, stats, text = figures.isotropy_figure(
            str(tmp_path / f"iso{shift:g}.png"), images + shift, num_timesteps=T,
            size_px=(400, 400))
        assert _size(path) == (400, 400)
        for key in ("mean_a", "mean_b"):
            assert abs(stats[key] - sqrt_ab * shift) < 0.1, (shift, stats)
            assert f"{stats[key]:.3f}" in text
        for key in ("var_a", "var_b"):
            assert abs(stats[key] - 1.0) < 0.1, stats  # 1 - ᾱ_{T-1} ≈ 1
            assert f"{stats[key]:.3f}" in text
        assert abs(stats["corr"]) < 0.1 and f"corr = {stats['corr']:.3f}" in text
        results[shift] = stats
    assert results[500.0]["mean_a"] > results[0.0]["mean_a"] + 2.0


def test_isotropy_stats_closed_form():
    points = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    stats = figures.isotropy_stats(points)
    assert stats["mean_a"] == pytest.approx(3.0) and stats["mean_b"] == pytest.approx(6.0)
    assert stats["var_a"] == pytest.approx(8 / 3) and stats["var_b"] == pytest.approx(32 / 3)
    assert stats["corr"] == pytest.approx(1.0) and stats["n"] == 3


def test_reverse_chain_is_the_samplers_run():
    """Snapshots are read from the same run: DDIM's last x̂_0 is its x_0 (samplers.sample)."""
    schedule = schedules.schedule_from_name("linear", 40)
    model_fn = lambda x, t: 0.5 * x + 0.01 * t[:, None, None, None]
    shape, key = (2, 4, 4, 1), jax.random.key(3)
    ts, xs, x0s = figures.reverse_chain(model_fn, schedule, shape, key, sampler="ddim",
                                        num_steps=10, num_snapshots=4)
    assert ts.tolist() == [39, 26, 13, 0] and xs.shape == x0s.shape == (4, *shape)
    x_T = jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)
    np.testing.assert_array_equal(xs[0], x_T)
    final = samplers.sample(model_fn, schedule, shape, key, sampler="ddim", num_steps=10)
    np.testing.assert_allclose(x0s[-1], final, atol=1e-5)


def test_reverse_chain_and_guidance_figures(tiny_run, tmp_path):
    config, workdir = tiny_run
    path = figures.reverse_chain_figure(str(tmp_path / "chain.png"), config, str(workdir),
                                        ancestral_steps=10, ddim_steps=5, num_snapshots=4,
                                        size_px=(500, 400))
    assert _size(path) == (500, 400)
    (workdir / "guidance_sweep.json").write_text(
        json.dumps({"per_class": 100, "accuracy": {"3": 0.875}}))
    path, accuracy = figures.guidance_figure(str(tmp_path / "guidance.png"), config,
                                             str(workdir), scales=(0.0, 3.0), num_steps=5,
                                             size_px=(700, 300))
    assert _size(path) == (700, 300)
    assert set(accuracy["shown"]) == {0.0, 3.0}
    assert all(0.0 <= a <= 1.0 for a in accuracy["shown"].values())
    assert accuracy["sweep"] == {3.0: 0.875}  # read from the json, for the scales it has


def test_make_figures_writes_all_six_restoring_the_checkpoint_once(tiny_run, monkeypatch):
    config, workdir = tiny_run
    calls = []
    restore = train_lib.restore_params

    def counting_restore(*args, **kwargs):
        calls.append(args)
        return restore(*args, **kwargs)

    monkeypatch.setattr(train_lib, "restore_params", counting_restore)
    paths = figures.make_figures(config, str(workdir))
    assert sorted(paths) == ["forward_process", "guidance", "isotropy", "reverse_chain",
                             "schedules", "training_curves"]
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    assert len(calls) == 1  # one restore serves the reverse-chain and the guidance figures


def test_training_curves_from_the_runs_events(tiny_run, tmp_path):
    _, workdir = tiny_run
    steps, loss = figures.read_scalars(str(workdir / "tensorboard"))["train/loss"]
    assert steps.tolist() == [1, 2] and np.all(np.isfinite(loss))
    path, plotted = figures.training_curves_figure(str(tmp_path / "curves.png"), str(workdir),
                                                   size_px=(600, 300))
    assert _size(path) == (600, 300) and plotted == ["train/loss"]


def test_read_scalars_round_trips_tensorboardx(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(tmp_path / "tensorboard"))
    for step in (10, 20, 30):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.add_scalar("eval/bpd_estimate", 1.5, 30)
    writer.add_scalar("eval/bpd_estimate_stderr", 0.1, 30)
    writer.close()
    scalars = figures.read_scalars(str(tmp_path / "tensorboard"))
    assert scalars["train/loss"][0].tolist() == [10, 20, 30]
    np.testing.assert_allclose(scalars["train/loss"][1], [0.1, 0.05, 1 / 30], rtol=1e-6)
    path, plotted = figures.training_curves_figure(str(tmp_path / "curves.png"), str(tmp_path))
    assert plotted == ["train/loss", "eval/bpd_estimate"] and _size(path) == (1000, 400)


def test_read_scalars_without_events_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        figures.read_scalars(str(tmp_path))
