"""`--mode=train`: the diffusion model, trained by the one loop (training_loop.py).

`train(config, workdir)`: validate the config -> lock the workdir -> compare the config with the
latest checkpoint's -> open the data -> model, optimiser, schedule, text -> the `Task` (init,
loss, data transform) and hooks (sample grids, periodic evaluation) -> `training_loop.run`.
The loop's invariants (pure update step, keys fold_in(key, step), the data order a function of
(seed, step)) make a resumed run exact and 8 devices compute what 1 device computes.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import checkpointing
import config_compat
import config_lib
import image_folder
import input_pipeline
import interrupts
import metric_logging
import sampling_lib
import text_conditioning
import training_loop
import workdir_lock
from diffusion import gaussian, losses, schedules
from evaluation.evaluator import PeriodicEvaluator
from models import UNet, conditioning
from run_args import DataArgs, DiffusionArgs, OptimArgs
from training_loop import TrainState, abstract_state, make_mesh

# --- model, optimiser ----------------------------------------------------------------------------

def create_model(config: ml_collections.ConfigDict) -> UNet:
    return UNet(**config_lib.model_kwargs(config))


def learning_rate_fn(o: OptimArgs) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then constant (DDPM), or with decay_steps > 0
    a half cosine from lr down to end_lr at step decay_steps, and end_lr after it."""
    if o.decay_steps:
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, o.decay_steps,
                                                  o.end_lr)
    if o.warmup_steps == 0:
        return optax.constant_schedule(o.lr)
    return optax.linear_schedule(0.0, o.lr, o.warmup_steps)


def create_optimizer(o: OptimArgs) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate_fn(o), b1=o.beta1, b2=o.beta2, eps=o.eps)
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam)
    return adam


def example_cond(model: UNet, null: dict) -> conditioning.Cond:
    """A batch of one condition with every field the model reads (∅ itself), for init."""
    return {name: jnp.asarray(null[name])[None] for name in model.cond_fields}


def init_params(model: UNet, key: jax.Array, image_shape: tuple[int, ...],
                null: dict | None = None) -> Any:
    """Fresh parameters. null: ∅ (`conditioning.null_cond`), default the null label of a
    class-conditional model."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    null = conditioning.null_cond(model.num_classes) if null is None else null
    if model.cond_dim and "pooled" not in null:  # a vector input without a null of its own
        null = {**null, "pooled": np.zeros(model.cond_dim, np.float32)}
    return model.init({"params": key}, x, t, example_cond(model, null), train=False)["params"]


def init_state(model: UNet, optimizer: optax.GradientTransformation, key: jax.Array,
               image_shape: tuple[int, ...], null: dict | None = None) -> TrainState:
    """Fresh parameters (`init_params`); the EMA starts equal to them."""
    return training_loop.initial_state(init_params(model, key, image_shape, null), optimizer)


# --- the loss, the batch ------------------------------------------------------------------------

def loss_fn(params, model: UNet, schedule: schedules.Schedule, args: DiffusionArgs,
            batch: dict, key: jax.Array, null: dict | None = None):
    """L for one batch: x_t = q_sample(x0, t, ε) at t ~ U{0..T-1} (independent, or stratified
    over the batch: `losses.sample_timesteps`); loss on the model output.

    batch: {"image": [B, H, W, C], "cond": the conditioning pytree}. With p_uncond > 0 each
    example's condition is replaced by ∅ (`null`, default the null label) with that probability
    (classifier-free guidance: ε(x_t, ∅) is trained too).
    """
    x0 = batch["image"]                                    # [B, H, W, C]
    b = x0.shape[0]
    k_t, k_noise, k_drop, k_uncond = jax.random.split(key, 4)
    t = losses.sample_timesteps(k_t, b, args.num_timesteps, args.t_sampling)
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


def checkpoint_meta(config: ml_collections.ConfigDict, step: int) -> dict:
    """The meta item saved with the state at `step` (checkpointing adds the arrays' digest)."""
    return training_loop.checkpoint_meta(step, config.train.batch_size,
                                         checkpointing.config_to_json(config))


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_when: training_loop.StopWhen | None = None) -> TrainState:
    """Trains (or resumes) in `workdir` until config.train.num_steps, or until
    stop_when(step, state) (training_loop.run) says stop; returns the final state.

    Before anything is built: the config is validated, the workdir locked (one training per
    workdir: workdir_lock.py) and the config compared with the one the latest checkpoint was
    trained with (config_compat.py). SIGTERM and SIGINT: interrupts.py.
    """
    with interrupts.handled():
        config_lib.validate(config, num_devices=jax.device_count())
        with workdir_lock.hold(workdir):
            config_compat.check_resume(config, workdir)
            return _train(config, workdir, stop_when)


def _train(config: ml_collections.ConfigDict, workdir: str,
           stop_when: training_loop.StopWhen | None = None) -> TrainState:
    """`train` with the config validated and checked, and the workdir locked."""
    data = config_lib.data_args(config)
    # Open the data before anything is compiled.
    source = input_pipeline.from_config(data, data.split)
    input_pipeline.check_shape(source, data.image_size, data.num_channels, data.name)
    if isinstance(source, image_folder.FolderSource):  # class folders vs the workdir's run
        image_folder.check_label_map(source, workdir, config.model.num_classes,
                                     write=metric_logging.writes_files())
    loop = config_lib.train_args(config)
    optim = config_lib.optim_args(config)
    diffusion = config_lib.diffusion_args(config)

    model = create_model(config)
    optimizer = create_optimizer(optim)
    schedule = schedules.schedule_from_name(diffusion.schedule, diffusion.num_timesteps)
    # Text models: the frozen encoder embeds every caption once (cached in the workdir); ∅ is
    # the null label and/or the empty caption's encoding.
    text = text_conditioning.training_batcher(config, source, model, workdir)
    null = conditioning.null_cond(model.num_classes, text.null if text else None)

    def diffusion_loss(params, batch, key):
        return loss_fn(params, model, schedule, diffusion, batch, key, null)

    task = training_loop.Task(
        init_params=functools.partial(init_params, model, image_shape=data.spec.shape,
                                      null=null),
        loss=diffusion_loss, optimizer=optimizer, learning_rate=learning_rate_fn(optim),
        source=source, seed=config.seed, random_flip=data.random_flip,
        encode=data.spec.encode,
        random_crop=data.crop == "random", prefetch=data.prefetch,
        transform=functools.partial(diffusion_batch, model, text, seed=config.seed),
        # Parameter init uses the "rbg" generator: compiling init with threefry takes ~3x
        # longer on CPU, and init runs once. The training randomness stays threefry
        # (partitionable).
        init_key=jax.random.key(config.seed, impl="rbg"),
        train_key=jax.random.fold_in(jax.random.key(config.seed), 1),
        config_json=checkpointing.config_to_json(config),
        hparams=config_compat.flatten(config.to_dict()))
    hooks = _hooks(config, data, diffusion, model, schedule, text, null, workdir, source)
    state, _ = training_loop.run(task, loop, workdir, hooks=hooks, stop_when=stop_when)
    return state


def _hooks(config: ml_collections.ConfigDict, data: DataArgs, diffusion: DiffusionArgs,
           model: UNet, schedule: schedules.Schedule, text, null: dict, workdir: str,
           source: input_pipeline.Source) -> list[training_loop.Hook]:
    """Periodic sample grids (train.sample_every) and bound/FID estimates (eval.*_every)."""
    tr, e, sample = config.train, config_lib.eval_args(config), config_lib.sample_args(config)
    mesh = make_mesh()
    hooks = []
    if tr.sample_every:
        sampler = sampling_lib.GridSampler(sample, model, schedule, mesh, data=data.spec,
                                           num_steps=tr.sample_num_steps, seed=config.seed,
                                           text=text, null=null)

        def sample_grid(step, state, writer):
            if step % tr.sample_every == 0:
                writer.image(step, "samples/ema", sampler.grid(state.ema_params, seed=step))

        hooks.append(sample_grid)
    if e.bpd_every or e.fid_every:
        eval_text = (text_conditioning.for_split(config, text, data.eval_split)
                     if text else None)
        evaluator = PeriodicEvaluator(
            e, data, diffusion, model, schedule, mesh, workdir, sample=sample,
            sample_num_steps=tr.sample_num_steps, text=text, eval_text=eval_text,
            train_source=source, null=null)

        def evaluate(step, state, writer):
            if evaluator.due(step):
                writer.scalars(step, evaluator(step, state.ema_params))

        hooks.append(evaluate)
    return hooks


def restore_params(config: ml_collections.ConfigDict, workdir: str, *,
                   use_ema: bool = True) -> tuple[UNet, Any, int]:
    """(model, replicated params, step) of the newest checkpoint in workdir that restores, for
    sampling/eval; the model has the settings it was trained with (config_compat)."""
    config = config_compat.trained_config(config, workdir)
    config_lib.validate(config, num_devices=jax.device_count())
    model = create_model(config)
    replicated = NamedSharding(make_mesh(), P())
    init_fn = functools.partial(init_state, model, create_optimizer(config_lib.optim_args(config)),
                                image_shape=config_lib.data_args(config).spec.shape,
                                null=text_conditioning.shape_null(config, model))
    state, step = checkpointing.restore_latest(
        workdir, abstract_state(init_fn, jax.random.key(0, impl="rbg"), replicated),
        missing=lambda directory: (
            f"No checkpoint in {directory}. Fix: train first (--mode=train with the same "
            f"--workdir), or point --workdir at a trained run."))
    return model, (state.ema_params if use_ema else state.params), step
