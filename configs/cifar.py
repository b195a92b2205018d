"""CIFAR-10 exactly as Ho et al. 2020 trained it (35.7M-parameter UNet, 800k steps).

    python main.py --config=configs/cifar.py --workdir=workdirs/cifar
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    # Every field of the paper's setting is the base default; name them here so the
    # paper setting reads in one place.
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"
    config.diffusion.var_type = "fixed_large"
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    config.train.batch_size = 128
    config.train.num_steps = 800_000
    config.train.ema_decay = 0.9999
    config.model.dropout = 0.1
    return config


def get_hyper() -> list[dict]:
    """A sweep: one dict of dotted overrides per run (`--config.optim.lr=...` on the CLI)."""
    return [
            {"optim.lr": lr, "diffusion.schedule": schedule}
            for lr in (1e-4, 2e-4)
            for schedule in ("linear", "cosine")
    ]
