"""A seconds-long configuration for tests and smoke runs (any dataset via --config.data.*)."""

import ml_collections

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
    config = mnist.get_config()
    for net in (config.model, config.classifier):  # the UNet and the noise-aware classifier
        net.ch = 8
        net.ch_mult = (1,)  # one resolution: the smallest programs to compile (tests)
        net.num_res_blocks = 1
        net.attn_resolutions = ()
        net.num_groups = 4
    # Tests pin behaviour on these; they do not follow mnist.py's demo recipe.
    config.diffusion.num_timesteps = 100
    config.diffusion.schedule = "linear"
    config.diffusion.prediction = "eps"
    config.diffusion.weighting = "none"
    config.optim.lr = 1e-3
    config.train.ema_warmup = False
    config.sample.sampler = "ancestral"
    config.optim.warmup_steps = 2
    config.train.batch_size = 16
    config.train.num_steps = 6
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.sample_every = 0
    config.train.sample_num_steps = 5
    config.sample.num_samples = 16
    config.sample.batch_size = 16
    config.sample.num_steps = 5
    config.sample.guidance_scale = 0.0
    config.classifier.batch_size = 16
    config.classifier.num_steps = 4
    config.classifier.log_every = 2
    config.classifier.checkpoint_every = 2
    return config
