"""The one training loop on a toy task (a linear model with dropout on 32 tiny images): the
invariants every trained network inherits, each against a float64 or an uninterrupted run."""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import input_pipeline
import interrupts
import training_loop
from run_args import LoopArgs

N, PIXELS = 32, 4


def _source() -> input_pipeline.ArraySource:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 2, 2, 1)).astype(np.uint8)
    return input_pipeline.ArraySource(images, rng.integers(0, 3, N).astype(np.int32))


def _task(nan_from_step: int | None = None, **fields) -> training_loop.Task:
    def loss(params, batch, key):  # least squares of the label on the pixels, with dropout
        x = batch["image"].reshape(-1, PIXELS)                               # [B, 4]
        keep = jax.random.bernoulli(key, 0.75, x.shape)
        residual = (x * keep) @ params["w"] + params["b"] - batch["label"]   # [B]
        value = jnp.mean(residual**2)
        if nan_from_step is not None:  # NaN once the data position passes it
            value = jnp.where(batch["step"][0] >= nan_from_step, jnp.nan, value)
        return value, {"residual": jnp.mean(jnp.abs(residual))}

    def with_step(batch, *, step, indices, rows):
        return {**batch, "step": np.full(len(batch["label"]), step, np.int32)}

    return training_loop.Task(
        init_params=lambda key: {"w": 0.1 * jax.random.normal(key, (PIXELS,)), "b": jnp.zeros(())},
        loss=loss, optimizer=optax.adam(1e-2), learning_rate=optax.constant_schedule(1e-2),
        source=_source(), seed=3, init_key=jax.random.key(1), train_key=jax.random.key(2),
        transform=with_step, **fields)


def _args(**overrides) -> LoopArgs:
    return LoopArgs(**{"batch_size": 8, "num_steps": 6, "log_every": 2, "checkpoint_every": 2,
                       "ema_decay": 0.5, **overrides})


def _host(state):
    return jax.tree.map(np.asarray, jax.device_get(state))


@pytest.mark.parametrize("ema_warmup", [False, True])
def test_the_loop_computes_the_float64_updates_of_its_batches(ema_warmup):
    """Plain SGD, no dropout noise in the check: the loop's parameters after 3 steps equal
    w <- w - lr ∇L on the batches of input_pipeline.get_batch(seed, step), in float64; the EMA
    decays by 0.5, or with warm-up by min(0.5, (1 + t) / (10 + t)) = 1/10, 2/11, 3/12."""
    def loss(params, batch, key):
        del key
        x = batch["image"].reshape(-1, PIXELS)
        return jnp.mean((x @ params["w"] - batch["label"]) ** 2), {}

    task = training_loop.Task(
        init_params=lambda key: {"w": jnp.full((PIXELS,), 0.1)}, loss=loss,
        optimizer=optax.sgd(0.05), learning_rate=optax.constant_schedule(0.05),
        source=_source(), seed=3, init_key=jax.random.key(1), train_key=jax.random.key(2))
    state, stopped = training_loop.run(
        task, _args(num_steps=3, log_every=1, ema_warmup=ema_warmup), None)
    w = np.full(PIXELS, 0.1)
    ema = w.copy()
    for step in range(3):
        batch = input_pipeline.get_batch(_source(), seed=3, step=step, batch_size=8,
                                         random_flip=False)
        x = batch["image"].reshape(-1, PIXELS).astype(np.float64)
        w = w - 0.05 * 2 * x.T @ (x @ w - batch["label"]) / len(x)
        decay = min(0.5, (1 + step) / (10 + step)) if ema_warmup else 0.5
        ema = decay * ema + (1 - decay) * w
    assert not stopped and int(state.step) == 3
    np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-5)


def test_resumed_run_is_bit_identical_and_steps_per_dispatch_changes_nothing(tmp_path):
    whole, _ = training_loop.run(_task(), _args(), str(tmp_path / "whole"))
    training_loop.run(_task(), _args(num_steps=2), str(tmp_path / "halves"))
    resumed, _ = training_loop.run(_task(), _args(), str(tmp_path / "halves"))
    for a, b in zip(jax.tree.leaves(_host(whole)), jax.tree.leaves(_host(resumed)), strict=True):
        np.testing.assert_array_equal(a, b)
    # Two updates per jitted call: the same keys and batches, the same arithmetic.
    dispatched, _ = training_loop.run(_task(), _args(steps_per_dispatch=2), None)
    for a, b in zip(jax.tree.leaves(_host(whole)), jax.tree.leaves(_host(dispatched)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_nan_stops_before_it_is_saved(tmp_path):
    with pytest.raises(training_loop.NonFiniteLossError) as info:
        training_loop.run(_task(nan_from_step=3, name="toy", nan_fix="lower the toy lr"),
                          _args(), str(tmp_path))
    message = str(info.value)
    assert message.startswith("toy/loss is nan at step 4; stopping.")
    assert "(step 2) is intact" in message and message.endswith("Fix: lower the toy lr.")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
        == ["2"]


def test_hooks_run_after_every_dispatch_and_a_stop_saves_and_returns(tmp_path, monkeypatch):
    seen = []

    def hook(step, state, writer):
        seen.append((step, int(state.step)))
        if step == 2:  # as if SIGTERM arrived during step 3
            monkeypatch.setattr(interrupts.STOP, "signum", signal.SIGTERM)

    state, stopped = training_loop.run(_task(), _args(num_steps=12), str(tmp_path),
                                       hooks=[hook])
    assert stopped and int(state.step) == 3
    assert seen == [(1, 1), (2, 2), (3, 3)]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 3]


def test_stop_when_is_asked_before_the_first_update_and_after_each_then_saves(tmp_path):
    """A run cut by stop_when (as bench/quality_vs_time.py cuts at wall-clock budgets) saves
    the step it stopped at, off the checkpoint interval, and resuming from it gives the
    uninterrupted run's state bit for bit."""
    asked = []

    def stop_at(last):
        def stop_when(step, state):
            asked.append((step, int(state.step)))
            return step >= last
        return stop_when

    state, stopped = training_loop.run(_task(), _args(num_steps=12), str(tmp_path / "cut"),
                                       stop_when=stop_at(3))
    assert stopped and int(state.step) == 3
    assert asked == [(0, 0), (1, 1), (2, 2), (3, 3)]
    steps = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps == [2, 3]
    asked.clear()  # a resumed run that is told to stop at once does no update
    state, stopped = training_loop.run(_task(), _args(num_steps=12), str(tmp_path / "cut"),
                                       stop_when=stop_at(0))
    assert stopped and int(state.step) == 3 and asked == [(3, 3)]
    resumed, stopped = training_loop.run(_task(), _args(), str(tmp_path / "cut"))
    whole, _ = training_loop.run(_task(), _args(), None)
    assert not stopped
    for a, b in zip(jax.tree.leaves(_host(whole)), jax.tree.leaves(_host(resumed)), strict=True):
        np.testing.assert_array_equal(a, b)
