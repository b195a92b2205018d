"""What the UNet is conditioned on: one pytree `cond`, its null value ∅, and `drop_cond`.

`cond` is a dict whose fields exist as the model is configured (absent fields are not there):

    "label"   [B] int32        class label in [0, num_classes]; num_classes is the null label
    "tokens"  [B, L, D] f32    a frozen text encoder's hidden states (cross-attention keys/values)
    "mask"    [B, L] bool      True at real tokens, False at padding (always with "tokens")
    "pooled"  [B, Dp] f32      a pooled embedding, projected and added to the time embedding

It travels unchanged from the batch through the loss, the model, the guided model function, the
samplers and the evaluators; nothing else carries a condition.

The null condition ∅ of classifier-free guidance has the same fields without the batch axis: the
null label, and the encoder's output for the empty caption (`null_cond`). One function,
`drop_cond(cond, keep, null)`, replaces the rows where `keep` is False by ∅; classifier-free
training (keep ~ Bernoulli(1 − p_uncond)) and the unconditional branch at sampling (keep = False)
both go through it, so the model is trained on exactly the ∅ it is guided with.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Cond = dict[str, jax.Array]   # batched, as above
TEXT_FIELDS = ("tokens", "mask", "pooled")


def null_cond(num_classes: int = 0, text: Mapping[str, np.ndarray] | None = None) -> dict:
    """∅ without a batch axis: {"label": num_classes} for a class-conditional model, plus the
    empty caption's {"tokens" [L, D], "mask" [L], "pooled" [Dp]} for a text-conditional one."""
    null = {}
    if num_classes:
        null["label"] = np.int32(num_classes)
    for name, value in (text or {}).items():
        if name not in TEXT_FIELDS:
            raise ValueError(f"text null field {name!r} is not one of {TEXT_FIELDS}.")
        null[name] = np.asarray(value)
    return null


def drop_cond(cond: Mapping[str, jax.Array], keep: jax.Array,
              null: Mapping[str, jax.Array]) -> Cond:
    """cond where keep [B] is True, ∅ (broadcast over the batch) where it is False."""
    missing = set(cond) - set(null)
    if missing:
        raise ValueError(f"cond fields {sorted(missing)} have no null value in {sorted(null)}.")

    def one(name: str, value: jax.Array) -> jax.Array:
        k = keep.reshape(keep.shape + (1,) * (value.ndim - 1))
        return jnp.where(k, value, jnp.asarray(null[name], value.dtype))

    return {name: one(name, value) for name, value in cond.items()}


def uncond_like(cond: Mapping[str, jax.Array], null: Mapping[str, jax.Array]) -> Cond:
    """∅ for every row of cond: the unconditional branch of classifier-free guidance."""
    batch = next(iter(cond.values())).shape[0]
    return drop_cond(cond, jnp.zeros((batch,), bool), null)


def select(cond: Mapping[str, jax.Array] | None, fields: tuple[str, ...]) -> Cond:
    """The fields of cond a model reads (e.g. `UNet.cond_fields`): a request may carry more, such
    as the labels that only a classifier's guidance uses."""
    return {name: cond[name] for name in fields if cond and name in cond}


def take(cond: Mapping[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    """Rows (a slice or indices) of every field, on the host."""
    return {name: np.asarray(value)[rows] for name, value in cond.items()}


def resize(cond: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Every field repeated cyclically (or cut) to n rows: pads a last, partial batch."""
    return {name: np.resize(np.asarray(value), (n, *np.shape(value)[1:]))
            for name, value in cond.items()}


def concatenate(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Fields concatenated along the batch axis (host or device arrays)."""
    return jax.tree.map(lambda *v: jnp.concatenate(v) if isinstance(v[0], jax.Array)
                        else np.concatenate(v), *parts)
