"""Real checkpoints of the tiny config, written by the project's own Checkpointer, without
training: the state is the trainer's initial state with noise added to every parameter (seeded
by the step), so each checkpoint is distinguishable, its numbers look like trained ones (small
arrays of them are incompressible, so tensorstore stores them verbatim), and nothing compiles
but the initialisation."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import checkpointing
import config_lib
import train_lib
from configs import tiny


def tiny_config(**overrides):
    """configs/tiny.py with {"section.field": value} overrides."""
    config = tiny.get_config()
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


def _init_fn(config):
    model = train_lib.create_model(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    optimizer = train_lib.create_optimizer(config_lib.optim_args(config))
    return functools.partial(train_lib.init_state, model, optimizer, image_shape=image_shape)


def abstract_state(config):
    """The trainer's TrainState shapes for `config`, replicated on all devices."""
    return train_lib.abstract_state(_init_fn(config), jax.random.key(0, impl="rbg"),
                                    NamedSharding(train_lib.make_mesh(), P()))


def state_at(config, step: int) -> train_lib.TrainState:
    """The initial state of `config`, parameters + step, on all devices (replicated)."""
    replicated = NamedSharding(train_lib.make_mesh(), P())
    state = jax.jit(_init_fn(config), out_shardings=replicated)(
        jax.random.key(config.seed, impl="rbg"))
    rng = np.random.default_rng(step)
    noisy = jax.tree.map(lambda p: p + 0.01 * rng.standard_normal(p.shape, np.float32),
                         state.params)
    return state.replace(step=jnp.asarray(step, jnp.int32), params=noisy)


def write_checkpoints(workdir, config, steps) -> dict[int, train_lib.TrainState]:
    """Checkpoints at `steps` in workdir, as the trainer writes them; returns their states."""
    states = {step: state_at(config, step) for step in steps}
    ckpt = checkpointing.Checkpointer(str(workdir), max_to_keep=len(steps) + 1)
    for step, state in states.items():
        ckpt.save(step, state, train_lib.checkpoint_meta(config, step), force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    return states


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def copy_workdir(source, target):
    shutil.copytree(source, target)
    return target
