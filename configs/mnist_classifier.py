"""configs/mnist.py plus a small noise-aware classifier for classifier guidance on the digits.

The diffusion fields are mnist.py's, so one workdir holds both models:

    python main.py --config=configs/mnist.py --workdir=workdirs/mnist                 # diffusion
    python main.py --config=configs/mnist_classifier.py --workdir=workdirs/mnist \\
        --mode=train_classifier                                     # -> workdirs/mnist/classifier
    python main.py --config=configs/mnist_classifier.py --workdir=workdirs/mnist --mode=sample
"""

import ml_collections

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
    config = mnist.get_config()
    c = config.classifier
    c.num_classes = 10
    c.ch = 32
    c.ch_mult = (1, 2, 2)             # 28 -> 14 -> 7, as the diffusion UNet
    c.num_res_blocks = 1
    c.attn_resolutions = (7,)
    c.num_groups = 8
    c.lr = 1e-3
    c.batch_size = 64
    c.num_steps = 2000
    c.log_every = 50
    c.checkpoint_every = 500

    # Sampling with classifier guidance instead of classifier-free guidance.
    config.sample.guidance_scale = 0.0
    config.sample.classifier_scale = 1.0
    return config
