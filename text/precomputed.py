"""Text embeddings computed elsewhere (any encoder: T5, a larger CLIP, ...), read from a file.

    python main.py ... --config.model.text_encoder=precomputed \
        --config.model.text_weights=embeddings.npz --config.model.text_max_length=L

The .npz holds, for every distinct caption of the dataset and every prompt to be sampled, row
for row (no pickles):

    texts   [V] str             the caption strings; one of them must be "" (its row is ∅)
    tokens  [V, L, D] float     the encoder's token states (0 at padding)
    mask    [V, L] bool         True at real tokens
    pooled  [V, P] float        the pooled sentence vector

`encode` looks the texts up by string, so the rest of the project treats it like any frozen
encoder; a text missing from the file is a UserError naming the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from errors import UserError
from text import files

FIELDS = ("texts", "tokens", "mask", "pooled")


def _fix(path: str) -> str:
    return (f"write {path} with arrays {FIELDS} (texts [V] str including '', tokens [V, L, D], "
            f"mask [V, L], pooled [V, P]) by running your encoder on every caption and prompt")


def _read(path: str) -> dict[str, np.ndarray]:
    path = os.path.expanduser(path)
    if not path or not os.path.isfile(path):
        raise UserError(f"model.text_encoder='precomputed' reads the embeddings from "
                        f"model.text_weights={path!r}, which is not a file. Fix: "
                        f"{_fix(path or 'embeddings.npz')}.")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in FIELDS if k not in f.files]
        if missing:
            raise UserError(f"{path} lacks {missing}. Fix: {_fix(path)}.")
        arrays = {k: f[k] for k in FIELDS}
    v = len(arrays["texts"])
    tokens, mask, pooled = arrays["tokens"], arrays["mask"], arrays["pooled"]
    if (tokens.ndim != 3 or mask.shape != tokens.shape[:2] or pooled.ndim != 2
            or {len(tokens), len(mask), len(pooled)} != {v}):
        raise UserError(f"{path}: shapes texts {arrays['texts'].shape}, tokens {tokens.shape}, "
                        f"mask {mask.shape}, pooled {pooled.shape} do not fit together. Fix: "
                        f"{_fix(path)}.")
    if "" not in set(arrays["texts"].tolist()):
        raise UserError(f"{path} has no row for the empty caption '' (the null condition of "
                        f"classifier-free guidance). Fix: add it.")
    return arrays


def widths(path: str) -> tuple[int, int]:
    """(D, P) of the file's token states and pooled vectors."""
    arrays = _read(path)
    return arrays["tokens"].shape[2], arrays["pooled"].shape[1]


class PrecomputedEncoder:
    """The frozen-encoder interface over a table of embeddings (see the module docstring)."""

    name = "precomputed"

    def __init__(self, path: str, max_length: int | None):
        arrays = _read(path)
        self.path = os.path.expanduser(path)
        length = arrays["tokens"].shape[1]
        if max_length is not None and max_length != length:
            raise UserError(f"{self.path} has token sequences of length {length}, but "
                            f"model.text_max_length={max_length}. Fix: "
                            f"--config.model.text_max_length={length}.")
        self.max_length = length
        self.width, self.pooled_width = arrays["tokens"].shape[2], arrays["pooled"].shape[1]
        self.cache_key = f"precomputed-{files.sha256_of(self.path)[:16]}-L{length}"
        self._row = {text: i for i, text in enumerate(arrays["texts"].tolist())}
        self._tokens = arrays["tokens"].astype(np.float32)
        self._mask = arrays["mask"].astype(bool)
        self._pooled = arrays["pooled"].astype(np.float32)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{"tokens" [N, L, D], "mask" [N, L], "pooled" [N, P]} of texts found in the file."""
        missing = [t for t in texts if t not in self._row]
        if missing:
            raise UserError(f"{len(missing)} text(s) are not in {self.path}, e.g. "
                            f"{missing[0]!r}. Fix: add their embeddings to the file.")
        rows = np.asarray([self._row[t] for t in texts], np.int64)
        return {"tokens": self._tokens[rows], "mask": self._mask[rows],
                "pooled": self._pooled[rows]}
