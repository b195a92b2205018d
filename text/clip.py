"""The CLIP text transformer (OpenAI CLIP's text tower) in Flax, with its ViT-B/32 and ViT-L/14
configurations.

  x_0 = E_tok[ids] + P[0..L-1]                      learned position embeddings P [77, D]
  x_i = pre-LN transformer block (D / 64 heads, MLP 4D, quick_gelu, LN eps 1e-5), i = 1..12,
        causal: token l attends to tokens <= l (no padding mask: padding comes after the end
        token, which is all the pooled vector reads)
  tokens = LN_final(x_12) (0 where mask is False)    [N, L, D]
  eot    = LN_final(x_12)[n, argmax_l ids[n, l]]     the end-of-text token (the largest id;
                                                     HF `pooler_output`, open_clip's "argmax")
  pooled = eot W_proj                                [N, P]  (HF `text_embeds`, not normalised)

Weights: a `.npz` of plain float32 arrays under Hugging Face's names and layouts
("text_model.encoder.layers.0.self_attn.q_proj.weight" [out, in], ..., "text_projection.weight"
[P, D]) plus a "config" JSON string, written by `python -m text.convert_clip` from a Hugging
Face or open_clip safetensors checkpoint (see that module and the README); read with
allow_pickle=False.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from errors import UserError
from text import transformer

DEFAULT_WEIGHTS = os.path.join("~", ".cache", "ddpm_jax", "clip_text.npz")
DEFAULT_MAX_LENGTH = 77
SOURCES = {  # what the user downloads, and from where (README "Text encoders")
    "vit-b-32": "model.safetensors of https://huggingface.co/openai/clip-vit-base-patch32",
    "vit-l-14": "model.safetensors of https://huggingface.co/openai/clip-vit-large-patch14",
}


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    mlp_width: int = 2048
    projection_dim: int = 512
    vocab_size: int = 49408
    context_length: int = 77
    activation: str = "quick_gelu"  # quick_gelu (OpenAI weights, *-quickgelu) | gelu (LAION ...)


CONFIGS = {
    "vit-b-32": ClipTextConfig(),
    "vit-l-14": ClipTextConfig(width=768, num_heads=12, mlp_width=3072, projection_dim=768),
}


class ClipText(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        """ids int [N, L] (L <= context_length), mask bool [N, L] ->
        {"tokens": [N, L, D], "eot": [N, D], "pooled": [N, P]}."""
        c = self.config
        n, length = ids.shape
        positions = self.param("position_embedding", nn.initializers.normal(0.01),
                               (c.context_length, c.width))
        x = nn.Embed(c.vocab_size, c.width, name="token_embedding")(ids) + positions[:length]
        causal = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
        for i in range(c.num_layers):
            x = transformer.TransformerBlock(c.num_heads, c.mlp_width, c.activation,
                                             pre_norm=True, layer_norm_eps=1e-5,
                                             name=f"layer_{i}")(x, causal)
        x = nn.LayerNorm(epsilon=1e-5, name="final_layer_norm")(x)
        eot = x[jnp.arange(n), jnp.argmax(ids, axis=-1)]
        pooled = nn.Dense(c.projection_dim, use_bias=False, name="text_projection")(eot)
        return {"tokens": x * mask[..., None].astype(x.dtype), "eot": eot, "pooled": pooled}


def abstract_params(config: ClipTextConfig) -> dict:
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
    return jax.eval_shape(ClipText(config).init, jax.random.key(0), ids, mask)["params"]


def hf_to_flax(arrays: dict[str, np.ndarray], num_layers: int) -> dict:
    """Our parameter tree from HF `CLIPTextModelWithProjection` state_dict names."""
    t, m = transformer, "text_model"
    params = {
        "token_embedding": {"embedding": arrays[f"{m}.embeddings.token_embedding.weight"]},
        "position_embedding": arrays[f"{m}.embeddings.position_embedding.weight"],
        "final_layer_norm": t.layer_norm(arrays, f"{m}.final_layer_norm"),
        "text_projection": t.dense(arrays, "text_projection", bias=False),
    }
    for i in range(num_layers):
        p = f"{m}.encoder.layers.{i}"
        params[f"layer_{i}"] = t.block_params(arrays, {
            "query": f"{p}.self_attn.q_proj", "key": f"{p}.self_attn.k_proj",
            "value": f"{p}.self_attn.v_proj", "out": f"{p}.self_attn.out_proj",
            "ln_attn": f"{p}.layer_norm1", "fc1": f"{p}.mlp.fc1", "fc2": f"{p}.mlp.fc2",
            "ln_mlp": f"{p}.layer_norm2"})
    return params


def missing_weights_message(path: str) -> str:
    return (f"CLIP text weights {path} do not exist. Fix: download "
            f"{SOURCES['vit-b-32']} (or {SOURCES['vit-l-14']}), then convert it once: "
            f"python -m text.convert_clip model.safetensors {path}")


def load(path: str = "") -> tuple[ClipTextConfig, dict]:
    """(config, params) from a converted .npz (`text.convert_clip`); UserError naming the
    download and the convert command when it is missing, or the bad key/shape when wrong."""
    path = os.path.expanduser(path or DEFAULT_WEIGHTS)
    if not os.path.isfile(path):
        raise UserError(missing_weights_message(path))
    fix = f"convert the checkpoint again: python -m text.convert_clip model.safetensors {path}"
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    if "config" not in arrays:
        raise UserError(f"{path} has no 'config' entry, so it was not written by "
                        f"text.convert_clip. Fix: {fix}")
    try:
        config = ClipTextConfig(**json.loads(str(arrays.pop("config"))))
    except TypeError as e:
        raise UserError(f"{path} has a config this code cannot read ({e}). Fix: {fix}") from None
    if config.activation not in transformer.ACTIVATIONS:
        raise UserError(f"{path}: activation {config.activation!r} is not one of "
                        f"{sorted(transformer.ACTIVATIONS)}. Fix: {fix}")
    try:
        params = hf_to_flax(arrays, config.num_layers)
    except KeyError as e:
        raise UserError(f"{path} lacks the weight {e}. Fix: {fix}") from None
    return config, transformer.check_params(params, abstract_params(config), source=path,
                                            fix=fix)
