"""Primitive layers shared by the DDPM UNet and the noise-aware classifier.

Everything here mirrors `diffusion_tf/nn.py` and `diffusion_tf/models/unet.py` of Ho et al. (2020):

* `default_init(scale)`: variance_scaling(scale, "fan_avg", "uniform"); `scale=0` means 1e-10,
  DDPM's "zero" initialisation (tiny but not exactly zero).
* `get_timestep_embedding`: the transformer sinusoid, first half sin, second half cos.
* `Conv3x3`: *every* 3x3 convolution of the models goes through this module, so a faster CPU
  formulation (e.g. im2col + matmul) can be swapped in here without touching the networks. It
  owns its parameters (`kernel` [3, 3, Cin, Cout], `bias` [Cout]) so the parameter tree stays
  `.../conv1/kernel` like DDPM's checkpoints, whatever the implementation. The one exception,
  `UpsampleConv3x3`, is nearest x2 upsampling + the same 3x3 conv in a faster exact form.
* `group_norm`: DDPM's `normalize` (32 groups, eps 1e-6), statistics always in float32;
  `swish=True` gives `nonlinearity(normalize(x))` as one layer.
* `swish`: DDPM's `nonlinearity`, x * sigmoid(x), in a form XLA-CPU fuses well.
* `nin`: DDPM's 1x1 "network-in-network" layer, a Dense over the channel axis.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = jax.nn.initializers.Initializer


def default_init(scale: float = 1.0) -> Initializer:
    """DDPM's `default_init`: uniform variance scaling with fan_avg; `scale=0` -> 1e-10."""
    return nn.initializers.variance_scaling(
        1e-10 if scale == 0 else scale, mode="fan_avg", distribution="uniform"
    )


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
    """Sinusoidal timestep embedding exactly as DDPM (`diffusion_tf/nn.py`).

    emb[b, i]          = sin(t_b * 10000^(-i / (half - 1))),  i < half = embedding_dim // 2
    emb[b, half + i]   = cos(t_b * 10000^(-i / (half - 1)))
    (a zero column is appended when embedding_dim is odd).

    Args:
      timesteps: [B] int or float timesteps.
      embedding_dim: width D of the embedding (>= 4 so that half - 1 > 0).

    Returns:
      [B, D] float32; always float32 because t up to ~1000 must not be rounded to bfloat16.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {timesteps.shape}.")
    if embedding_dim < 4:
        raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}.")
    half_dim = embedding_dim // 2
    freq = math.log(10000) / (half_dim - 1)
    freq = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -freq)  # [half]
    args = timesteps.astype(jnp.float32)[:, None] * freq[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)  # [B, 2 * half]
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Conv3x3(nn.Module):
    """3x3 convolution, NHWC, with DDPM's padding.

    stride 1: pad 1 on every side (output size = input size).
    stride 2: TensorFlow "SAME" padding as DDPM's downsample: for even H the pad is (0, 1), i.e.
      only bottom/right, so out = H / 2 (diffusers pads (0, 1, 0, 1) explicitly, same result);
      for odd H it is (1, 1) and out = (H + 1) / 2.

    Attributes:
      features: output channels Cout.
      strides: 1 or 2 (both spatial axes).
      init_scale: `default_init` scale of the kernel; 0 gives DDPM's zero init (1e-10).
      dtype: compute dtype; parameters are stored in float32.
    """

    features: int
    strides: int = 1
    init_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, H', W', Cout] in `dtype` (H' = H for stride 1, ceil(H/2) for 2)."""
        if self.strides not in (1, 2):
            raise ValueError(f"Conv3x3 supports strides 1 or 2, got {self.strides}.")
        kernel, bias = _conv3x3_params(self, x.shape[-1], self.features, self.init_scale)
        padding = ((1, 1), (1, 1)) if self.strides == 1 else "SAME"
        y = _conv(x.astype(self.dtype), kernel.astype(self.dtype), padding, self.strides)
        return y + bias.astype(self.dtype)


class UpsampleConv3x3(nn.Module):
    """Nearest-neighbour x2 upsampling followed by `Conv3x3` (stride 1), with Conv3x3's parameters.

    For an exact doubling (out_hw = (2H, 2W)) the conv is computed in sub-pixel form: output pixel
    (2i + a, 2j + b) only sees input pixels i - 1 + a .. i + a (rows) and j - 1 + b .. j + b
    (columns), so each of the four phases (a, b) is a 2x2 conv of the low-resolution input with
    taps summed from the 3x3 kernel, e.g. rows (k0, k1 + k2) for a = 0, (k0 + k1, k2) for a = 1.
    Same arithmetic up to rounding, 4/9 of the multiply-adds, and the 4x larger upsampled tensor
    is never written: 2.2x faster forward and 2x with gradients on XLA-CPU at the small UNet's
    shapes. Odd targets (2H - 1, a crop before the conv) take the direct route.

    Attributes:
      features: output channels Cout.
      dtype: compute dtype; parameters are stored in float32.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
        """[B, H, W, Cin] -> [B, out_hw[0], out_hw[1], Cout] in `dtype`."""
        batch, hgt, wid, _ = x.shape
        kernel, bias = _conv3x3_params(self, x.shape[-1], self.features, 1.0)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)

        if tuple(out_hw) != (2 * hgt, 2 * wid):
            up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, : out_hw[0], : out_hw[1]]
            return _conv(up, kernel, ((1, 1), (1, 1))) + bias.astype(self.dtype)

        def fold(k, axis, phase):  # 3 taps along `axis` -> the 2 taps phase 0 or 1 sees
            k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
            pair = (k0, k1 + k2) if phase == 0 else (k0 + k1, k2)
            return jnp.stack(pair, axis=axis)

        rows = []
        for a in range(2):
            cols = []
            for b in range(2):
                k = fold(fold(kernel, 0, a), 1, b)  # [2, 2, Cin, Cout]
                # Padding (1 - a, a) makes output i read input rows i - 1 + a and i + a.
                cols.append(_conv(x, k, ((1 - a, a), (1 - b, b))))
            rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (b), Cout]
        y = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), Cout]
        return y.reshape(batch, 2 * hgt, 2 * wid, self.features) + bias.astype(self.dtype)


def _conv3x3_params(module: nn.Module, in_features: int, features: int,
                    init_scale: float) -> tuple[jax.Array, jax.Array]:
    """The float32 `kernel` [3, 3, Cin, Cout] and `bias` [Cout] of a 3x3 conv module."""
    kernel = module.param(
        "kernel", default_init(init_scale), (3, 3, in_features, features), jnp.float32
    )
    bias = module.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return kernel, bias


def _conv(x: jax.Array, kernel: jax.Array, padding, strides: int = 1) -> jax.Array:
    """NHWC x HWIO convolution without bias."""
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class GroupNorm(nn.Module):
    """DDPM's `normalize`: GroupNorm over (spatial, C/groups) with float32 statistics.

    Same parameters (`scale`, `bias` [C], float32) and the same numerics as `flax.linen.GroupNorm`
    (one-pass E[x^2] - E[x]^2 variance, clamped at 0, as flax's default `use_fast_variance`), but
    the statistics are taken as two reductions over the spatial axis of a [B, HW, C] view followed
    by a tiny per-group sum. XLA-CPU runs flax's reduction over the 5-D [B, H, W, G, C/G] view
    ~4x slower forward and backward; this formulation is what lets the UNet beat PyTorch on CPU.

    Attributes:
      num_groups: G; must divide the channel count.
      epsilon: added to the variance.
      dtype: dtype of the output; statistics and the affine map are computed in float32.
      swish: return swish(GroupNorm(x)) (DDPM's pairing), with the 1/2 of `swish` folded into
        the per-channel affine map, so the full-size tensor sees no constant at all.
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    swish: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, ..., C] -> same shape in `dtype`."""
        batch, channels = x.shape[0], x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: num_groups={self.num_groups} does not divide {channels} channels."
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        per_group = channels // self.num_groups
        xf = x.astype(jnp.float32)
        flat = xf.reshape(batch, -1, channels)
        count = flat.shape[1] * per_group

        def group_mean(v: jax.Array) -> jax.Array:  # [B, C] channel sums -> [B, G] group means
            return v.reshape(batch, self.num_groups, per_group).sum(-1) / count

        mean = group_mean(jnp.sum(flat, axis=1))
        var = jnp.maximum(group_mean(jnp.sum(jnp.square(flat), axis=1)) - jnp.square(mean), 0.0)
        inv = jax.lax.rsqrt(var + self.epsilon)
        # y = x * a + c per (batch, channel): a = scale / std, c = bias - mean * a.
        a = jnp.repeat(inv, per_group, axis=1) * scale
        c = bias - jnp.repeat(mean, per_group, axis=1) * a
        bshape = (batch,) + (1,) * (x.ndim - 2) + (channels,)
        if self.swish:  # swish of y = x a + c, from h = y / 2 computed directly
            h = xf * (0.5 * a).reshape(bshape) + (0.5 * c).reshape(bshape)
            return _swish_of_half(h).astype(self.dtype)
        return (xf * a.reshape(bshape) + c.reshape(bshape)).astype(self.dtype)


def group_norm(num_groups: int, dtype: jnp.dtype, name: str, swish: bool = False) -> GroupNorm:
    """DDPM's `normalize`: GroupNorm over (H, W, C/groups), eps 1e-6, float32 statistics.

    swish=True: DDPM's `nonlinearity(normalize(x))` as one layer (see GroupNorm.swish).
    """
    return GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype, swish=swish, name=name)


def swish(x: jax.Array) -> jax.Array:
    """DDPM's `nonlinearity`, x * sigmoid(x), as h + h * tanh(h) with h = x / 2.

    The same function as `jax.nn.silu` (sigmoid(x) = (1 + tanh(x / 2)) / 2): float32 error below
    3e-6 absolute everywhere (silu's own: 1.3e-6; below x = -16, where swish is smaller than 2e-6,
    it and its gradient round to 0), and no exp overflow anywhere. Written this way, and without
    `jax.nn.silu`'s own jit boundary, XLA-CPU's YNNPACK fusions take GroupNorm + swish + the next
    3x3 convolution as one fusion; with `1 / (1 + exp(-x))` the constant 1 became a full-size
    tensor written in memory for every activation shape. Measured in the README.
    """
    return _swish_of_half(0.5 * x)


def _swish_of_half(h: jax.Array) -> jax.Array:
    """swish(2 h) = h + h tanh(h): `swish` and `GroupNorm(swish=True)` both end here."""
    return h + h * jnp.tanh(h)


def nin(features: int, dtype: jnp.dtype, name: str, init_scale: float = 1.0) -> nn.Dense:
    """DDPM's `nin` (1x1 conv) and `dense`: a Dense on the last axis with `default_init`."""
    return nn.Dense(
        features,
        kernel_init=default_init(init_scale),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )
