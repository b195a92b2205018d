"""The embedded default: 5,000 real MNIST digits that ship offline, class-conditional.

Sized so that `make demo` trains and samples in minutes on a 2-core laptop CPU.

    python main.py --config=configs/mnist.py --workdir=workdirs/mnist
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "mnist_5k"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.random_flip = False    # flipped digits are not digits

    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)   # 28 -> 14 -> 7
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0
    config.model.num_groups = 8
    config.model.num_classes = 10

    config.diffusion.p_uncond = 0.1    # learn ε(x, ∅) too, for classifier-free guidance

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100

    config.train.batch_size = 64
    config.train.num_steps = 700
    config.train.ema_decay = 0.995
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.train.sample_every = 350
    config.train.sample_num_steps = 50

    config.sample.num_samples = 100    # 10 rows of 10: one row per digit
    config.sample.batch_size = 100
    config.sample.num_steps = 100      # respaced ancestral sampling
    config.sample.guidance_scale = 1.0

    config.eval.feature_net = "mnist_classifier"  # "MNIST-FID": not comparable with Inception FID
    config.eval.fid_num_samples = 1000
    config.eval.fid_ref_split = "train"
    return config
