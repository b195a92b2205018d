"""Typed arguments: one frozen dataclass per config section, built once by config_lib.

Code below the boundary (diffusion/, models/, text/, evaluation/, sampling_lib, training_loop,
input_pipeline) takes these, never an ml_collections ConfigDict (tests/test_boundary.py enforces
it). The legal values of each field are in configs/default.py's comments and are checked by
config_lib.validate before any of these is built.
"""

from __future__ import annotations

import dataclasses

from data_spec import DataSpec
from diffusion.samplers import SamplerSpec
from images import ImageSpec


@dataclasses.dataclass(frozen=True)
class DataArgs:
    """Typed `config.data`."""

    name: str
    split: str
    eval_split: str
    data_dir: str
    image_size: int
    num_channels: int
    random_flip: bool
    captions: str
    path: str                # data.name == "folder": the folder
    folder_labels: str       # "none" | "subdirs"
    crop: str                # "center" | "random"
    on_bad_image: str        # "skip" | "stop"
    caption_key: str         # tfds: the text feature holding the caption
    decode_threads: int
    prefetch: int
    cache_mb: int

    @property
    def spec(self) -> DataSpec:
        """The images and the model's space: shape, encode, decode (data_spec.py)."""
        return DataSpec(ImageSpec(size=self.image_size, channels=self.num_channels))


@dataclasses.dataclass(frozen=True)
class DiffusionArgs:
    """Typed `config.diffusion`."""

    schedule: str
    num_timesteps: int
    prediction: str
    var_type: str
    loss_type: str
    vlb_weight: float
    weighting: str
    min_snr_gamma: float
    p_uncond: float
    t_sampling: str


@dataclasses.dataclass(frozen=True)
class OptimArgs:
    """Typed `config.optim`: Adam with linear warmup, an optional cosine decay, and global-norm
    clipping (0 = off)."""

    lr: float
    warmup_steps: int
    decay_steps: int
    end_lr: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float


@dataclasses.dataclass(frozen=True)
class LoopArgs:
    """How long and how often one network trains (training_loop): typed `config.train`, or
    `config.classifier`'s loop fields."""

    batch_size: int              # global batch, split over every device of every process
    num_steps: int
    log_every: int               # steps between progress lines (and NaN checks)
    checkpoint_every: int
    keep_checkpoints: int = 3
    steps_per_dispatch: int = 1  # updates per jitted call; divides the intervals above
    ema_decay: float = 0.0       # 0: the EMA is the parameters themselves
    ema_warmup: bool = False     # decay min(ema_decay, (1 + t) / (10 + t)) at update t

    def __post_init__(self):
        k = self.steps_per_dispatch
        if k < 1 or any(v % k for v in (self.num_steps, self.log_every, self.checkpoint_every)):
            raise ValueError(f"steps_per_dispatch={k} must divide num_steps, log_every and "
                             f"checkpoint_every: {self}")


@dataclasses.dataclass(frozen=True)
class SampleArgs:
    """Typed `config.sample`; `spec` holds the sampler fields (config_lib.sampler_spec)."""

    spec: SamplerSpec
    num_samples: int
    batch_size: int
    guidance_scale: float
    labels: str
    unconditional: bool
    prompt: str
    prompts: str
    classifier_scale: float
    classifier_workdir: str
    progress_every: int
    use_ema: bool
    seed: int
    sweep_scales: tuple[float, ...]
    sweep_per_class: int


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Typed `config.eval`."""

    use_ema: bool
    seed: int
    batch_size: int
    bpd: bool
    bpd_num_examples: int
    bpd_t_chunk: int
    bpd_condition: str
    bpd_every: int
    bpd_estimate_batches: int
    bpd_estimate_timesteps: int
    fid_num_samples: int
    feature_net: str
    inception_weights: str
    fid_ref_split: str
    fid_ref_num_examples: int
    fid_every: int
    fid_every_num_samples: int
    kid_subset_size: int
    kid_num_subsets: int
    kid_max_features: int
    is_splits: int
    text_num_prompts: int
