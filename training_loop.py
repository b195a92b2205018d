"""The one training loop: every trained network goes through `run`.

The diffusion UNet (train_lib), the noise-aware classifier (classifier_training) and the MNIST
evaluator net (evaluation/mnist_classifier) each bring a `Task` (their parameters, loss,
optimiser and data) and `run_args.LoopArgs` (how long, how often); the loop is theirs in common:

    mesh -> restore the newest intact checkpoint, or initialise -> compile the update step ->
    loop: data, update, log (steps/s, ETA), NaN check, checkpoint, hooks, preemption -> final save

Invariants that make runs reproducible and resumable:
* The update step is a pure function `(state, batches) -> (state, metrics)`, jitted once with
  the state donated and explicit shardings. Its randomness is `fold_in(train_key, step)`: no key
  is stored, so step s draws the same numbers whether or not the run was resumed.
* The batch at step s is a pure function of (seed, s) (input_pipeline), so the data position in a
  checkpoint is just the step.
* Random numbers are drawn for the *global* batch inside jit; with partitionable threefry they do
  not depend on how the batch is sharded, so 8 devices compute what 1 device computes.

SIGTERM and Ctrl-C (interrupts.py): once the loop runs, a stop is recorded and the loop saves at
the next step boundary and returns; without a workdir (nothing to save to) a stop raises
`interrupts.Stopped` at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import checkpointing
import input_pipeline
import interrupts
import metric_logging
from data_spec import encode_pixels
from errors import UserError
from run_args import LoopArgs

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
# transform(batch, *, step, indices, rows) -> the pytree the loss takes; see global_batches.
Transform = Callable[..., Any]
NAN_FIX = "lower --config.optim.lr, or check the data (NaN pixels?)"


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left untouched."""


class DataPositionError(UserError):
    """A checkpoint's data position does not match the batch size it is resumed with."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # [] int32: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """What is trained: its parameters, loss, optimiser and data, and how its logs name it."""

    init_params: Callable[[jax.Array], Any]  # key -> fresh parameters
    loss: LossFn                             # (params, batch, key) -> (scalar, {name: scalar})
    optimizer: optax.GradientTransformation
    learning_rate: optax.Schedule            # step -> lr, logged as <name>/lr
    source: input_pipeline.Source            # training examples, in the order of (seed, step)
    seed: int                                # the data order and flips (input_pipeline)
    init_key: jax.Array
    train_key: jax.Array                     # step s uses fold_in(train_key, s)
    transform: Transform | None = None       # host batch -> the loss's batch (global_batches)
    random_flip: bool = False
    random_crop: bool = False                # a crop position drawn per (seed, step, position)
    encode: Callable[[np.ndarray], np.ndarray] = encode_pixels  # uint8 images -> model space
    prefetch: int = 0                        # batches built ahead in a background thread
    name: str = "train"                      # TensorBoard prefix: <name>/loss, ...
    title: str = ""                          # how log lines name it ("the classifier")
    shown: tuple[tuple[str, str], ...] = (("loss", "loss"),)  # (label, metric) in the log line
    config_json: str = "{}"                  # saved in every checkpoint's meta item
    hparams: dict | None = None              # flat; written to TensorBoard at step 0
    nan_fix: str = NAN_FIX                   # the "Fix:" of the NaN/Inf error


# A hook runs after every dispatch (after any save): hook(step, state, writer), e.g. a sample
# grid every N steps.
Hook = Callable[[int, TrainState, metric_logging.Writer], None]
# stop_when(step, state) -> True ends the run early, as a stop request does (saved, returned):
# called once before the first update and after every dispatch (before the save), e.g. a
# wall-clock budget; on a multi-process run it must give every process the same answer.
StopWhen = Callable[[int, TrainState], bool]


# --- mesh, state ---------------------------------------------------------------------------------

def make_mesh() -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def initial_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: the EMA starts equal to the parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=optimizer.init(params))


def abstract_state(init_fn: Callable[[jax.Array], Any], key: jax.Array,
                   sharding: NamedSharding) -> Any:
    """The shapes and dtypes of `init_fn(key)`, placed on `sharding`, without allocating."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        jax.eval_shape(init_fn, key))


# --- the update step -----------------------------------------------------------------------------

def train_step(state: TrainState, batch: Any, *, loss: LossFn,
               optimizer: optax.GradientTransformation, ema_decay: float, lr_fn: optax.Schedule,
               base_key: jax.Array, ema_warmup: bool = False,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of any model: loss(params, batch, key) -> (scalar loss, {name: scalar})."""
    key = jax.random.fold_in(base_key, state.step)
    (loss_value, terms), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay) if ema_warmup else ema_decay
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                              state.ema_params, params)
    metrics = {"loss": loss_value, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "lr": lr_fn(state.step), **terms}
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                           opt_state=opt_state)
    return new_state, metrics


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
    """The EMA decay of update `step` (0-based) with warm-up: min(ema_decay, (1 + step) / (10 +
    step)), as tf.train.ExponentialMovingAverage's num_updates. Without it the EMA of a short run
    still holds ema_decay**steps of the random initialisation (0.995**400 = 13%: speckled
    samples); with it the early EMA averages about the last 10% of the updates."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def train_steps(state: TrainState, batches: Any, **kwargs):
    """`steps_per_dispatch` updates in one call: batches have a leading [K] axis.

    The K steps are unrolled in Python, not a `lax.scan`: XLA-CPU runs the convolution
    gradients inside a while-loop body ~30x slower than at top level (measured: 1.1 s vs 35 s
    for the MNIST UNet at batch 64, even with K = 1), and K is small.
    """
    metrics = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
        state, m = train_step(state, jax.tree.map(lambda b, i=i: b[i], batches), **kwargs)
        metrics.append(m)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)


# --- data, checks --------------------------------------------------------------------------------

def global_batches(source: input_pipeline.Source, step: int, k: int, sharding: NamedSharding, *,
                   seed: int, batch_size: int, random_flip: bool, random_crop: bool = False,
                   encode: Callable[[np.ndarray], np.ndarray] = encode_pixels,
                   transform: Transform | None = None) -> Any:
    """K consecutive global batches as global arrays [K, B, ...], this process's rows local.

    transform(batch, step=, indices=, rows=): maps this process's `rows` of the batch of
    `input_pipeline.get_batch` (a dict of [n, ...] arrays) to the pytree the update step takes,
    on the host; `indices` [B] are the dataset indices of the whole global batch at `step`
    (this process's rows: the examples actually read, see `input_pipeline.Source.read`).
    """
    b = batch_size
    rows = input_pipeline.process_rows(b, jax.process_index(), jax.process_count())
    local = []
    for s in range(step, step + k):
        x = input_pipeline.get_batch(source, seed=seed, step=s, batch_size=b,
                                     random_flip=random_flip, random_crop=random_crop,
                                     rows=rows, encode=encode)
        read = x.pop("index")  # what was read: a skipped unreadable image's replacement
        if transform is not None:
            indices = input_pipeline.global_batch_indices(seed, s, b, len(source))
            indices[rows] = read  # so its label and caption are the replacement's too
            x = transform(x, step=s, indices=indices, rows=rows)
        local.append(x)
    stacked = jax.tree.map(lambda *x: np.stack(x), *local)
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(
        sharding, value, (k, b, *value.shape[2:])), stacked)


def check_finite(history: list[tuple[int, dict]], last_checkpoint: int | None = None, *,
                 name: str = "train", fix: str = NAN_FIX) -> None:
    """history: (first step, metrics with a leading [K] axis) per dispatch, on the host;
    last_checkpoint: the step of the newest checkpoint (None: none saved yet); name: the
    metrics' prefix; fix: what to do about it."""
    for first_step, metrics in history:
        for metric in ("loss", "grad_norm"):
            bad = np.flatnonzero(~np.isfinite(metrics[metric]))
            if bad.size:
                kept = (f"The last checkpoint before it (step {last_checkpoint}) is intact"
                        if last_checkpoint is not None else "No checkpoint was saved before it")
                raise NonFiniteLossError(
                    f"{name}/{metric} is {metrics[metric][bad[0]]} at step "
                    f"{first_step + bad[0] + 1}; stopping. {kept}. Fix: {fix}.")


def checkpoint_meta(step: int, batch_size: int, config_json: str) -> dict:
    """The meta item saved with the state at `step` (checkpointing adds the arrays' digest)."""
    return {"step": step, "examples_seen": step * batch_size, "config": config_json}


# --- the loop ------------------------------------------------------------------------------------

def _wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """Across processes of a multi-host run, wait until every one has reached `name`.

    The first step's collectives set up XLA-CPU's Gloo context, which gives a late peer only 30 s;
    on a slow or busy CPU one process can finish compiling more than 30 s after another (seen on
    a 2-core Zen 3). The coordination service's barrier waits up to `timeout_s` instead.
    """
    from jax._src import distributed  # the coordination client; no public accessor in jax 0.10
    client = distributed.global_state.client
    if jax.process_count() > 1 and client is not None:
        client.wait_at_barrier(f"ddpm_jax_{name}", timeout_s * 1000)


def run(task: Task, args: LoopArgs, workdir: str | None, hooks: Sequence[Hook] = (),
        stop_when: StopWhen | None = None) -> tuple[TrainState, bool]:
    """Trains (or resumes from workdir's newest intact checkpoint) until args.num_steps;
    returns (final state, whether it stopped early on a stop request or `stop_when`). workdir
    None: no checkpoints and no TensorBoard (nothing to resume from)."""
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    k = args.steps_per_dispatch
    init_fn = functools.partial(_init, task.init_params, task.optimizer)
    batches = functools.partial(global_batches, task.source, sharding=batch_sharding,
                                seed=task.seed, batch_size=args.batch_size,
                                random_flip=task.random_flip, random_crop=task.random_crop,
                                encode=task.encode, transform=task.transform)
    ckpt = (checkpointing.Checkpointer(workdir, max_to_keep=args.keep_checkpoints)
            if workdir is not None else None)
    writer = None
    try:
        state = _restore(task, args, ckpt, abstract_state(init_fn, task.init_key, replicated))
        if state is None:
            state = interrupts.run_interruptibly(
                lambda: jax.jit(init_fn, out_shardings=replicated)(task.init_key))
        start_step = int(jax.device_get(state.step))

        update = jax.jit(
            functools.partial(train_steps, loss=task.loss, optimizer=task.optimizer,
                              ema_decay=args.ema_decay, ema_warmup=args.ema_warmup,
                              lr_fn=task.learning_rate,
                              base_key=task.train_key),
            in_shardings=(replicated, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0)
        if start_step < args.num_steps:
            # Compiled, and the other processes of a multi-host run waited for, in a worker
            # thread, so that a SIGTERM or Ctrl-C meanwhile stops the run at once
            # (interrupts.py): the state is still the restored checkpoint.
            logging.info("Compiling the train step.")
            jitted, first_batch = update, batches(start_step, k)

            def compile_on_every_process():
                compiled = jitted.lower(state, first_batch).compile()
                _wait_for_all_processes("train_step_compiled")
                return compiled

            update = interrupts.run_interruptibly(compile_on_every_process)
        writer = metric_logging.Writer(workdir, enabled=workdir is not None
                                       and metric_logging.writes_files())
        if start_step == 0 and task.hparams is not None:
            writer.hparams(task.hparams, task.config_json)
        return _loop(task, args, state, update, batches, ckpt, writer, hooks, stop_when)
    finally:
        if ckpt is not None:
            ckpt.wait_until_finished()
            ckpt.close()
        if writer is not None:
            writer.close()


def _init(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
          key: jax.Array) -> TrainState:
    return initial_state(init_params(key), optimizer)


def _restore(task: Task, args: LoopArgs, ckpt: checkpointing.Checkpointer | None,
             abstract: Any) -> TrainState | None:
    """The newest checkpoint that restores (damaged newer ones are moved aside), or None."""
    restored = ckpt.restore_newest_intact(abstract) if ckpt is not None else None
    if restored is None:
        return None
    state, meta, latest = restored
    seen, expected = meta.get("examples_seen"), latest * args.batch_size
    if seen is not None and seen != expected:  # (older classifier checkpoints have no count)
        raise DataPositionError(
            f"Checkpoint {latest} in {ckpt.directory} saw {seen} examples but a batch size of "
            f"{args.batch_size} implies {expected}. Fix: resume with the batch size it was "
            f"trained with, or use a new --workdir.")
    logging.info("Resumed %sfrom step %d in %s.", f"{task.title} " if task.title else "",
                 latest, ckpt.directory)
    return state


def _loop(task: Task, args: LoopArgs, state: TrainState, update, batches, ckpt, writer,
          hooks: Sequence[Hook], stop_when: StopWhen | None) -> tuple[TrainState, bool]:
    if ckpt is not None:
        interrupts.STOP.defer()  # from here a stop saves at the next step boundary
    k = args.steps_per_dispatch
    # The next dispatches' batches are read, decoded and sent to the devices in a background
    # thread while the device runs this one; each is still the function of its step alone.
    loader = input_pipeline.Prefetcher(lambda s: batches(s, k),
                                       range(int(jax.device_get(state.step)), args.num_steps, k),
                                       depth=task.prefetch)
    try:
        return _steps(task, args, state, update, loader, ckpt, writer, hooks, stop_when)
    finally:
        loader.close()


def _steps(task: Task, args: LoopArgs, state: TrainState, update, loader, ckpt, writer,
           hooks: Sequence[Hook], stop_when: StopWhen | None) -> tuple[TrainState, bool]:
    k = args.steps_per_dispatch
    step = int(jax.device_get(state.step))
    progress = metric_logging.Progress(step, args.num_steps, args.batch_size)
    stop_request = interrupts.STOP
    history: list[tuple[int, Any]] = []  # (first step, device metrics) not yet checked
    if stop_when is not None and stop_when(step, state):
        return state, True  # nothing new to save
    while step < args.num_steps:
        state, metrics = update(state, loader.get(step))
        history.append((step, metrics))
        step += k

        at_end = step == args.num_steps
        until = stop_when is not None and stop_when(step, state)
        stop = until or (ckpt is not None and (stop_request.requested or (
            step % args.log_every == 0 and stop_request.any_process())))
        save = ckpt is not None and (step % args.checkpoint_every == 0 or at_end or stop)
        if step % args.log_every == 0 or save or at_end:
            fetched = jax.device_get(history)
            history = []
            check_finite(fetched, ckpt.latest_step() if ckpt else None, name=task.name,
                         fix=task.nan_fix)
            last = {f"{task.name}/{n}": float(v[-1]) for n, v in fetched[-1][1].items()}
            rates = progress.update(step)
            writer.scalars(step, {**last, **{f"{task.name}/{n}": v for n, v in rates.items()
                                             if n != "eta_sec"},
                                  f"{task.name}/bad_images": task.source.num_bad_images})
            logging.info(progress.line(
                step, {label: last[f"{task.name}/{metric}"] for label, metric in task.shown},
                rates))
        if save:
            ckpt.save(step, state, checkpoint_meta(step, args.batch_size, task.config_json),
                      force=True)
        for hook in hooks:
            hook(step, state, writer)
        if until:
            logging.info("Stopped by stop_when at step %d%s.", step, " (saved)" if save else "")
            return state, True
        if stop:
            logging.info("Preempted: saved step %d; exiting cleanly (%s).", step,
                         stop_request.signal_name or "stop signal on another process")
            return state, True
    return state, False
