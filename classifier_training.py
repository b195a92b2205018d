"""`--mode=train_classifier`: the noise-aware classifier p_φ(y | x_t, t) for classifier guidance.

Dhariwal & Nichol 2021: the classifier sees the noised images x_t = q_sample(x_0, t, ε) at
t ~ U{0..T-1} under config.diffusion's schedule (the one the sampler walks), and is trained with
cross-entropy on the labels of config.data. It is trained by the one loop (training_loop.py:
the data order, keys fold_in(train_key, step), steps per dispatch, finite checks, preemption,
one orbax Checkpointer), in `<workdir>/classifier` (or config.sample.classifier_workdir), which
resumes from its newest intact checkpoint. At the end it writes eval.json there: accuracy on
data.eval_split at a few noise levels.
"""

import functools
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
import training_loop
import workdir_lock
from diffusion import gaussian, schedules
from models import NoisyClassifier
from training_loop import TrainState


def classifier_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.sample.classifier_workdir or os.path.join(workdir, "classifier")


def create_classifier(config: ml_collections.ConfigDict) -> NoisyClassifier:
    return NoisyClassifier(**config_lib.classifier_kwargs(config))


def _optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adamw(config.classifier.lr, weight_decay=config.classifier.weight_decay)


def _init_params(model: NoisyClassifier, key: jax.Array, image_shape: tuple[int, ...]) -> Any:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return model.init({"params": key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]


def _abstract_state(config: ml_collections.ConfigDict, model: NoisyClassifier,
                    sharding: NamedSharding):
    """The TrainState's shapes (no allocation)."""
    init = functools.partial(_init_params, model,
                             image_shape=config_lib.data_args(config).spec.shape)
    return training_loop.abstract_state(
        lambda key: training_loop.initial_state(init(key), _optimizer(config)),
        jax.random.key(0), sharding)


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


def train_classifier(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
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


def _train_classifier(config: ml_collections.ConfigDict, directory: str) -> TrainState:
    data, diffusion = config_lib.data_args(config), config_lib.diffusion_args(config)
    source = input_pipeline.from_config(data, data.split)
    input_pipeline.check_shape(source, data.image_size, data.num_channels, data.name)
    model = create_classifier(config)
    schedule = schedules.schedule_from_name(diffusion.schedule, diffusion.num_timesteps)
    task = training_loop.Task(
        init_params=functools.partial(_init_params, model, image_shape=data.spec.shape),
        loss=functools.partial(loss_fn, model=model, schedule=schedule),
        optimizer=_optimizer(config),
        learning_rate=optax.constant_schedule(config.classifier.lr),
        source=source, seed=config.seed, random_flip=data.random_flip,
        encode=data.spec.encode,
        # Streams of their own (the diffusion trainer draws from fold_in(seed key, 1));
        # parameters are initialised with "rbg", as train_lib does, because threefry init
        # compiles slowly.
        init_key=jax.random.fold_in(jax.random.key(config.seed, impl="rbg"), 2),
        train_key=jax.random.fold_in(jax.random.key(config.seed), 2),
        name="classifier", title="the classifier",
        shown=(("loss", "loss"), ("acc", "accuracy")),
        config_json=checkpointing.config_to_json(config),
        nan_fix="lower --config.classifier.lr, or check the data (NaN pixels?)")
    state, stopped = training_loop.run(task, config_lib.classifier_train_args(config),
                                       directory)
    if stopped:
        return state
    accuracy = evaluate(config, model, state.ema_params, schedule)
    logging.info("Classifier accuracy on %s by timestep: %s", data.eval_split, accuracy)
    metric_logging.write_json(os.path.join(directory, "eval.json"), {
        "step": int(jax.device_get(state.step)), "split": data.eval_split,
        "accuracy_by_timestep": accuracy})
    return state


def evaluate(config: ml_collections.ConfigDict, model: NoisyClassifier, params: Any,
             schedule: schedules.Schedule, max_examples: int = 1000) -> dict[str, float]:
    """Accuracy on up to max_examples of data.eval_split, noised to t = 0, T/4, T/2, 3T/4."""
    data = config_lib.data_args(config)
    source = input_pipeline.from_config(data, data.eval_split)
    images, labels = source.get(np.arange(min(len(source), max_examples)))
    b = config.classifier.batch_size
    # Padded to whole batches: one compilation.
    x0 = data.spec.encode(np.resize(images, (-(-len(images) // b) * b, *images.shape[1:])))

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
    abstract_state = _abstract_state(config, model,
                                     NamedSharding(training_loop.make_mesh(), P()))
    state, step = checkpointing.restore_latest(
        classifier_dir(config, workdir), abstract_state,
        missing=lambda directory: (
            f"No classifier checkpoint in {directory}, but sample.classifier_scale="
            f"{config.sample.classifier_scale}. Fix: train one first (--mode=train_classifier "
            f"with the same --workdir), or --config.sample.classifier_scale=0."))
    return model, state.ema_params, step
