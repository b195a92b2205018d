"""Base configuration: every field, its legal values, and the DDPM defaults.

Experiment configs start from `get_config()` here and override a few fields:

    config = default.get_config()
    config.train.batch_size = 512

Any field can be overridden on the command line: `--config.optim.lr=1e-4`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # --- data -----------------------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"          # "mnist_5k" (offline, embedded) or any tfds image dataset name
    data.split = "train"           # tfds split string, or "train"/"test" for mnist_5k
    data.eval_split = "test"
    data.data_dir = ""             # tfds data_dir; "" = tfds default (~/tensorflow_datasets)
    data.image_size = 32           # images must already have this size (no resizing)
    data.num_channels = 3
    data.random_flip = True        # random horizontal flip (DDPM CIFAR-10); False for digits

    # --- model: models.UNet ---------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.num_groups = 32          # GroupNorm groups; must divide every level's channel count
    model.num_classes = 0          # 0 = unconditional; else labels 0..n-1 plus a null label n
    model.cond_dim = 0             # 0 = none; else a conditioning vector (e.g. a text embedding)
    model.dtype = "float32"        # compute dtype: "float32" | "bfloat16" (params stay float32)
    model.remat = False            # rematerialise res blocks to save memory

    # --- diffusion ------------------------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"    # "linear" | "cosine" | "sigmoid"
    diffusion.num_timesteps = 1000
    diffusion.prediction = "eps"     # "eps" | "x0" | "v"
    diffusion.var_type = "fixed_large"  # "fixed_large" | "fixed_small" | "learned_range"
    diffusion.loss_type = "simple"   # "simple" | "hybrid" | "vlb"
    diffusion.vlb_weight = 0.001     # λ of the hybrid loss (iDDPM)
    diffusion.weighting = "none"     # "none" | "min_snr"
    diffusion.min_snr_gamma = 5.0
    diffusion.p_uncond = 0.0         # classifier-free guidance: label dropout to the null label

    # --- optimiser: Adam with linear warmup and global-norm clipping ----------------------------
    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup_steps = 5000
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.grad_clip = 1.0            # global-norm clipping; 0 = off

    # --- training loop --------------------------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 128           # global batch, split over all devices of all processes
    train.num_steps = 800_000
    train.ema_decay = 0.9999
    train.steps_per_dispatch = 1     # updates per jitted call (lax.scan); divides every interval
    train.log_every = 100
    train.checkpoint_every = 5000
    train.keep_checkpoints = 3
    train.sample_every = 0           # 0 = never; else write a sample grid to TensorBoard
    train.sample_num_steps = 100     # respaced ancestral steps for the periodic grids

    # --- sampling: --mode=sample -----------------------------------------------------------------
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_samples = 64
    sample.batch_size = 64           # per call; a multiple of the device count
    sample.sampler = "ancestral"     # "ancestral" | "ddim"
    sample.num_steps = 0             # 0 = all num_timesteps; else respaced to this many steps
    sample.eta = 0.0                 # DDIM η (0 = deterministic)
    sample.clip_x0 = True
    sample.guidance_scale = 0.0      # classifier-free guidance w (0 = plain conditional)
    sample.use_ema = True
    sample.seed = 0
    return config
