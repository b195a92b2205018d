"""The DDPM noise-prediction network eps_theta(x_t, t) of Ho et al. (2020), in Flax linen.

A transcription of `diffusion_tf/models/unet.py` (equivalently diffusers' `UNet2DModel` with the
google/ddpm-cifar10-32 config). With the CIFAR-10 settings (ch 128, ch_mult (1, 2, 2, 2),
num_res_blocks 2, attn_resolutions (16,), 32x32x3, out_ch 3) it has 35,746,307 parameters, the
paper's "35.7M" and exactly diffusers' count (asserted in tests/test_unet.py).

The model is conditioned on one pytree `cond` (models/conditioning.py). Three optional
additions read its fields; all are off by default and absent from the parameter tree when off:
* class labels (`num_classes > 0`, cond["label"]): an `nn.Embed(num_classes + 1, 4 ch)` added to
  the timestep embedding, as guided-diffusion / diffusers do; row `num_classes` is the "null"
  label used for classifier-free guidance.
* a pooled embedding (`cond_dim > 0`, cond["pooled"]), e.g. a sentence embedding: `Dense(4 ch)`
  added likewise (GLIDE's and the DDPM material's "text embedding as an extra input").
* text token states (`context_dim > 0`, cond["tokens"] with cond["mask"]): a `CrossAttnBlock`
  after every block at `cross_attn_resolutions` and in the middle (Stable Diffusion / Imagen).

Layout (H = input height, level i works at H / 2^i with ch * ch_mult[i] channels):
  temb  = Dense(4ch)(swish(Dense(4ch)(sinusoid(t, ch)))) [+ label_emb(label)] [+ cond_proj(pooled)]
  down  = conv_in, then per level: num_res_blocks x (ResBlock [+ Attn] [+ CrossAttn]),
          Downsample unless last
  mid   = ResBlock, Attn, [CrossAttn], ResBlock
  up    = per level (reversed): (num_res_blocks + 1) x (ResBlock(concat(h, skip)) [+ Attn]
          [+ CrossAttn]), Upsample unless level 0
  out   = conv_out(swish(norm_out(h)))                            # conv_out zero-initialised

Any input size works: a level of odd size H is downsampled to ceil(H / 2) and upsampled back by
nearest x2 then cropped to H (e.g. 28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28); for sizes that halve
evenly (32 -> 16 -> 8 -> 4, or 28 -> 14 -> 7 with three levels) no crop happens and the network
is DDPM's exactly. `attn_resolutions` refers to feature-map heights (H / 2^i for even halving).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.blocks import AttnBlock, CrossAttnBlock, Downsample, ResBlock, Upsample
from models.layers import Conv3x3, get_timestep_embedding, group_norm, nin, swish


class UNet(nn.Module):
    """DDPM UNet eps_theta(x_t, t [, cond]).

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
      cond_dim: 0 for none; else the width of the pooled embedding cond["pooled"].
      context_dim: 0 for none; else the width D of the token states cond["tokens"] [B, L, D].
      cross_attn_resolutions: feature-map heights at which a CrossAttnBlock follows each block
        (the middle block always has one when context_dim > 0).
      num_heads: heads of the cross-attention.
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
    context_dim: int = 0
    cross_attn_resolutions: tuple[int, ...] = ()
    num_heads: int = 4
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @property
    def cond_fields(self) -> tuple[str, ...]:
        """The fields of `cond` this model reads (models/conditioning.py)."""
        return (("label",) * (self.num_classes > 0) + ("tokens", "mask") * (self.context_dim > 0)
                + ("pooled",) * (self.cond_dim > 0))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: Mapping[str, jax.Array] | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        """Predict eps (or [eps, variance interpolation]) from the noisy image.

        Args:
          x: [B, H, W, C] float noisy images x_t.
          t: [B] int or float timesteps.
          cond: the conditioning pytree (models/conditioning.py) or None:
            "label" [B] int in [0, num_classes] (num_classes = null label); absent with
              num_classes > 0 means "all null" (the unconditional branch of CFG);
            "pooled" [B, cond_dim]; absent with cond_dim > 0 means a zero vector (only the
              projection bias is added);
            "tokens" [B, L, context_dim] and "mask" [B, L] bool: required when context_dim > 0.
          train: enables dropout (rng collection "dropout").

        Returns:
          [B, H, W, out_ch] float32.
        """
        cond = dict(cond or {})
        self._check_inputs(x, t, cond)
        y, pooled = cond.get("label"), cond.get("pooled")
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
            if pooled is None:
                pooled = jnp.zeros((batch, self.cond_dim), jnp.float32)
            temb = temb + nin(temb_ch, self.dtype, "cond_proj")(pooled)

        def cross_attn(h: jax.Array, name: str) -> jax.Array:
            """h, attending to the text tokens where cross-attention is configured."""
            if not self.context_dim:
                return h
            block = CrossAttnBlock(self.num_heads, self.num_groups, self.dtype, name=name)
            return block(h, cond["tokens"], cond["mask"])

        # Downsampling: hs collects every skip connection.
        hs = [Conv3x3(self.ch, dtype=self.dtype, name="conv_in")(x)]
        for i_level in range(num_levels):
            for i_block in range(self.num_res_blocks):
                out_ch = self.ch * self.ch_mult[i_level]
                h = resnet(out_ch, f"down_{i_level}_block_{i_block}")(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{i_level}_attn_{i_block}")(h)
                if h.shape[1] in self.cross_attn_resolutions:
                    h = cross_attn(h, f"down_{i_level}_cross_attn_{i_block}")
                hs.append(h)
            if i_level != num_levels - 1:
                name = f"down_{i_level}_downsample"
                hs.append(Downsample(self.resamp_with_conv, self.dtype, name=name)(hs[-1]))

        # Middle.
        h = hs[-1]
        h = resnet(h.shape[-1], "mid_block_1")(h, temb, train)
        h = attn("mid_attn_1")(h)
        h = cross_attn(h, "mid_cross_attn_1")
        h = resnet(h.shape[-1], "mid_block_2")(h, temb, train)

        # Upsampling: each ResBlock consumes one skip, popped in reverse order.
        for i_level in reversed(range(num_levels)):
            for i_block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                out_ch = self.ch * self.ch_mult[i_level]
                h = resnet(out_ch, f"up_{i_level}_block_{i_block}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{i_level}_attn_{i_block}")(h)
                if h.shape[1] in self.cross_attn_resolutions:
                    h = cross_attn(h, f"up_{i_level}_cross_attn_{i_block}")
            if i_level != 0:
                h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{i_level}_upsample")(
                    h, hs[-1].shape[1:3]
                )
        assert not hs, "every skip connection must be consumed"

        # End.
        h = group_norm(self.num_groups, self.dtype, "norm_out", swish=True)(h)
        h = Conv3x3(self.out_ch, init_scale=0.0, dtype=self.dtype, name="conv_out")(h)
        return h.astype(jnp.float32)

    def _check_inputs(self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array]) -> None:
        """Fail at trace time, naming the bad input, rather than deep inside a layer."""
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}.")
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [B]=({batch},), got {t.shape}.")
        accepted = {"label": self.num_classes > 0, "pooled": self.cond_dim > 0,
                    "tokens": self.context_dim > 0, "mask": self.context_dim > 0}
        for name in cond:
            if name not in accepted:
                raise ValueError(f"Unknown cond field {name!r}; the fields are {list(accepted)}.")
            if not accepted[name]:
                width = {"label": "num_classes", "pooled": "cond_dim"}.get(name, "context_dim")
                raise ValueError(f"Got cond[{name!r}] but {width}=0; set {width} to use it.")
        y = cond.get("label")
        if y is not None and (y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer)):
            raise ValueError(f"cond['label'] must be int [B]=({batch},), got {y.dtype}{y.shape}.")
        pooled = cond.get("pooled")
        if pooled is not None and pooled.shape != (batch, self.cond_dim):
            raise ValueError(f"cond['pooled'] must have shape [B, cond_dim]=({batch}, "
                             f"{self.cond_dim}), got {pooled.shape}.")
        if self.context_dim:
            tokens, mask = cond.get("tokens"), cond.get("mask")
            if tokens is None or mask is None:
                raise ValueError("context_dim > 0: cond needs 'tokens' [B, L, D] and 'mask' "
                                 "[B, L] (a text encoder's output).")
            if tokens.ndim != 3 or tokens.shape[::2] != (batch, self.context_dim):
                raise ValueError(f"cond['tokens'] must be [B, L, context_dim]=({batch}, L, "
                                 f"{self.context_dim}), got {tokens.shape}.")
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"cond['mask'] must be [B, L]={tokens.shape[:2]}, got "
                                 f"{mask.shape}.")
