"""The DDPM paper's 256x256 model (LSUN church / bedroom / cat, CelebA-HQ; Ho et al. 2020,
Appendix B): ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 16x16, dropout 0,
batch 64, Adam 2e-5; 113.7M parameters (the paper's "114M"; = diffusers' UNet2DModel of
google/ddpm-church-256, tests/test_configs.py).

    python main.py --config=configs/lsun256.py --workdir=workdirs/church     # tfds lsun
    python main.py --config=configs/lsun256.py --workdir=workdirs/celebahq \
        --config.data.name=folder --config.data.path=celeba_hq_256 --config.train.num_steps=500000
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "lsun/church_outdoor"  # JPEGs with a shorter side of 256
    config.data.split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 256
    config.data.crop = "center"
    config.data.random_flip = True
    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.optim.lr = 2e-5           # "lowered to 2e-5 for the 256x256 images"
    config.train.batch_size = 64
    config.train.num_steps = 1_200_000  # church; bedroom 2.4M, cat 1.8M, CelebA-HQ 0.5M
    return config
