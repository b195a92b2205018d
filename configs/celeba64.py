"""CelebA at 64x64: the DDIM paper's CelebA model (ch 128, ch_mult (1, 2, 2, 2, 4), attention at
16x16, dropout 0.1) trained with the DDPM recipe.

    python main.py --config=configs/celeba64.py --workdir=workdirs/celeba64   # tfds celeb_a
    python main.py --config=configs/celeba64.py --workdir=workdirs/celeba64 \
        --config.data.name=folder --config.data.path=img_align_celeba        # the aligned JPEGs

The 218x178 photos are resized to 64 on their shorter side and centre-cropped (64x78 -> 64x64):
the whole face with some hair and background, a wider framing than DDIM's 140x140 face crop.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "celeb_a"        # tfds: train / validation / test
    config.data.image_size = 64
    config.data.crop = "center"
    config.data.random_flip = True
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.train.batch_size = 128
    config.train.num_steps = 500_000
    return config
