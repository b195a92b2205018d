"""The data as the diffusion model sees it: the shape of model space and the maps to and from it.

Pixel space, the only space today: a uint8 value v becomes x = v / 127.5 − 1 ∈ [−1, 1], and a
model output x becomes the uint8 round((x + 1) · 127.5) clipped to [0, 255] (what sample files
hold and FID and the figures judge). The trainer (its batches: `training_loop.Task.encode`),
sampler, evaluators and figures take a `DataSpec` (`run_args.DataArgs.spec`). The maps
themselves, `encode_pixels` and `decode_pixels`, serve code that means pixels whatever the
model's space: the feature networks (FID, the MNIST classifier), the figures of the data alone,
and the likelihood bound (its discretized decoder is over 8-bit pixels).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from images import ImageSpec


def encode_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 v / 127.5 − 1 in [−1, 1] (one float32 copy, then in
    place: no more batch-sized temporaries)."""
    x = np.asarray(images).astype(np.float32)
    np.divide(x, 127.5, out=x)
    np.subtract(x, 1.0, out=x)
    return x


def decode_pixels(x) -> np.ndarray:
    """float [..., H, W, C] in [−1, 1] -> uint8 round((x + 1) · 127.5), clipped to [0, 255]."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Dataset images (`image`: uint8 [size, size, channels]) <-> the model's space (`shape`).

    The one place that says what a model sees of the data, so a latent-diffusion model changes
    only this: its encode/decode would be an autoencoder's and `shape` the latent's. Here model
    space is pixel space: `shape` is the image's and encode/decode are the pixel maps.
    """

    image: ImageSpec

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one example in model space: x_T, the network's input and output."""
        return self.image.shape

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, size, size, channels] -> float32 [N, *shape] (`encode_pixels`)."""
        return encode_pixels(images)

    def decode(self, x) -> np.ndarray:
        """Model-space [N, *shape] -> uint8 images [N, size, size, channels] (`decode_pixels`)."""
        return decode_pixels(x)
