"""Noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol, 2021).

The network is the DDPM UNet's downsampling half plus its middle block (the same ResBlocks,
conditioned on the timestep, with attention at `attn_resolutions`), followed by guided-diffusion's
`EncoderUNetModel` head with pool="adaptive":

    logits = Dense(num_classes)(mean_{H, W}(swish(norm_out(h))))     # Dense zero-initialised

Guidance uses the gradient of the log-likelihood w.r.t. the noisy input,
`classifier_log_prob_grad`; the sampler scales it by s * Sigma_t (guided-diffusion Alg. 1).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.blocks import AttnBlock, Downsample, ResBlock
from models.layers import Conv3x3, get_timestep_embedding, group_norm, nin, swish


class NoisyClassifier(nn.Module):
    """Timestep-conditioned image classifier on noisy inputs x_t.

    Attributes:
      ch: base channel count; the timestep embedding is 4 * ch wide.
      ch_mult: channel multiplier per resolution level (downsample after all but the last).
      num_res_blocks: ResBlocks per level.
      attn_resolutions: feature-map heights at which an AttnBlock follows each ResBlock (the
        middle block always has one).
      dropout: dropout rate inside the ResBlocks, active only when train=True.
      num_groups: GroupNorm groups; must divide every channel count.
      num_classes: number of classes K of the logits.
      dtype: compute dtype; parameters are always float32.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    num_groups: int = 32
    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
        """x [B, H, W, C] noisy images, t [B] int or float timesteps -> logits [B, K] float32."""
        if x.ndim != 4 or t.shape != (x.shape[0],):
            raise ValueError(f"Expected x [B, H, W, C] and t [B], got {x.shape} and {t.shape}.")
        num_levels = len(self.ch_mult)
        temb_ch = 4 * self.ch

        temb = get_timestep_embedding(t, self.ch)  # [B, ch]
        temb = nin(temb_ch, self.dtype, "temb_dense0")(temb)
        temb = nin(temb_ch, self.dtype, "temb_dense1")(swish(temb))  # [B, 4 ch]

        def resnet(out_ch: int, name: str) -> ResBlock:
            return ResBlock(out_ch, self.dropout, self.num_groups, self.dtype, name=name)

        def attn(name: str) -> AttnBlock:
            return AttnBlock(self.num_groups, self.dtype, name=name)

        h = Conv3x3(self.ch, dtype=self.dtype, name="conv_in")(x)
        for i_level in range(num_levels):
            for i_block in range(self.num_res_blocks):
                out_ch = self.ch * self.ch_mult[i_level]
                h = resnet(out_ch, f"down_{i_level}_block_{i_block}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{i_level}_attn_{i_block}")(h)
            if i_level != num_levels - 1:
                h = Downsample(True, self.dtype, name=f"down_{i_level}_downsample")(h)

        h = resnet(h.shape[-1], "mid_block_1")(h, temb, train)
        h = attn("mid_attn_1")(h)
        h = resnet(h.shape[-1], "mid_block_2")(h, temb, train)

        h = group_norm(self.num_groups, self.dtype, "norm_out", swish=True)(h)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # [B, C]: adaptive average pool
        logits = nin(self.num_classes, jnp.float32, "head", init_scale=0.0)(h)
        return logits  # [B, K] float32


def classifier_log_prob_grad(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    x_t: jax.Array,
    t: jax.Array,
    y: jax.Array,
) -> jax.Array:
    """grad_x sum_b log p_phi(y_b | x_t[b], t_b), the classifier-guidance direction.

    Each sample's log-probability depends only on its own input, so the gradient of the batch
    sum is the per-sample gradient, stacked.

    Args:
      apply_fn: the classifier's `apply`, called as
        `apply_fn({"params": params}, x, t, train=False) -> logits [B, K]` (e.g.
        `NoisyClassifier(...).apply` or a flax TrainState's `apply_fn`).
      params: the classifier's "params" collection.
      x_t: [B, H, W, C] noisy images.
      t: [B] timesteps.
      y: [B] int target classes.

    Returns:
      [B, H, W, C] gradient, same dtype as x_t.
    """

    def total_log_prob(x: jax.Array) -> jax.Array:
        logits = apply_fn({"params": params}, x, t, train=False).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, K]
        return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

    return jax.grad(total_log_prob)(x_t)
