"""The transformer block of BERT (MiniLM) and of CLIP's text tower, and torch -> Flax layouts.

One block serves both: multi-head self-attention and a two-layer MLP, each a residual branch,
with LayerNorm either after the residual sum (BERT, "post-LN") or at the branch input (CLIP,
"pre-LN"):

  post-LN:  h = LN_1(x + Attn(x));      y = LN_2(h + MLP(h))
  pre-LN:   h = x + Attn(LN_1(x));      y = h + MLP(LN_2(h))

  Attn(x) = concat_h softmax(q_h k_h^T / sqrt(d_h) + masked) v_h  W_o,   q, k, v = x W_{q,k,v}
  MLP(x)  = act(x W_1 + b_1) W_2 + b_2

The attention mask is boolean, True where a query may attend to a key; masked logits are set to
the most negative float32, so a row always keeps at least the tokens its reference model keeps
(BERT: all real tokens; CLIP: itself and earlier tokens) and never becomes NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from errors import UserError


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU, x * Phi(x) with the erf (BERT's and torch's nn.GELU default)."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu, "quick_gelu": quick_gelu}


class SelfAttention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [N, L, D]; mask bool, broadcastable to [N, heads, L (queries), L (keys)]."""
        n, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(name: str) -> jax.Array:  # [N, L, H, d_h]
            return nn.Dense(width, name=name)(x).reshape(n, length, self.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)  # [N, H, L, L]
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, width)
        return nn.Dense(width, name="out")(out)


class TransformerBlock(nn.Module):
    """Self-attention + MLP with residuals; `pre_norm` chooses CLIP's (True) or BERT's order."""

    num_heads: int
    mlp_width: int
    activation: str  # a key of ACTIVATIONS
    pre_norm: bool
    layer_norm_eps: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        ln_attn = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_attn")
        ln_mlp = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_mlp")
        attn = SelfAttention(self.num_heads, name="attn")

        def mlp(h: jax.Array) -> jax.Array:
            h = ACTIVATIONS[self.activation](nn.Dense(self.mlp_width, name="fc1")(h))
            return nn.Dense(x.shape[-1], name="fc2")(h)

        if self.pre_norm:
            x = x + attn(ln_attn(x), mask)
            return x + mlp(ln_mlp(x))
        x = ln_attn(x + attn(x, mask))
        return ln_mlp(x + mlp(x))


# ---- torch state_dict (numpy arrays) -> Flax parameters ------------------------------------

def dense(arrays: Mapping[str, np.ndarray], prefix: str, bias: bool = True) -> dict:
    """torch nn.Linear `prefix.weight` [out, in] (+ `prefix.bias`) -> Flax Dense {kernel [in, out],
    bias}."""
    params = {"kernel": arrays[f"{prefix}.weight"].T}
    if bias:
        params["bias"] = arrays[f"{prefix}.bias"]
    return params


def layer_norm(arrays: Mapping[str, np.ndarray], prefix: str) -> dict:
    return {"scale": arrays[f"{prefix}.weight"], "bias": arrays[f"{prefix}.bias"]}


def block_params(arrays: Mapping[str, np.ndarray], names: Mapping[str, str]) -> dict:
    """One TransformerBlock's parameters; `names` maps our submodule names (query, key, value,
    out, fc1, fc2, ln_attn, ln_mlp) to the torch prefixes of the checkpoint."""
    return {
        "attn": {k: dense(arrays, names[k]) for k in ("query", "key", "value", "out")},
        "fc1": dense(arrays, names["fc1"]), "fc2": dense(arrays, names["fc2"]),
        "ln_attn": layer_norm(arrays, names["ln_attn"]),
        "ln_mlp": layer_norm(arrays, names["ln_mlp"]),
    }


def check_params(params: Mapping, expected: Mapping, *, source: str, fix: str) -> dict:
    """params as float32 numpy, after checking that their tree and shapes are `expected`'s
    (a jax.eval_shape of the module's init); UserError naming the first difference otherwise."""
    got = {"/".join(str(k.key) for k in path): np.shape(a)
           for path, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {"/".join(str(k.key) for k in path): tuple(a.shape)
            for path, a in jax.tree_util.tree_flatten_with_path(expected)[0]}
    for name in sorted(set(got) | set(want)):
        if got.get(name) != want.get(name):
            raise UserError(f"{source} does not hold the expected weights: parameter {name} has "
                            f"shape {got.get(name)}, the model needs {want.get(name)}. Fix: {fix}")
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)
