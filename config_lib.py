"""The boundary between ml_collections configs and typed code: validation and typed arguments.

`validate` runs before anything is compiled or loaded, and each problem is one line that names
the field, the bad value and the fix. Code below the boundary never sees a ConfigDict: it gets
the typed arguments of run_args.py, built here once per run (`data_args`, `diffusion_args`,
`optim_args`, `train_args`, `classifier_train_args`, `sample_args`, `eval_args`, and the
keyword arguments of the networks).
"""

import dataclasses
import typing

import jax.numpy as jnp
import ml_collections

from diffusion import samplers
from diffusion.gaussian import PREDICTIONS, VAR_TYPES
from diffusion.losses import LOSS_TYPES, T_SAMPLINGS, WEIGHTINGS, loss_options_problem
from diffusion.samplers import SAMPLERS
from diffusion.schedules import SCHEDULES, T_SPACINGS
from errors import ConfigError
from evaluation import FEATURE_NETS
from image_folder import FOLDER, FOLDER_LABELS
from images import CHANNELS, CROPS, ON_BAD_IMAGE
from input_pipeline import MNIST_5K, MNIST_5K_SPLITS
from run_args import (
    DataArgs,
    DiffusionArgs,
    EvalArgs,
    LoopArgs,
    OptimArgs,
    SampleArgs,
)

# Legal values are defined once, in the lowest module that needs them, and imported here.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EVAL_CONDITIONS = ("label", "null")
TEXT_ENCODERS = ("", "minilm", "clip", "precomputed")
TEXT_CONDITIONINGS = ("pooled", "cross_attention", "both")
CAPTIONS = ("", "digits", "dataset")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _no_problem(problem: str | None) -> None:
    """Raises the one-line problem a shared rule (diffusion/) found, if any."""
    if problem:
        raise ConfigError(problem)


def _require_num_steps(num_steps: int, field: str, num_timesteps: int) -> None:
    """A sampler's respaced step count: 0 (all T steps) up to T."""
    _require(0 <= num_steps <= num_timesteps,
             f"{field}={num_steps} must be in [0, diffusion.num_timesteps={num_timesteps}] "
             f"(0 = all steps).")


def _require_batch(value: int, field: str, num_devices: int) -> None:
    """A global batch is split evenly over the devices (on a CPU: cpu_runtime.py, section 4)."""
    _require(value > 0 and value % num_devices == 0,
             f"{field}={value} is not a positive multiple of the {num_devices} devices. Fix: use "
             f"a multiple of {num_devices}, or run on fewer devices (on a CPU: XLA_FLAGS="
             f"--xla_force_host_platform_device_count=1).")


def _require_dispatch(section: ml_collections.ConfigDict, name: str,
                      intervals: tuple[str, ...]) -> None:
    """steps_per_dispatch >= 1 divides each of the section's step intervals."""
    k = section.steps_per_dispatch
    _require(k >= 1, f"{name}.steps_per_dispatch={k} must be >= 1.")
    for field in intervals:
        value = section[field]
        _require(value >= 0 and value % k == 0,
                 f"{name}.{field}={value} must be a non-negative multiple of "
                 f"{name}.steps_per_dispatch={k}. Fix: make it a multiple of {k}.")


def _one_of(value, legal, field: str) -> None:
    _require(value in legal, f"{field}={value!r} is not supported. Fix: use one of {tuple(legal)}.")


def _validate_network(n: ml_collections.ConfigDict, name: str, size: int) -> None:
    """The architecture fields shared by the UNet (`model`) and the classifier (`classifier`)."""
    _require(n.ch > 0, f"{name}.ch={n.ch} must be positive.")
    _require(len(n.ch_mult) > 0 and all(c > 0 for c in n.ch_mult),
             f"{name}.ch_mult={tuple(n.ch_mult)} must be a non-empty tuple of positive ints.")
    for c in {n.ch * mult for mult in n.ch_mult}:
        _require(c % n.num_groups == 0,
                 f"{name}.num_groups={n.num_groups} does not divide the {c} channels of a level "
                 f"({name}.ch={n.ch}, ch_mult={tuple(n.ch_mult)}). Fix: pick a divisor of {c}.")
    levels = len(n.ch_mult)
    _require(size % 2 ** (levels - 1) == 0,
             f"data.image_size={size} cannot be halved {levels - 1} times "
             f"({name}.ch_mult has {levels} levels). Fix: use fewer levels.")
    resolutions = [size // 2**i for i in range(levels)]
    for r in n.attn_resolutions:
        _require(r in resolutions,
                 f"{name}.attn_resolutions contains {r}, which is not one of this model's "
                 f"resolutions {resolutions}. Fix: pick from those.")
    _require(0.0 <= n.dropout < 1.0, f"{name}.dropout={n.dropout} must be in [0, 1).")


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             evaluating: bool = False) -> None:
    """Raises ConfigError on the first bad field. Cheap: no data, no compilation.

    The eval.* settings are checked where they will be used: those of the periodic estimates
    when they are on (eval.bpd_every, eval.fid_every), all of --mode=eval's when `evaluating`.
    """
    d, m, o, tr, s = config.diffusion, config.model, config.optim, config.train, config.sample

    _require(isinstance(config.seed, int) and config.seed >= 0,
             f"seed={config.seed} must be a non-negative integer (it seeds the data order and "
             f"every key). Fix: e.g. --config.seed=0.")
    _validate_data(config)

    _one_of(d.schedule, SCHEDULES, "diffusion.schedule")
    _require(d.num_timesteps >= 2, f"diffusion.num_timesteps={d.num_timesteps} must be >= 2.")
    _one_of(d.prediction, PREDICTIONS, "diffusion.prediction")
    _one_of(d.var_type, VAR_TYPES, "diffusion.var_type")
    _one_of(d.loss_type, LOSS_TYPES, "diffusion.loss_type")
    _one_of(d.weighting, WEIGHTINGS, "diffusion.weighting")
    _one_of(d.t_sampling, T_SAMPLINGS, "diffusion.t_sampling")
    _no_problem(loss_options_problem(d.loss_type, d.var_type, d.weighting, "diffusion."))
    _require(d.schedule != "linear" or d.num_timesteps > 20,
             f"diffusion.schedule='linear' scales beta_end = 0.02 * 1000 / T, which reaches 1 "
             f"for diffusion.num_timesteps={d.num_timesteps}. Fix: T > 20 or schedule='cosine'.")
    _require(0.0 <= d.p_uncond < 1.0, f"diffusion.p_uncond={d.p_uncond} must be in [0, 1).")
    conditional = m.num_classes > 0 or bool(m.text_encoder)
    _require(d.p_uncond == 0.0 or conditional,
             f"diffusion.p_uncond={d.p_uncond} drops class labels, but model.num_classes=0. "
             f"Fix: set --config.model.num_classes or --config.diffusion.p_uncond=0.")

    _validate_network(m, "model", config.data.image_size)
    _one_of(m.dtype, DTYPES, "model.dtype")
    _require(m.num_classes >= 0, f"model.num_classes={m.num_classes} must be >= 0.")
    _validate_text(config)

    _require(o.lr > 0, f"optim.lr={o.lr} must be positive. Fix: e.g. --config.optim.lr=2e-4.")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 = off).")
    _require(o.decay_steps == 0 or o.decay_steps > o.warmup_steps,
             f"optim.decay_steps={o.decay_steps} must be 0 (no decay) or past the warmup's end, "
             f"optim.warmup_steps={o.warmup_steps}. Fix: e.g. --config.optim.decay_steps="
             f"{config.train.num_steps} (decay over the whole run).")
    _require(0.0 <= o.end_lr <= o.lr,
             f"optim.end_lr={o.end_lr} must be in [0, optim.lr={o.lr}].")
    _require(o.decay_steps == 0 or o.end_lr > 0 or config.train.num_steps <= o.decay_steps,
             f"train.num_steps={config.train.num_steps} runs past optim.decay_steps="
             f"{o.decay_steps}, where the learning rate has decayed to optim.end_lr=0: those "
             f"steps would not train. Fix: --config.optim.decay_steps={config.train.num_steps}, "
             f"or a positive --config.optim.end_lr.")

    _require_batch(tr.batch_size, "train.batch_size", num_devices)
    _require(tr.num_steps > 0, f"train.num_steps={tr.num_steps} must be positive.")
    _require(0.0 <= tr.ema_decay < 1.0, f"train.ema_decay={tr.ema_decay} must be in [0, 1).")
    _require_dispatch(tr, "train", ("log_every", "checkpoint_every", "sample_every",
                                    "num_steps"))
    _require(tr.log_every > 0 and tr.checkpoint_every > 0,
             "train.log_every and train.checkpoint_every must be positive.")
    _require(isinstance(tr.keep_checkpoints, int) and tr.keep_checkpoints >= 1,
             f"train.keep_checkpoints={tr.keep_checkpoints} must be >= 1: orbax deletes every "
             f"checkpoint beyond it, including earlier runs' in the workdir. Fix: e.g. "
             f"--config.train.keep_checkpoints=3.")

    _one_of(s.sampler, SAMPLERS, "sample.sampler")
    _one_of(s.spacing, T_SPACINGS, "sample.spacing")
    _no_problem(samplers.spacing_problem(s.sampler, s.spacing, "sample."))
    _require_num_steps(s.num_steps, "sample.num_steps", d.num_timesteps)
    if tr.sample_every or config.eval.fid_every:  # the periodic grids' and FID's sampler
        _require_num_steps(tr.sample_num_steps, "train.sample_num_steps", d.num_timesteps)
    _require_batch(s.batch_size, "sample.batch_size", num_devices)
    _require(s.num_samples > 0, f"sample.num_samples={s.num_samples} must be positive.")
    _require(s.guidance_scale >= 0, f"sample.guidance_scale={s.guidance_scale} must be >= 0.")
    _require(s.guidance_scale == 0 or (conditional and d.p_uncond > 0),
             f"sample.guidance_scale={s.guidance_scale} needs a model trained with the null "
             f"condition (model.num_classes > 0 or model.text_encoder, and diffusion.p_uncond "
             f"> 0). Fix: --config.sample.guidance_scale=0.")
    _require(not s.unconditional or (conditional and d.p_uncond > 0),
             "sample.unconditional=True samples with the null condition, which needs a model "
             "trained with it (model.num_classes > 0 or model.text_encoder, and "
             "diffusion.p_uncond > 0). Fix: --config.sample.unconditional=False.")
    _require(not (s.prompt or s.prompts) or m.text_encoder,
             "sample.prompt / sample.prompts need a text-conditional model. Fix: set "
             "--config.model.text_encoder (and train it), or drop the prompt.")
    _require(not (s.prompt and s.prompts),
             "sample.prompt and sample.prompts are both set. Fix: give one of them.")
    _require(s.progress_every >= 0, f"sample.progress_every={s.progress_every} must be >= 0.")
    _require(s.classifier_scale >= 0,
             f"sample.classifier_scale={s.classifier_scale} must be >= 0 (0 = off).")
    c = config.classifier
    _require(s.classifier_scale == 0 or m.num_classes in (0, c.num_classes),
             f"sample.classifier_scale={s.classifier_scale} guides the model's labels with the "
             f"classifier's, but model.num_classes={m.num_classes} != classifier.num_classes="
             f"{c.num_classes}. Fix: --config.classifier.num_classes={m.num_classes}.")
    num_labels = m.num_classes or (c.num_classes if s.classifier_scale > 0 else 0)
    _validate_labels(s.labels, num_labels)
    _require(s.sweep_per_class > 0, f"sample.sweep_per_class={s.sweep_per_class} must be > 0.")
    _require(len(s.sweep_scales) > 0 and all(w >= 0 for w in s.sweep_scales),
             f"sample.sweep_scales={tuple(s.sweep_scales)} must be a non-empty tuple of "
             f"guidance scales >= 0.")
    _validate_eval(config, num_devices, evaluating)


def _mnist_5k_split(split: str, field: str) -> None:
    _require(split in MNIST_5K_SPLITS,
             f"{field}={split!r} is not a split of mnist_5k. Fix: use one of {MNIST_5K_SPLITS}.")


def _validate_data(config: ml_collections.ConfigDict) -> None:
    """config.data: the source, its preprocessing and the folder-only fields."""
    data = config.data
    _require(bool(data.name), "data.name is empty. Fix: --config.data.name=mnist_5k "
             "(offline), folder (with data.path) or a tensorflow-datasets name such as cifar10.")
    if data.name == MNIST_5K:
        _require((data.image_size, data.num_channels) == (28, 1),
                 f"data.name='mnist_5k' has 28x28x1 images, but data.image_size="
                 f"{data.image_size}, data.num_channels={data.num_channels}. "
                 f"Fix: --config.data.image_size=28 --config.data.num_channels=1.")
        _mnist_5k_split(data.split, "data.split")
    _require(data.image_size > 0, f"data.image_size={data.image_size} must be positive.")
    _one_of(data.num_channels, CHANNELS, "data.num_channels")
    _one_of(data.crop, CROPS, "data.crop")
    _one_of(data.on_bad_image, ON_BAD_IMAGE, "data.on_bad_image")
    _one_of(data.folder_labels, FOLDER_LABELS, "data.folder_labels")
    _require(data.decode_threads >= 0,
             f"data.decode_threads={data.decode_threads} must be >= 0 (0 = one per CPU core).")
    _require(data.prefetch >= 0, f"data.prefetch={data.prefetch} must be >= 0 (0 = off).")
    _require(data.cache_mb >= 0, f"data.cache_mb={data.cache_mb} must be >= 0 (0 = off).")
    if data.name == FOLDER:
        _require(bool(data.path), "data.name='folder' reads data.path, which is empty. Fix: "
                 "--config.data.path=DIR, a folder of images.")
        _require(data.folder_labels == "subdirs" or config.model.num_classes == 0,
                 f"model.num_classes={config.model.num_classes}, but data.folder_labels='none' "
                 f"gives every image label 0. Fix: --config.data.folder_labels=subdirs (one "
                 f"class per sub-directory of data.path), or --config.model.num_classes=0.")
    else:
        _require(not data.path,
                 f"data.path={data.path!r} is read only with data.name='folder' (data.name="
                 f"{data.name!r}). Fix: --config.data.name=folder, or --config.data.path=''.")
        _require(data.folder_labels == "none",
                 f"data.folder_labels={data.folder_labels!r} applies to data.name='folder' only. "
                 f"Fix: --config.data.folder_labels=none.")


def _validate_eval(config: ml_collections.ConfigDict, num_devices: int, evaluating: bool) -> None:
    """config.eval: --mode=eval (`evaluating`) and the periodic estimates during training."""
    e, k = config.eval, config.train.steps_per_dispatch
    for field in ("bpd_every", "fid_every"):
        _require(e[field] >= 0 and e[field] % k == 0,
                 f"eval.{field}={e[field]} must be a non-negative multiple of "
                 f"train.steps_per_dispatch={k} (0 = off). Fix: make it a multiple of {k}.")
    bound = e.bpd_every > 0 or (evaluating and e.bpd)
    fid = e.fid_every > 0 or (evaluating and e.fid_num_samples != 0)
    if bound or fid:
        _require_batch(e.batch_size, "eval.batch_size", num_devices)
    if bound:
        _one_of(e.bpd_condition, EVAL_CONDITIONS, "eval.bpd_condition")
        _require(e.bpd_condition != "null"
                 or (config.model.num_classes > 0 and config.diffusion.p_uncond > 0),
                 "eval.bpd_condition='null' needs a model trained with the null label "
                 "(model.num_classes > 0, diffusion.p_uncond > 0). Fix: "
                 "eval.bpd_condition='label'.")
        for field in ("bpd_num_examples", "bpd_t_chunk"):
            _require(e[field] >= 0, f"eval.{field}={e[field]} must be >= 0.")
        _require(e.bpd_estimate_batches > 0 and e.bpd_estimate_timesteps > 0,
                 "eval.bpd_estimate_batches and eval.bpd_estimate_timesteps must be positive.")
        if config.data.name == MNIST_5K:
            _mnist_5k_split(config.data.eval_split, "data.eval_split")
    if fid:
        _one_of(e.feature_net, FEATURE_NETS, "eval.feature_net")
        _require(e.feature_net != "mnist_classifier"
                 or (config.data.image_size, config.data.num_channels) == (28, 1),
                 "eval.feature_net='mnist_classifier' takes 28x28x1 digits. Fix: "
                 "--config.eval.feature_net=inception_v3 for other images.")
        for field in ("fid_num_samples", "fid_ref_num_examples"):
            _require(e[field] >= 0, f"eval.{field}={e[field]} must be >= 0.")
        _require(e.fid_num_samples != 1 and e.fid_every_num_samples >= 2,
                 "FID needs at least 2 samples: eval.fid_num_samples (0 = skip) and "
                 "eval.fid_every_num_samples.")
        _require(e.kid_subset_size >= 2 and e.kid_num_subsets >= 1 and e.kid_max_features >= 2,
                 "eval.kid_subset_size and eval.kid_max_features must be >= 2, "
                 "eval.kid_num_subsets >= 1.")
        _require(e.is_splits >= 1, f"eval.is_splits={e.is_splits} must be >= 1.")
        if config.data.name == MNIST_5K:
            _mnist_5k_split(e.fid_ref_split, "eval.fid_ref_split")


def _validate_text(config: ml_collections.ConfigDict) -> None:
    """model.text_* and data.captions: a text encoder needs captions and a way into the UNet."""
    m, data = config.model, config.data
    _one_of(m.text_encoder, TEXT_ENCODERS, "model.text_encoder")
    _one_of(data.captions, CAPTIONS, "data.captions")
    if data.captions == "digits":
        _require(data.name == "mnist_5k",
                 f"data.captions='digits' captions the offline digits from their pixels, but "
                 f"data.name={data.name!r}. Fix: --config.data.name=mnist_5k, or "
                 f"--config.data.captions=''.")
        _require(not data.random_flip,
                 "data.captions='digits' names the slant of each digit, which a horizontal flip "
                 "reverses. Fix: --config.data.random_flip=False.")
    if data.captions == "dataset":
        _require(data.name == FOLDER or (data.name != "mnist_5k" and bool(data.caption_key)),
                 f"data.captions='dataset' reads a folder's captions, or a tfds dataset's text "
                 f"feature named by data.caption_key, but data.name={data.name!r}, "
                 f"data.caption_key={data.caption_key!r}. Fix: --config.data.name=folder, or "
                 f"--config.data.caption_key=FEATURE for a tfds dataset.")
    _require(not data.caption_key or data.captions == "dataset",
             f"data.caption_key={data.caption_key!r} is read only with data.captions='dataset'. "
             f"Fix: --config.data.captions=dataset, or --config.data.caption_key=''.")
    if not m.text_encoder:
        _require(not data.captions,
                 f"data.captions={data.captions!r} but model.text_encoder=''; nothing would "
                 f"read the captions. Fix: --config.model.text_encoder=minilm, or "
                 f"--config.data.captions=''.")
        return
    _require(bool(data.captions),
             f"model.text_encoder={m.text_encoder!r} needs captions, but data.captions='' "
             f"(data.name={data.name!r} has none configured). Fix: "
             f"--config.data.captions=digits with data.name=mnist_5k, or "
             f"--config.data.captions=dataset (a folder's captions, a tfds text feature).")
    _require(m.text_encoder != "precomputed" or bool(m.text_weights),
             "model.text_encoder='precomputed' reads the embeddings from a file. Fix: "
             "--config.model.text_weights=PATH.npz (text/precomputed.py says what it holds).")
    limit = {"clip": 77, "precomputed": 1 << 16}.get(m.text_encoder, 512)
    _require(2 <= m.text_max_length <= limit,
             f"model.text_max_length={m.text_max_length} must be in [2, {limit}] for "
             f"model.text_encoder={m.text_encoder!r}.")
    _one_of(m.text_conditioning, TEXT_CONDITIONINGS, "model.text_conditioning")
    if m.text_conditioning != "pooled":
        size, levels = data.image_size, len(m.ch_mult)
        resolutions = [size // 2**i for i in range(levels)]
        for r in m.cross_attn_resolutions:
            _require(r in resolutions,
                     f"model.cross_attn_resolutions contains {r}, which is not one of this "
                     f"model's resolutions {resolutions}. Fix: pick from those.")
        channels = {m.ch * m.ch_mult[resolutions.index(r)] for r in m.cross_attn_resolutions}
        for c in channels | {m.ch * m.ch_mult[-1]}:  # the middle block has cross-attention too
            _require(m.num_heads > 0 and c % m.num_heads == 0,
                     f"model.num_heads={m.num_heads} does not divide the {c} channels of a "
                     f"level with cross-attention. Fix: pick a divisor of {c}.")


def text_widths(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(D, Dp): the widths of the encoder's token states and pooled vector; (0, 0) without."""
    m = config.model
    if not m.text_encoder:
        return 0, 0
    from text import encoders  # clip's widths are read from its weights file

    return encoders.widths(m.text_encoder, m.text_weights)


def _validate_labels(spec: str, num_classes: int) -> None:
    if not spec.strip():
        return
    _require(num_classes > 0,
             f"sample.labels={spec!r} asks for classes, but the model is unconditional "
             f"(model.num_classes=0) and classifier guidance is off. Fix: "
             f"--config.sample.labels='' or set --config.sample.classifier_scale.")
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        values = [-1]
    _require(all(0 <= v < num_classes for v in values),
             f"sample.labels={spec!r} must be '' or comma-separated classes in "
             f"[0, {num_classes}). Fix: e.g. --config.sample.labels=3 or '0,1,2'.")


def validate_classifier(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Raises ConfigError on the first bad field of config.classifier (plus `validate`)."""
    validate(config, num_devices=num_devices)
    c = config.classifier
    _validate_network(c, "classifier", config.data.image_size)
    _require(c.num_classes > 1, f"classifier.num_classes={c.num_classes} must be >= 2.")
    _require(config.model.num_classes in (0, c.num_classes),
             f"classifier.num_classes={c.num_classes} differs from model.num_classes="
             f"{config.model.num_classes}. Fix: --config.classifier.num_classes="
             f"{config.model.num_classes}.")
    _require(c.lr > 0, f"classifier.lr={c.lr} must be positive. Fix: e.g. 3e-4.")
    _require(c.weight_decay >= 0, f"classifier.weight_decay={c.weight_decay} must be >= 0.")
    _require_batch(c.batch_size, "classifier.batch_size", num_devices)
    _require(c.num_steps > 0, f"classifier.num_steps={c.num_steps} must be positive.")
    _require(0.0 <= c.ema_decay < 1.0, f"classifier.ema_decay={c.ema_decay} must be in [0, 1).")
    _require(c.log_every > 0 and c.checkpoint_every > 0,
             "classifier.log_every and classifier.checkpoint_every must be positive.")
    _require_dispatch(c, "classifier", ("num_steps", "log_every", "checkpoint_every"))
    if config.data.name == MNIST_5K:  # the classifier's accuracy is measured on it at the end
        _mnist_5k_split(config.data.eval_split, "data.eval_split")


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """Typed keyword arguments of `models.UNet` for this config."""
    m = config.model
    channels = data_args(config).spec.shape[-1]  # of model space
    out_ch = channels * (2 if config.diffusion.var_type == "learned_range" else 1)
    width, pooled_width = text_widths(config)
    pooled = m.text_conditioning in ("pooled", "both")
    tokens = m.text_conditioning in ("cross_attention", "both")
    return dict(
        ch=int(m.ch), out_ch=out_ch, ch_mult=tuple(int(c) for c in m.ch_mult),
        num_res_blocks=int(m.num_res_blocks),
        attn_resolutions=tuple(int(r) for r in m.attn_resolutions), dropout=float(m.dropout),
        resamp_with_conv=bool(m.resamp_with_conv), num_groups=int(m.num_groups),
        num_classes=int(m.num_classes), cond_dim=pooled_width if pooled else 0,
        context_dim=width if tokens else 0,
        cross_attn_resolutions=tuple(int(r) for r in m.cross_attn_resolutions) if tokens else (),
        num_heads=int(m.num_heads), dtype=DTYPES[m.dtype], remat=bool(m.remat))


def classifier_kwargs(config: ml_collections.ConfigDict) -> dict:
    """Typed keyword arguments of `models.NoisyClassifier` for this config."""
    c = config.classifier
    return dict(
        ch=int(c.ch), ch_mult=tuple(int(m) for m in c.ch_mult),
        num_res_blocks=int(c.num_res_blocks),
        attn_resolutions=tuple(int(r) for r in c.attn_resolutions), dropout=float(c.dropout),
        num_groups=int(c.num_groups), num_classes=int(c.num_classes))


def sampler_spec(config: ml_collections.ConfigDict, *, sampler: str | None = None,
                 num_steps: int | None = None) -> samplers.SamplerSpec:
    """Typed config.sample (with the network's diffusion.prediction and diffusion.var_type);
    sampler and num_steps, when given, replace config.sample's (num_steps 0 = all T steps)."""
    s, d = config.sample, config.diffusion
    return samplers.SamplerSpec(
        sampler=str(s.sampler if sampler is None else sampler),
        num_steps=int(s.num_steps if num_steps is None else num_steps) or None,
        spacing=str(s.spacing), eta=float(s.eta), prediction=str(d.prediction),
        var_type=str(d.var_type), clip_x0=bool(s.clip_x0))


def _typed(cls, section: ml_collections.ConfigDict, **given):
    """A run_args dataclass from the section's fields of the same names, each cast to its
    annotated type (tuples item by item); `given` fields are taken as they are."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in given:
            kind, value = hints[field.name], section[field.name]
            if typing.get_origin(kind) is tuple:
                values[field.name] = tuple(typing.get_args(kind)[0](v) for v in value)
            else:
                values[field.name] = kind(value)
    return cls(**values, **given)


def data_args(config: ml_collections.ConfigDict) -> DataArgs:
    return _typed(DataArgs, config.data)


def diffusion_args(config: ml_collections.ConfigDict) -> DiffusionArgs:
    return _typed(DiffusionArgs, config.diffusion)


def optim_args(config: ml_collections.ConfigDict) -> OptimArgs:
    return _typed(OptimArgs, config.optim)


def train_args(config: ml_collections.ConfigDict) -> LoopArgs:
    """The diffusion model's loop: config.train."""
    return _typed(LoopArgs, config.train)


def classifier_train_args(config: ml_collections.ConfigDict) -> LoopArgs:
    """The noise-aware classifier's loop: config.classifier (train.keep_checkpoints)."""
    return _typed(LoopArgs, config.classifier, ema_warmup=False,
                  keep_checkpoints=int(config.train.keep_checkpoints))


def sample_args(config: ml_collections.ConfigDict) -> SampleArgs:
    return _typed(SampleArgs, config.sample, spec=sampler_spec(config))


def eval_args(config: ml_collections.ConfigDict) -> EvalArgs:
    return _typed(EvalArgs, config.eval)
