"""The DDPM noise-prediction network eps_theta(x_t, t) of Ho et al. (2020), in Flax linen.

A transcription of `diffusion_tf/models/unet.py` (equivalently diffusers' `UNet2DModel` with the
google/ddpm-cifar10-32 config). With the CIFAR-10 settings (ch 128, ch_mult (1, 2, 2, 2),
num_res_blocks 2, attn_resolutions (16,), 32x32x3, out_ch 3) it has 35,746,307 parameters, the
paper's "35.7M" and exactly diffusers' count (asserted in tests/test_unet.py).

Two optional additions, both off by default and absent from the parameter tree when off:
* class labels (`num_classes > 0`): an `nn.Embed(num_classes + 1, 4 ch)` added to the timestep
  embedding, as guided-diffusion / diffusers do; row `num_classes` is the "null" label used for
  classifier-free guidance.
* a conditioning vector (`cond_dim > 0`), e.g. a text embedding: `Dense(4 ch)` added likewise.

Layout (H = input height, level i works at H / 2^i with ch * ch_mult[i] channels):
  temb  = Dense(4ch)(swish(Dense(4ch)(sinusoid(t, ch)))) [+ label_emb(y)] [+ cond_proj(cond)]
  down  = conv_in, then per level: num_res_blocks x (ResBlock [+ Attn]), Downsample unless last
  mid   = ResBlock, Attn, ResBlock
  up    = per level (reversed): (num_res_blocks + 1) x (ResBlock(concat(h, skip)) [+ Attn]),
          Upsample unless level 0
  out   = conv_out(swish(norm_out(h)))                            # conv_out zero-initialised

Any input size works: a level of odd size H is downsampled to ceil(H / 2) and upsampled back by
nearest x2 then cropped to H (e.g. 28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28); for sizes that halve
evenly (32 -> 16 -> 8 -> 4, or 28 -> 14 -> 7 with three levels) no crop happens and the network
is DDPM's exactly. `attn_resolutions` refers to feature-map heights (H / 2^i for even halving).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.blocks import AttnBlock, Downsample, ResBlock, Upsample
from models.layers import Conv3x3, get_timestep_embedding, group_norm, nin, swish


class UNet(nn.Module):
    """DDPM UNet eps_theta(x_t, t [, y] [, cond]).

    Attributes:
      ch: base channel count; the timestep embedding is 4 * ch wide.
      out_ch: output channels (C to predict eps; 2C when the variance is learned too).
      ch_mult: channel multiplier per resolution level; len(ch_mult) levels, all but the last
        followed by a downsample.
      num_res_blocks: ResBlocks per level on the way down (num_res_blocks + 1 on the way up).
      attn_resolutions: feature-map heights at which an AttnBlock follows each ResBlock (the
        middle block always has one).
      dropout: dropout rate inside the ResBlocks, active only when train=True.
      resamp_with_conv: strided / post-upsampling 3x3 convs (True) or plain avg-pool / nearest.
      num_groups: GroupNorm groups; must divide every channel count (ch * m for m in ch_mult).
      num_classes: 0 for unconditional; else labels in [0, num_classes], num_classes = "null".
      cond_dim: 0 for none; else the width of the conditioning vector `cond`.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters are always float32.
      remat: rematerialise the ResBlocks (recompute activations in the backward pass).
    """

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    num_classes: int = 0
    cond_dim: int = 0
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        cond: jax.Array | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        """Predict eps (or [eps, variance interpolation]) from the noisy image.

        Args:
          x: [B, H, W, C] float noisy images x_t.
          t: [B] int or float timesteps.
          y: [B] int labels in [0, num_classes] (num_classes = null label), or None. With
            num_classes > 0, None means "all null" (the unconditional branch of CFG).
          cond: [B, cond_dim] conditioning vectors, or None. With cond_dim > 0, None means a zero
            vector (only the projection bias is added).
          train: enables dropout (rng collection "dropout").

        Returns:
          [B, H, W, out_ch] float32.
        """
        self._check_inputs(x, t, y, cond)
        batch = x.shape[0]
        num_levels = len(self.ch_mult)
        temb_ch = 4 * self.ch
        res_block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

        def resnet(out_ch: int, name: str) -> nn.Module:
            return res_block(out_ch, self.dropout, self.num_groups, self.dtype, name=name)

        def attn(name: str) -> AttnBlock:
            return AttnBlock(self.num_groups, self.dtype, name=name)

        # Timestep (+ label, + conditioning) embedding, [B, 4 ch].
        temb = get_timestep_embedding(t, self.ch)
        temb = nin(temb_ch, self.dtype, "temb_dense0")(temb)
        temb = nin(temb_ch, self.dtype, "temb_dense1")(swish(temb))
        if self.num_classes > 0:
            if y is None:
                y = jnp.full((batch,), self.num_classes, jnp.int32)
            # N(0, 1) rows as torch.nn.Embedding in guided-diffusion / diffusers.
            temb = temb + nn.Embed(
                self.num_classes + 1,
                temb_ch,
                embedding_init=nn.initializers.normal(1.0),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="label_emb",
            )(y)
        if self.cond_dim > 0:
            if cond is None:
                cond = jnp.zeros((batch, self.cond_dim), jnp.float32)
            temb = temb + nin(temb_ch, self.dtype, "cond_proj")(cond)

        # Downsampling: hs collects every skip connection.
        hs = [Conv3x3(self.ch, dtype=self.dtype, name="conv_in")(x)]
        for i_level in range(num_levels):
            for i_block in range(self.num_res_blocks):
                out_ch = self.ch * self.ch_mult[i_level]
                h = resnet(out_ch, f"down_{i_level}_block_{i_block}")(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{i_level}_attn_{i_block}")(h)
                hs.append(h)
            if i_level != num_levels - 1:
                name = f"down_{i_level}_downsample"
                hs.append(Downsample(self.resamp_with_conv, self.dtype, name=name)(hs[-1]))

        # Middle.
        h = hs[-1]
        h = resnet(h.shape[-1], "mid_block_1")(h, temb, train)
        h = attn("mid_attn_1")(h)
        h = resnet(h.shape[-1], "mid_block_2")(h, temb, train)

        # Upsampling: each ResBlock consumes one skip, popped in reverse order.
        for i_level in reversed(range(num_levels)):
            for i_block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                out_ch = self.ch * self.ch_mult[i_level]
                h = resnet(out_ch, f"up_{i_level}_block_{i_block}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{i_level}_attn_{i_block}")(h)
            if i_level != 0:
                h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{i_level}_upsample")(
                    h, hs[-1].shape[1:3]
                )
        assert not hs, "every skip connection must be consumed"

        # End.
        h = group_norm(self.num_groups, self.dtype, "norm_out", swish=True)(h)
        h = Conv3x3(self.out_ch, init_scale=0.0, dtype=self.dtype, name="conv_out")(h)
        return h.astype(jnp.float32)

    def _check_inputs(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None, cond: jax.Array | None
    ) -> None:
        """Fail at trace time, naming the bad input, rather than deep inside a layer."""
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}.")
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [B]=({batch},), got {t.shape}.")
        if y is not None:
            if self.num_classes == 0:
                raise ValueError("Got labels y but num_classes=0; set num_classes to use labels.")
            if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f"y must be int [B]=({batch},), got {y.dtype}{y.shape}.")
        if cond is not None:
            if self.cond_dim == 0:
                raise ValueError("Got cond but cond_dim=0; set cond_dim to use conditioning.")
            if cond.shape != (batch, self.cond_dim):
                raise ValueError(
                    f"cond must have shape [B, cond_dim]=({batch}, {self.cond_dim}), "
                    f"got {cond.shape}."
                )
