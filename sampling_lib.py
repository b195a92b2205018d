"""Images from a trained model: guided model functions, sharded in-jit sampling, `--mode=sample`.

Classifier-free guidance (Ho & Salimans 2022): with the null label ∅ = num_classes,
    ε̃(x_t, y) = (1 + w) ε(x_t, y) − w ε(x_t, ∅),
both terms from one batched call. The combination is linear in the network output, so it is
the same for ε-, x0- and v-prediction; with a learned variance only the mean channels are
guided and the conditional variance is kept.
"""

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import metric_logging
from diffusion import samplers, schedules
from models import UNet


def guided_model_fn(model: UNet, params, labels: jax.Array | None,
                    guidance_scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """model_fn(x_t [B,H,W,C], t [B]) -> network output, guided when guidance_scale > 0."""

    def model_fn(x, t):
        if labels is None or guidance_scale == 0:
            return model.apply({"params": params}, x, t, labels, train=False)
        null = jnp.full_like(labels, model.num_classes)
        out = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                          jnp.concatenate([labels, null]), train=False)
        cond, uncond = jnp.split(out, 2)
        c = x.shape[-1]  # guide the mean channels only (the rest is a learned variance)
        guided = (1 + guidance_scale) * cond[..., :c] - guidance_scale * uncond[..., :c]
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)

    return model_fn


def grid_labels(num_samples: int, num_classes: int) -> np.ndarray | None:
    """Labels that give one block (a grid row when it divides evenly) per class, in order."""
    if not num_classes:
        return None
    return (np.arange(num_samples) * num_classes // num_samples).astype(np.int32)


def grid_columns(num_samples: int, num_classes: int) -> int:
    if num_classes and num_samples % num_classes == 0:
        return num_samples // num_classes
    return int(np.ceil(np.sqrt(num_samples)))


class Sampler:
    """A jitted, batch-sharded sampler for one batch size; traced once, reused for every call."""

    def __init__(self, model: UNet, schedule: schedules.Schedule, mesh: jax.sharding.Mesh, *,
                 image_shape: tuple[int, int, int], batch_size: int, sampler: str,
                 num_steps: int, eta: float, clip_x0: bool, guidance_scale: float,
                 prediction: str, var_type: str):
        self.model = model
        self.batch_size = batch_size
        self.image_shape = image_shape
        self._data = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())

        def run(params, x_T, labels, key):
            model_fn = guided_model_fn(model, params, labels if model.num_classes else None,
                                       guidance_scale)
            return samplers.sample(
                model_fn, schedule, x_T.shape, key, sampler=sampler,
                num_steps=num_steps or None, eta=eta, prediction=prediction,
                var_type=var_type, clip_x0=clip_x0, x_T=x_T)

        self._run = jax.jit(run, in_shardings=(replicated, self._data, self._data, replicated),
                            out_shardings=self._data)

    def __call__(self, params, key: jax.Array, labels: np.ndarray | None) -> np.ndarray:
        """Images in [-1, 1], float32 [batch_size, H, W, C], on the host."""
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (self.batch_size, *self.image_shape), jnp.float32)
        if labels is None:
            labels = np.zeros(self.batch_size, np.int32)
        x_T = jax.device_put(x_T, self._data)
        labels = jax.device_put(jnp.asarray(labels, jnp.int32), self._data)
        return np.asarray(jax.device_get(self._run(params, x_T, labels, k_loop)))


def sample_many(sampler: Sampler, params, *, num_samples: int, labels: np.ndarray | None,
                seed: int) -> np.ndarray:
    """num_samples images in [-1, 1], streamed in batches of sampler.batch_size."""
    out = []
    key = jax.random.key(seed)
    for i, start in enumerate(range(0, num_samples, sampler.batch_size)):
        n = min(sampler.batch_size, num_samples - start)
        batch_labels = None
        if labels is not None:  # pad the last batch: one batch size, one compilation
            batch_labels = np.resize(labels[start:start + n], sampler.batch_size)
        out.append(sampler(params, jax.random.fold_in(key, i), batch_labels)[:n])
        logging.info("sampled %d/%d", start + n, num_samples)
    return np.concatenate(out)


def sampler_from_config(config: ml_collections.ConfigDict, model: UNet,
                        schedule: schedules.Schedule, mesh: jax.sharding.Mesh, *,
                        batch_size: int, num_steps: int, sampler: str | None = None,
                        guidance_scale: float | None = None) -> Sampler:
    s = config.sample
    return Sampler(
        model, schedule, mesh,
        image_shape=(config.data.image_size, config.data.image_size, config.data.num_channels),
        batch_size=batch_size, sampler=sampler or s.sampler, num_steps=num_steps, eta=s.eta,
        clip_x0=s.clip_x0,
        guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
        prediction=config.diffusion.prediction, var_type=config.diffusion.var_type)


class GridSampler:
    """Periodic sample grids during training: a few respaced ancestral steps, EMA params."""

    def __init__(self, config, model: UNet, schedule, mesh, *, num_steps: int):
        n = min(config.sample.num_samples, 64)
        n -= n % jax.device_count()
        n = max(n, jax.device_count())
        self._labels = grid_labels(n, model.num_classes)
        self._ncols = grid_columns(n, model.num_classes)
        self._sampler = sampler_from_config(config, model, schedule, mesh, batch_size=n,
                                            num_steps=num_steps, sampler="ancestral")

    def grid(self, params, seed: int) -> np.ndarray:
        images = self._sampler(params, jax.random.key(seed), self._labels)
        return metric_logging.make_grid(metric_logging.to_uint8(images), self._ncols)


def write_samples(workdir: str, images: np.ndarray, labels: np.ndarray | None, ncols: int,
                  name: str) -> dict[str, str]:
    """Writes `name`.png (grid) and `name`.npz (uint8 images [N,H,W,C], labels) in workdir."""
    uint8 = metric_logging.to_uint8(images)
    png = os.path.join(workdir, f"{name}.png")
    npz = os.path.join(workdir, f"{name}.npz")
    scale = max(1, 256 // (images.shape[1] * ncols))  # small digits: enlarge to be visible
    metric_logging.save_png(png, metric_logging.make_grid(uint8, ncols), scale=scale)
    np.savez_compressed(npz, images=uint8,
                        labels=labels if labels is not None else np.zeros(0, np.int32))
    return {"png": png, "npz": npz}
