"""`--mode=train_classifier`: the noise-aware classifier p_φ(y | x_t, t) for classifier guidance.

Dhariwal & Nichol 2021: the classifier sees the noised images x_t = q_sample(x_0, t, ε) at
t ~ U{0..T-1} under config.diffusion's schedule (the one the sampler walks), and is trained with
cross-entropy on the labels of config.data. It reuses the diffusion trainer's pieces: the update
step (`train_lib.train_step`, keys fold_in(base_key, step)), the data order (`global_batches`),
the mesh, the finite checks and one orbax Checkpointer, in `<workdir>/classifier` (or
config.sample.classifier_workdir), which resumes from its latest checkpoint. At the end it writes
eval.json there: accuracy on data.eval_split at a few noise levels.
"""

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import checkpointing
import config_compat
import config_lib
import input_pipeline
import interrupts
import metric_logging
import train_lib
import workdir_lock
from diffusion import gaussian, schedules
from models import NoisyClassifier


def classifier_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.sample.classifier_workdir or os.path.join(workdir, "classifier")


def create_classifier(config: ml_collections.ConfigDict) -> NoisyClassifier:
    return NoisyClassifier(**config_lib.classifier_kwargs(config))


def _optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adamw(config.classifier.lr, weight_decay=config.classifier.weight_decay)


def _abstract_state(config: ml_collections.ConfigDict, model: NoisyClassifier,
                    sharding: NamedSharding):
    """The TrainState's shapes (no allocation) and its init function."""
    size, channels = config.data.image_size, config.data.num_channels

    def init(key):
        x = jnp.zeros((1, size, size, channels), jnp.float32)
        params = model.init({"params": key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
        return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    ema_params=params, opt_state=_optimizer(config).init(params))

    return train_lib.abstract_state(init, jax.random.key(0), sharding), init


def loss_fn(params, batch: dict[str, jax.Array], key: jax.Array, *, model: NoisyClassifier,
            schedule: schedules.Schedule) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of p_φ(y | x_t, t) with x_t = q_sample(x_0, t, ε), t ~ U{0..T-1}."""
    x0, y = batch["image"], batch["label"]                  # [B, H, W, C], [B]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, y.shape, 0, schedule.num_timesteps)
    x_t = gaussian.q_sample(schedule, x0, t, jax.random.normal(k_noise, x0.shape, x0.dtype))
    logits = model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": k_drop})
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def train_classifier(config: ml_collections.ConfigDict, workdir: str) -> train_lib.TrainState:
    """Trains (or resumes) the classifier until config.classifier.num_steps; returns the state.

    As `train_lib.train`: validated, its directory locked and its config compared with the
    latest classifier checkpoint's (config_compat.CLASSIFIER_RULES) before anything is built.
    """
    with interrupts.handled():
        config_lib.validate_classifier(config, num_devices=jax.device_count())
        directory = classifier_dir(config, workdir)
        with workdir_lock.hold(directory):
            config_compat.check_resume(config, directory, config_compat.CLASSIFIER_RULES)
            return _train_classifier(config, directory)


def _train_classifier(config: ml_collections.ConfigDict,
                      directory: str) -> train_lib.TrainState:
    source = input_pipeline.from_config(config.data, config.data.split)
    input_pipeline.check_shape(source, config.data.image_size, config.data.num_channels,
                               config.data.name)
    c = config.classifier

    mesh = train_lib.make_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    model = create_classifier(config)
    schedule = schedules.schedule_from_name(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    # Streams of their own (the diffusion trainer draws from fold_in(seed key, 1)); parameters
    # are initialised with "rbg", as train_lib does, because threefry init compiles slowly.
    init_key = jax.random.fold_in(jax.random.key(config.seed, impl="rbg"), 2)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    abstract_state, init = _abstract_state(config, model, replicated)

    ckpt = checkpointing.Checkpointer(directory, max_to_keep=config.train.keep_checkpoints)
    restored = ckpt.restore_newest_intact(abstract_state)
    if restored is not None:
        state, _, latest = restored
        logging.info("Resumed the classifier from step %d in %s.", latest, ckpt.directory)
    else:
        state = interrupts.run_interruptibly(
            lambda: jax.jit(init, out_shardings=replicated)(init_key))
    step = int(jax.device_get(state.step))

    update = jax.jit(
        functools.partial(train_lib.train_steps,
                          loss=functools.partial(loss_fn, model=model, schedule=schedule),
                          optimizer=_optimizer(config), ema_decay=c.ema_decay,
                          lr_fn=optax.constant_schedule(c.lr), base_key=train_key),
        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
        donate_argnums=0)
    if step < c.num_steps:  # compiled so that a stop meanwhile is honoured at once
        example = train_lib.global_batches(source, config, step, 1, batch_sharding,
                                           batch_size=c.batch_size)
        update = interrupts.run_interruptibly(update.lower(state, example).compile)

    writer = metric_logging.Writer(directory, enabled=jax.process_index() == 0)
    progress = metric_logging.Progress(step, c.num_steps, c.batch_size)
    history = []
    interrupts.STOP.defer()  # from here a stop saves at the next step boundary
    try:
        while step < c.num_steps:
            batches = train_lib.global_batches(source, config, step, 1, batch_sharding,
                                               batch_size=c.batch_size)
            state, metrics = update(state, batches)
            history.append((step, metrics))
            step += 1
            stop = interrupts.STOP.requested or (step % c.log_every == 0
                                                 and interrupts.STOP.any_process())
            save = step % c.checkpoint_every == 0 or step == c.num_steps or stop
            if step % c.log_every == 0 or save:
                fetched = jax.device_get(history)
                history = []
                train_lib.check_finite(fetched, ckpt.latest_step())
                last = {f"classifier/{n}": float(v[-1]) for n, v in fetched[-1][1].items()}
                rates = progress.update(step)
                writer.scalars(step, last)
                logging.info(progress.line(step, {"loss": last["classifier/loss"],
                                                  "acc": last["classifier/accuracy"]}, rates))
            if save:
                ckpt.save(step, state, {"step": step,
                                        "config": checkpointing.config_to_json(config)},
                          force=True)
            if stop:
                logging.info("Preempted: saved classifier step %d; exiting cleanly.", step)
                return state
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()

    accuracy = evaluate(config, model, state.ema_params, schedule)
    logging.info("Classifier accuracy on %s by timestep: %s", config.data.eval_split, accuracy)
    if jax.process_index() == 0:
        with open(os.path.join(directory, "eval.json"), "w") as f:
            json.dump({"step": step, "split": config.data.eval_split,
                       "accuracy_by_timestep": accuracy}, f, indent=1)
    return state


def evaluate(config: ml_collections.ConfigDict, model: NoisyClassifier, params: Any,
             schedule: schedules.Schedule, max_examples: int = 1000) -> dict[str, float]:
    """Accuracy on up to max_examples of data.eval_split, noised to t = 0, T/4, T/2, 3T/4."""
    source = input_pipeline.from_config(config.data, config.data.eval_split)
    images, labels = source.get(np.arange(min(len(source), max_examples)))
    b = config.classifier.batch_size
    x0 = input_pipeline.preprocess(np.resize(images, (-(-len(images) // b) * b, *images.shape[1:])),
                                   None)  # padded to whole batches: one compilation

    @jax.jit
    def predict(params, x0, t_value, key):
        t = jnp.full(x0.shape[:1], t_value, jnp.int32)
        x_t = gaussian.q_sample(schedule, x0, t, jax.random.normal(key, x0.shape))
        return jnp.argmax(model.apply({"params": params}, x_t, t, train=False), -1)

    accuracy = {}
    for t_value in np.linspace(0, schedule.num_timesteps, 4, endpoint=False).astype(int):
        key = jax.random.key(int(t_value))
        predictions = [predict(params, x0[i:i + b], t_value, jax.random.fold_in(key, i))
                       for i in range(0, len(x0), b)]
        accuracy[str(t_value)] = float(np.mean(np.concatenate(predictions)[:len(labels)]
                                               == labels))
    return accuracy


def restore_classifier(config: ml_collections.ConfigDict,
                       workdir: str) -> tuple[NoisyClassifier, Any, int]:
    """(classifier, replicated EMA params, step) of the newest classifier checkpoint that
    restores, with the classifier settings it was trained with (config_compat)."""
    config = config_compat.trained_config(
        config, classifier_dir(config, workdir), config_compat.CLASSIFIER_RULES,
        take=("classifier",), must_match=("diffusion.schedule", "diffusion.num_timesteps"))
    config_lib.validate_classifier(config, num_devices=jax.device_count())
    model = create_classifier(config)
    abstract_state, _ = _abstract_state(config, model, NamedSharding(train_lib.make_mesh(), P()))
    state, step = checkpointing.restore_latest(
        classifier_dir(config, workdir), abstract_state,
        missing=lambda directory: (
            f"No classifier checkpoint in {directory}, but sample.classifier_scale="
            f"{config.sample.classifier_scale}. Fix: train one first (--mode=train_classifier "
            f"with the same --workdir), or --config.sample.classifier_scale=0."))
    return model, state.ema_params, step
