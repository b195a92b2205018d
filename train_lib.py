"""The one trainer: `train(config, workdir)`.

Phases, in order: validate the config -> open the data -> mesh -> model, optimiser, schedule ->
restore or initialise the state -> the jitted update step -> the loop (log, checkpoint, sample,
preemption) -> final save.

Invariants that make runs reproducible and resumable:
* The update step is a pure function `(state, batches) -> (state, metrics)`, jitted once with
  the state donated. Its randomness is `fold_in(fold_in(seed_key, step), ...)`: no key is
  stored, so step s draws the same t, noise and dropout whether or not the run was resumed.
* The batch at step s is a pure function of (data seed, s) (see input_pipeline), so the data
  position in a checkpoint is just the step.
* Random numbers are drawn for the *global* batch inside jit; with partitionable threefry they
  do not depend on how the batch is sharded, so 8 devices compute what 1 device computes.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import checkpointing
import config_compat
import config_lib
import input_pipeline
import interrupts
import metric_logging
import sampling_lib
import text_conditioning
import workdir_lock
from diffusion import gaussian, losses, schedules
from errors import UserError
from evaluation.evaluator import PeriodicEvaluator
from models import UNet, conditioning


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left untouched."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # [] int32: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any


# --- mesh ----------------------------------------------------------------------------------------

def make_mesh() -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


# --- model, optimiser, schedule -----------------------------------------------------------------

def create_model(config: ml_collections.ConfigDict) -> UNet:
    return UNet(**config_lib.model_kwargs(config))


def learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to optim.lr over optim.warmup_steps, then constant (DDPM)."""
    o = config.optim
    if o.warmup_steps == 0:
        return optax.constant_schedule(o.lr)
    return optax.linear_schedule(0.0, o.lr, o.warmup_steps)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    adam = optax.adam(learning_rate_fn(config), b1=o.beta1, b2=o.beta2, eps=o.eps)
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam)
    return adam


def example_cond(model: UNet, null: dict) -> conditioning.Cond:
    """A batch of one condition with every field the model reads (∅ itself), for init."""
    return {name: jnp.asarray(null[name])[None] for name in model.cond_fields}


def init_state(model: UNet, optimizer: optax.GradientTransformation, key: jax.Array,
               image_shape: tuple[int, ...], null: dict | None = None) -> TrainState:
    """Fresh parameters; the EMA starts equal to them. null: ∅ (`conditioning.null_cond`),
    default the null label of a class-conditional model."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    null = conditioning.null_cond(model.num_classes) if null is None else null
    if model.cond_dim and "pooled" not in null:  # a vector input without a null of its own
        null = {**null, "pooled": np.zeros(model.cond_dim, np.float32)}
    params = model.init({"params": key}, x, t, example_cond(model, null), train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=optimizer.init(params))


def abstract_state(init_fn, key: jax.Array, sharding: NamedSharding) -> Any:
    """The shapes and dtypes of `init_fn(key)`, placed on `sharding`, without allocating."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        jax.eval_shape(init_fn, key))


# --- the update step -----------------------------------------------------------------------------

def loss_fn(params, model: UNet, schedule: schedules.Schedule, args: config_lib.DiffusionArgs,
            batch: dict, key: jax.Array, null: dict | None = None):
    """L for one batch: x_t = q_sample(x0, t, ε) at t ~ U{0..T-1}; loss on the model output.

    batch: {"image": [B, H, W, C], "cond": the conditioning pytree}. With p_uncond > 0 each
    example's condition is replaced by ∅ (`null`, default the null label) with that probability
    (classifier-free guidance: ε(x_t, ∅) is trained too).
    """
    x0 = batch["image"]                                    # [B, H, W, C]
    b = x0.shape[0]
    k_t, k_noise, k_drop, k_uncond = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (b,), 0, args.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = gaussian.q_sample(schedule, x0, t, noise)
    cond = conditioning.select(batch["cond"], model.cond_fields)
    if cond and args.p_uncond > 0:
        keep = ~jax.random.bernoulli(k_uncond, args.p_uncond, (b,))
        null = conditioning.null_cond(model.num_classes) if null is None else null
        cond = conditioning.drop_cond(cond, keep, null)
    out = model.apply({"params": params}, x_t, t, cond, train=True, rngs={"dropout": k_drop})
    terms = losses.training_losses(
        schedule, out, x0, x_t, t, noise, prediction=args.prediction, var_type=args.var_type,
        loss_type=args.loss_type, vlb_weight=args.vlb_weight, weighting=args.weighting,
        min_snr_gamma=args.min_snr_gamma)
    return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
               optimizer: optax.GradientTransformation, ema_decay: float, lr_fn: optax.Schedule,
               base_key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of any model: loss(params, batch, key) -> (scalar loss, {name: scalar})."""
    key = jax.random.fold_in(base_key, state.step)
    (loss_value, terms), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                              state.ema_params, params)
    metrics = {"loss": loss_value, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "lr": lr_fn(state.step), **terms}
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                           opt_state=opt_state)
    return new_state, metrics


def train_steps(state: TrainState, batches: dict[str, jax.Array], **kwargs):
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


# --- the loop ------------------------------------------------------------------------------------

def global_batches(source, config, step: int, k: int, sharding: NamedSharding, *,
                   batch_size: int, transform: Callable[..., Any] | None = None) -> Any:
    """K consecutive global batches as global arrays [K, B, ...], this process's rows local.

    transform(batch, step=, indices=, rows=): maps this process's `rows` of the batch of
    `input_pipeline.get_batch` (a dict of [n, ...] arrays) to the pytree the update step takes,
    on the host; `indices` [B] are the dataset indices of the whole global batch at `step`.
    """
    b = batch_size
    rows = input_pipeline.process_rows(b, jax.process_index(), jax.process_count())
    local = []
    for s in range(step, step + k):
        x = input_pipeline.get_batch(source, seed=config.seed, step=s, batch_size=b,
                                     random_flip=config.data.random_flip, rows=rows)
        if transform is not None:
            indices = input_pipeline.global_batch_indices(config.seed, s, b, len(source))
            x = transform(x, step=s, indices=indices, rows=rows)
        local.append(x)
    stacked = jax.tree.map(lambda *x: np.stack(x), *local)
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(
        sharding, value, (k, b, *value.shape[2:])), stacked)


def diffusion_batch(model: UNet, text, batch: dict[str, np.ndarray], *, seed: int, step: int,
                    indices: np.ndarray, rows: slice) -> dict:
    """{"image", "cond"}: the image and the conditioning pytree of the fields the model reads.

    text: a `text.captions.TextBatcher` giving the caption embeddings of the examples at
    (seed, step), or None for a model without text.
    """
    cond = {"label": batch["label"]} if model.num_classes else {}
    if text is not None:
        cond.update(text(indices, seed=seed, step=step, rows=rows))
    return {"image": batch["image"], "cond": cond}


def check_finite(history: list[tuple[int, dict]], last_checkpoint: int | None = None) -> None:
    """history: (first step, metrics with a leading [K] axis) per dispatch, on the host;
    last_checkpoint: the step of the newest checkpoint (None: none saved yet)."""
    for first_step, metrics in history:
        for name in ("loss", "grad_norm"):
            bad = np.flatnonzero(~np.isfinite(metrics[name]))
            if bad.size:
                kept = (f"The last checkpoint before it (step {last_checkpoint}) is intact"
                        if last_checkpoint is not None else "No checkpoint was saved before it")
                raise NonFiniteLossError(
                    f"train/{name} is {metrics[name][bad[0]]} at step {first_step + bad[0] + 1}; "
                    f"stopping. {kept}. Fix: lower --config.optim.lr, or check the data (NaN "
                    f"pixels?).")


def checkpoint_meta(config: ml_collections.ConfigDict, step: int) -> dict:
    """The meta item saved with the state at `step` (checkpointing adds the arrays' digest)."""
    return {"step": step, "examples_seen": step * config.train.batch_size,
            "config": checkpointing.config_to_json(config)}


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) in `workdir` until config.train.num_steps; returns the final state.

    Before anything is built: the config is validated, the workdir locked (one training per
    workdir: workdir_lock.py) and the config compared with the one the latest checkpoint was
    trained with (config_compat.py). SIGTERM and SIGINT: interrupts.py.
    """
    with interrupts.handled():
        config_lib.validate(config, num_devices=jax.device_count())
        with workdir_lock.hold(workdir):
            config_compat.check_resume(config, workdir)
            return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """`train` with the config validated and checked, and the workdir locked."""
    # Open the data before anything is compiled.
    source = input_pipeline.load(config.data.name, config.data.split, config.data.data_dir)
    input_pipeline.check_shape(source, config.data.image_size, config.data.num_channels,
                               config.data.name)
    tr = config.train
    k = tr.steps_per_dispatch

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))

    model = create_model(config)
    optimizer = create_optimizer(config)
    args = config_lib.diffusion_args(config)
    schedule = schedules.schedule_from_name(args.schedule, args.num_timesteps)
    # Parameter init uses the "rbg" generator: compiling init with threefry takes ~3x longer on
    # CPU, and init runs once. The training randomness stays threefry (partitionable).
    init_key = jax.random.key(config.seed, impl="rbg")
    train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

    # Text models: the frozen encoder embeds every caption once (cached in the workdir); ∅ is
    # the null label and/or the empty caption's encoding.
    text = text_conditioning.training_batcher(config, source, model, workdir)
    null = conditioning.null_cond(model.num_classes, text.null if text else None)
    init_fn = functools.partial(init_state, model, optimizer, image_shape=image_shape,
                                null=null)
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=tr.keep_checkpoints)
    # The newest checkpoint that restores; damaged newer ones are moved aside (checkpointing).
    restored = ckpt.restore_newest_intact(abstract_state(init_fn, init_key, replicated))
    if restored is not None:
        state, meta, latest = restored
        expected = latest * tr.batch_size
        if meta.get("examples_seen") != expected:
            raise config_compat.ConfigMismatchError(
                f"Checkpoint {latest} in {ckpt.directory} saw {meta.get('examples_seen')} "
                f"examples but train.batch_size={tr.batch_size} implies {expected}. Fix: resume "
                f"with the batch size it was trained with, or use a new --workdir.")
        logging.info("Resumed from step %d in %s.", latest, ckpt.directory)
    else:
        state = interrupts.run_interruptibly(
            lambda: jax.jit(init_fn, out_shardings=replicated)(init_key))
    start_step = int(jax.device_get(state.step))

    def diffusion_loss(params, batch, key):
        return loss_fn(params, model, schedule, args, batch, key, null)

    update = jax.jit(
        functools.partial(train_steps, loss=diffusion_loss, optimizer=optimizer,
                          ema_decay=tr.ema_decay, lr_fn=learning_rate_fn(config),
                          base_key=train_key),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0)
    transform = functools.partial(diffusion_batch, model, text, seed=config.seed)
    if start_step < tr.num_steps:
        # Compiled in a worker thread, so that a SIGTERM or Ctrl-C meanwhile stops the run at
        # once (interrupts.py): the state is still the restored checkpoint, nothing is lost.
        logging.info("Compiling the train step.")
        example = global_batches(source, config, start_step, k, batch_sharding,
                                 batch_size=tr.batch_size, transform=transform)
        update = interrupts.run_interruptibly(update.lower(state, example).compile)

    sampler = None
    if tr.sample_every:
        sampler = sampling_lib.GridSampler(config, model, schedule, mesh,
                                           num_steps=tr.sample_num_steps, text=text, null=null)
    evaluator = None  # periodic bound estimate / small-sample FID (config.eval)
    if config.eval.bpd_every or config.eval.fid_every:
        evaluator = PeriodicEvaluator(config, model, schedule, mesh, workdir, text=text,
                                      null=null)

    writer = metric_logging.Writer(workdir, enabled=jax.process_index() == 0)
    if start_step == 0:
        writer.hparams(config_compat.flatten(config.to_dict()),
                       checkpointing.config_to_json(config))
    progress = metric_logging.Progress(start_step, tr.num_steps, tr.batch_size)
    preemption = interrupts.STOP
    preemption.defer()  # from here a stop saves at the next step boundary

    history: list[tuple[int, Any]] = []  # (first step, device metrics) not yet checked
    step = start_step
    try:
        while step < tr.num_steps:
            batches = global_batches(source, config, step, k, batch_sharding,
                                     batch_size=tr.batch_size, transform=transform)
            state, metrics = update(state, batches)
            history.append((step, metrics))
            step += k

            stop = preemption.requested or (step % tr.log_every == 0
                                            and preemption.any_process())
            save = step % tr.checkpoint_every == 0 or step == tr.num_steps or stop
            if step % tr.log_every == 0 or save:
                fetched = jax.device_get(history)
                history = []
                check_finite(fetched, ckpt.latest_step())  # before any save: no NaN state
                last = {f"train/{n}": float(v[-1]) for n, v in fetched[-1][1].items()}
                rates = progress.update(step)
                writer.scalars(step, {**last, **{f"train/{n}": v for n, v in rates.items()
                                                 if n != "eta_sec"}})
                logging.info(progress.line(step, {"loss": last["train/loss"]}, rates))
            if save:
                ckpt.save(step, state, checkpoint_meta(config, step), force=True)
            if sampler and step % tr.sample_every == 0:
                grid = sampler.grid(state.ema_params, seed=step)
                writer.image(step, "samples/ema", grid)
            if evaluator and evaluator.due(step):
                writer.scalars(step, evaluator(step, state.ema_params))
            if stop:
                logging.info("Preempted: saved step %d; exiting cleanly (%s).", step,
                             preemption.signal_name or "stop signal on another process")
                break
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
    return state


def restore_params(config: ml_collections.ConfigDict, workdir: str, *,
                   use_ema: bool = True) -> tuple[UNet, Any, int]:
    """(model, replicated params, step) of the newest checkpoint in workdir that restores, for
    sampling/eval; the model has the settings it was trained with (config_compat)."""
    config = config_compat.trained_config(config, workdir)
    config_lib.validate(config, num_devices=jax.device_count())
    model = create_model(config)
    replicated = NamedSharding(make_mesh(), P())
    image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    init_fn = functools.partial(init_state, model, create_optimizer(config),
                                image_shape=image_shape,
                                null=text_conditioning.shape_null(config, model))
    state, step = checkpointing.restore_latest(
        workdir, abstract_state(init_fn, jax.random.key(0, impl="rbg"), replicated),
        missing=lambda directory: (
            f"No checkpoint in {directory}. Fix: train first (--mode=train with the same "
            f"--workdir), or point --workdir at a trained run."))
    return model, (state.ema_params if use_ema else state.params), step
