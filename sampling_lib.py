"""Images from a trained model: guided model functions, a chunked sharded sampler, sample files.

The model is conditioned on one pytree `cond` (models/conditioning.py: a label, text tokens, a
pooled embedding). Classifier-free guidance (Ho & Salimans 2022), with ∅ the null condition (the
null label; the empty caption's encoding):
    ε̃(x_t, c) = (1 + w) ε(x_t, c) − w ε(x_t, ∅),
both terms from one batched call (`diffusion.guidance.classifier_free_guidance`). The combination
is linear in the network output, so it is the same for ε-, x0- and v-prediction; with a learned
variance only the mean channels are guided and the conditional variance is kept.

Classifier guidance (Dhariwal & Nichol 2021): cond_fn(x_t, t) = s ∇ₓ log p_φ(y | x_t, t) of a
`models.NoisyClassifier`; the samplers apply it (diffusion/samplers.py). Both guidances combine.

`Sampler` runs the reverse process in jitted chunks of `progress_every` steps: the loop state is
carried between calls and the chunk bounds are traced, so there is one compilation, a progress
line with steps/s and ETA between chunks, and the same images as one uninterrupted loop.
"""

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cpu_runtime
import metric_logging
from data_spec import DataSpec, decode_pixels
from diffusion import guidance, samplers, schedules
from models import NoisyClassifier, UNet, classifier_log_prob_grad, conditioning
from run_args import SampleArgs


def guided_model_fn(model: UNet, params, cond: conditioning.Cond | None,
                    guidance_scale: float | jax.Array,
                    null: dict | None = None) -> samplers.ModelFn:
    """model_fn(x_t [B,H,W,C], t [B]) -> network output, guided unless guidance_scale is the
    number 0. A traced scale always guides (the batch twice through the network), so one
    program serves every w.

    cond: the condition (the fields the model reads are used; None or {} = unconditional).
    null: ∅ (`conditioning.null_cond`); default the null label of a class-conditional model.
    """
    unguided = isinstance(guidance_scale, int | float) and guidance_scale == 0
    cond = conditioning.select(cond, model.cond_fields)
    null = conditioning.null_cond(model.num_classes) if null is None else null

    def model_fn(x, t):
        if not cond or unguided:
            return model.apply({"params": params}, x, t, cond, train=False)
        both = conditioning.concatenate([cond, conditioning.uncond_like(cond, null)])
        out = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                          both, train=False)
        cond_out, uncond = jnp.split(out, 2)
        c = x.shape[-1]  # guide the mean channels only (the rest is a learned variance)
        guided = guidance.classifier_free_guidance(cond_out[..., :c], uncond[..., :c],
                                                   guidance_scale)
        return jnp.concatenate([guided, cond_out[..., c:]], axis=-1)

    return model_fn


def classifier_cond_fn(classifier: NoisyClassifier, params, labels: jax.Array,
                       scale: float) -> samplers.CondFn:
    """cond_fn(x_t, t) = scale · ∇ₓ log p_φ(labels | x_t, t), [B, H, W, C]."""

    def cond_fn(x, t):
        return scale * classifier_log_prob_grad(classifier.apply, params, x, t, labels)

    return cond_fn


def grid_labels(num_samples: int, num_classes: int) -> np.ndarray | None:
    """Labels that give one block (a grid row when it divides evenly) per class, in order."""
    if not num_classes:
        return None
    return (np.arange(num_samples) * num_classes // num_samples).astype(np.int32)


def grid_columns(num_samples: int, num_classes: int) -> int:
    if num_classes and num_samples % num_classes == 0:
        return num_samples // num_classes
    return int(np.ceil(np.sqrt(num_samples)))


def parse_labels(spec: str, num_samples: int, num_classes: int) -> np.ndarray | None:
    """int32 [num_samples] labels from sample.labels, or None for an unlabelled model.

    "" gives `grid_labels` (one block per class); "3" or "1,4,7" repeats that list cyclically.
    Values are checked by config_lib.validate.
    """
    if not num_classes:
        return None
    if not spec.strip():
        return grid_labels(num_samples, num_classes)
    values = np.asarray([int(v) for v in spec.split(",")], np.int32)
    return np.resize(values, num_samples)


class Sampler:
    """A jitted, batch-sharded sampler for one batch size; compiled once, reused for every call.

    guidance_scale: the default w of classifier-free guidance; a call may ask for another. The
    scale is an input of the program, not a constant in it: one program serves w = 0 (the
    condition alone, one pass) and one every w != 0, so a sweep over scales compiles twice.
    progress_every: steps per jitted chunk, with a progress line after each (0 = the whole loop
    in one call, no progress lines). `num_traces` counts how often a chunk was traced.
    null: the null condition ∅ of classifier-free guidance (`conditioning.null_cond`; default:
    the null label of a class-conditional model). The classifier of classifier guidance reads
    the request's cond["label"].
    """

    def __init__(self, model: UNet, schedule: schedules.Schedule, mesh: jax.sharding.Mesh, *,
                 image_shape: tuple[int, int, int], batch_size: int, guidance_scale: float,
                 spec: samplers.SamplerSpec | None = None,
                 classifier: NoisyClassifier | None = None, classifier_scale: float = 0.0,
                 progress_every: int = 0, null: dict | None = None, **spec_fields):
        """spec (or its fields as keywords, `samplers.as_spec`): how to sample."""
        self.model = model
        self.spec = spec = samplers.as_spec(spec, **spec_fields)
        self.batch_size = batch_size
        self.image_shape = image_shape
        self.num_steps = spec.loop_length(schedule.num_timesteps)  # K, loop iterations per batch
        self.progress_every = progress_every or self.num_steps
        self.guidance_scale = float(guidance_scale)
        self.num_traces = 0
        self._data = NamedSharding(mesh, P("data"))
        self._replicated = NamedSharding(mesh, P())
        use_classifier = classifier is not None and classifier_scale != 0

        def chunk(guided, params, classifier_params, state, cond, key, scale, start, stop):
            self.num_traces += 1
            model_fn = guided_model_fn(model, params, cond, scale if guided else 0, null)
            cond_fn = None
            if use_classifier:
                cond_fn = classifier_cond_fn(classifier, classifier_params, cond["label"],
                                             classifier_scale)
            return samplers.sample_steps(model_fn, schedule, state, key, start, stop, spec,
                                         cond_fn=cond_fn)

        rep, data = self._replicated, self._data
        # Forward passes only, unless the classifier's gradient is taken: that one runs 16%
        # slower with the inference options (measured: the MNIST classifier at batch 64).
        options = None if use_classifier else cpu_runtime.inference_compiler_options()
        self._chunks = {  # guided -> the chunk's program
            guided: jax.jit(functools.partial(chunk, guided),
                            in_shardings=(rep, rep, data, data, rep, rep, rep, rep),
                            out_shardings=data, donate_argnums=2, compiler_options=options)
            for guided in (False, True)}

    def _chunk(self, guidance_scale: float | None):
        """(the program for this scale, the scale as its input)."""
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        return self._chunks[w != 0], jnp.float32(w)

    def _inputs(self, params, classifier_params, key: jax.Array, cond: dict | None):
        """(params, classifier_params, state, cond, loop key), placed as the chunk wants them."""
        k_init, k_loop = jax.random.split(key)  # as samplers.sample splits it
        x_T = jax.random.normal(k_init, (self.batch_size, *self.image_shape), jnp.float32)
        state = jax.device_put(samplers.init_state(x_T, self.spec), self._data)
        cond = jax.device_put({name: jnp.asarray(v) for name, v in (cond or {}).items()},
                              self._data)
        params, classifier_params = jax.device_put((params, classifier_params), self._replicated)
        return params, classifier_params, state, cond, k_loop

    def compile(self, params, classifier_params=None, cond: dict | None = None, *,
                guidance_scale: float | None = None) -> float:
        """Traces and compiles the chunk for conditions shaped like `cond` [batch_size, ...]
        and this scale (default: the sampler's; later calls reuse it); returns the seconds."""
        begin = time.perf_counter()
        *inputs, k_loop = self._inputs(params, classifier_params, jax.random.key(0), cond)
        program, w = self._chunk(guidance_scale)
        program.lower(*inputs, k_loop, w, 0, 0).compile()
        return time.perf_counter() - begin

    def __call__(self, params, key: jax.Array, cond: dict | None, *,
                 classifier_params=None, guidance_scale: float | None = None,
                 progress: metric_logging.Progress | None = None,
                 progress_offset: int = 0) -> np.ndarray:
        """Images in [-1, 1], float32 [batch_size, H, W, C], on the host.

        cond: the condition of each image, fields [batch_size, ...] (None = unconditional).
        Bit for bit the same for any progress_every (one executable, the state carried); the
        images of `samplers.sample(..., key)` up to float32 rounding.
        progress: logs a line after each chunk, at step progress_offset + (steps done).
        """
        params, classifier_params, state, cond, k_loop = self._inputs(
            params, classifier_params, key, cond)
        program, w = self._chunk(guidance_scale)
        for start in range(0, self.num_steps, self.progress_every):
            stop = min(start + self.progress_every, self.num_steps)
            state = program(params, classifier_params, state, cond, k_loop, w, start, stop)
            if progress is not None:
                jax.block_until_ready(state)
                step = progress_offset + stop
                logging.info("sampling: %s", progress.line(step, {}, progress.update(step)))
        return np.asarray(jax.device_get(state.x))


def sample_many(sampler: Sampler, params, *, num_samples: int, cond: dict | None, seed: int,
                classifier_params=None, guidance_scale: float | None = None,
                log_progress: bool = True) -> np.ndarray:
    """num_samples images in [-1, 1], streamed in batches of sampler.batch_size, at
    guidance_scale (default: the sampler's).

    cond: fields [num_samples, ...] on the host (None = unconditional). With log_progress, a line
    with steps/s, images/s and the ETA of the whole run follows every chunk (compilation comes
    first, timed on its own).
    """
    def batch_cond(start: int) -> dict | None:  # pad the last batch: one shape, one compilation
        if not cond:
            return None
        rows = conditioning.take(cond, slice(start, start + sampler.batch_size))
        return conditioning.resize(rows, sampler.batch_size)

    seconds = sampler.compile(params, classifier_params, batch_cond(0),
                              guidance_scale=guidance_scale)
    logging.info("Compiled the sampler in %.1f s.", seconds)
    out = []
    key = jax.random.key(seed)
    num_batches = -(-num_samples // sampler.batch_size)
    # Each loop step advances batch_size/K images, so Progress's "img/s" is images per second.
    progress = metric_logging.Progress(0, num_batches * sampler.num_steps,
                                       sampler.batch_size / sampler.num_steps)
    start_time = time.perf_counter()
    for i, start in enumerate(range(0, num_samples, sampler.batch_size)):
        n = min(sampler.batch_size, num_samples - start)
        images = sampler(params, jax.random.fold_in(key, i), batch_cond(start),
                         classifier_params=classifier_params, guidance_scale=guidance_scale,
                         progress=progress if log_progress else None,
                         progress_offset=i * sampler.num_steps)
        out.append(images[:n])
    logging.info("Sampled %d images in %s.", num_samples,
                 metric_logging.format_duration(time.perf_counter() - start_time))
    return np.concatenate(out)


def make_sampler(sample: SampleArgs, model: UNet, schedule: schedules.Schedule,
                 mesh: jax.sharding.Mesh, *, image_shape: tuple[int, int, int], batch_size: int,
                 num_steps: int, sampler: str | None = None,
                 guidance_scale: float | None = None,
                 classifier: NoisyClassifier | None = None,
                 null: dict | None = None) -> Sampler:
    """A `Sampler` with the settings of `sample` (typed config.sample), for num_steps steps
    (0 = all T) with `sampler` and `guidance_scale` when given; classifier guidance when
    `classifier` is given and sample.classifier_scale > 0."""
    spec = dataclasses.replace(sample.spec, num_steps=int(num_steps) or None,
                               sampler=sample.spec.sampler if sampler is None else sampler)
    return Sampler(
        model, schedule, mesh, image_shape=image_shape, batch_size=batch_size, spec=spec,
        guidance_scale=sample.guidance_scale if guidance_scale is None else guidance_scale,
        classifier=classifier, classifier_scale=sample.classifier_scale,
        progress_every=sample.progress_every, null=null)


class GridSampler:
    """Periodic sample grids during training: the config's sampler (sample.sampler and its
    classifier-free guidance; no classifier guidance) respaced to a few steps, EMA params."""

    def __init__(self, sample: SampleArgs, model: UNet, schedule: schedules.Schedule,
                 mesh: jax.sharding.Mesh, *, data: DataSpec, num_steps: int, seed: int,
                 text=None, null: dict | None = None):
        """Up to 64 images (sample.num_samples, a multiple of the device count) of `data`,
        sampled in its model space and decoded to uint8 for the grid. text: the
        trainer's `text.captions.TextBatcher` (the grid shows the captions of n training
        examples spread over the dataset, chosen by `seed`); null: ∅ for guidance."""
        n = min(sample.num_samples, 64)
        n -= n % jax.device_count()
        n = max(n, jax.device_count())
        labels = grid_labels(n, model.num_classes)
        self._cond = {} if labels is None else {"label": labels}
        if text is not None:
            self._cond.update(text.spread(n, seed=seed))
        self._ncols = grid_columns(n, model.num_classes)
        self._data = data
        self._sampler = make_sampler(sample, model, schedule, mesh, image_shape=data.shape,
                                     batch_size=n, num_steps=num_steps, null=null)
        logging.info("Sample grids of %d images: %s, %d steps, guidance %g.", n,
                     self._sampler.spec.sampler, self._sampler.num_steps,
                     self._sampler.guidance_scale)

    def grid(self, params, seed: int) -> np.ndarray:
        images = self._sampler(params, jax.random.key(seed), self._cond)
        return metric_logging.make_grid(self._data.decode(images), self._ncols)


def write_samples(workdir: str, images: np.ndarray, labels: np.ndarray | None, ncols: int,
                  name: str, prompts: list[str] | None = None,
                  decode: Callable[[np.ndarray], np.ndarray] = decode_pixels) -> dict[str, str]:
    """Writes `name`.png (grid) and `name`.npz (uint8 images [N,H,W,C], labels, prompts) in
    workdir (process 0 only); returns their paths. images: model outputs, made uint8 by
    `decode` (a `DataSpec.decode`; default pixel space). prompts: the prompt of each image; a
    grid row per prompt is labelled with it."""
    png = os.path.join(workdir, f"{name}.png")
    npz = os.path.join(workdir, f"{name}.npz")
    if not metric_logging.writes_files():
        return {"png": png, "npz": npz}
    uint8 = decode(images)
    scale = max(1, 600 // (uint8.shape[2] * ncols))  # small digits: enlarge to be visible
    grid = metric_logging.make_grid(uint8, ncols)
    if prompts is not None:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
        grid = metric_logging.label_rows(grid, prompts[::ncols], row_height=uint8.shape[1] * scale,
                                         pad=2 * scale)
        scale = 1
    metric_logging.save_png(png, grid, scale=scale)
    np.savez_compressed(npz, images=uint8,
                        labels=labels if labels is not None else np.zeros(0, np.int32),
                        prompts=np.asarray(prompts if prompts is not None else [], str))
    return {"png": png, "npz": npz}
