"""Captions of a dataset, their frozen-encoder embeddings, and the text fields of a batch's cond.

A caption source has a vocabulary (every distinct caption string) and, for each example, the
captions it may be given. The vocabulary is encoded ONCE by the frozen text encoder
(`embed_vocabulary`, batched and jitted, with progress) and cached in the workdir under a key of
the encoder, its weights, the token length and the vocabulary itself; a batch then gathers rows
of the cached arrays by caption index on the host. Cached rather than computed on the fly: the
MiniLM encoder costs ~0.7 GFLOP per caption at 32 tokens, as much per batch of 64 captions as
a third of the small UNet's whole training step, while a gather of 64 cached rows costs nothing.

Sources:
* `DigitCaptionSource` (data.captions = "digits"): the offline MNIST digits, captioned from
  their label and the stroke thickness and slant measured on their own pixels
  (text/digit_captions.py). Which caption an example gets is drawn per (seed, step), so a resumed
  run sees the same captions and the model sees many phrasings of each digit.
* `FixedCaptionSource`: one caption per example, e.g. a dataset's own text feature.

`TextBatcher` turns (global batch indices, seed, step, rows) into the cond text fields
{"tokens" [n, L, D], "mask" [n, L], "pooled" [n, Dp]} that the UNet reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from text import digit_captions


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """A frozen encoder's outputs for a list of texts (row i is texts[i])."""

    tokens: np.ndarray   # [V, L, D] float32
    mask: np.ndarray     # [V, L] bool, True at real tokens
    pooled: np.ndarray   # [V, Dp] float32

    def rows(self, index: np.ndarray, fields: Sequence[str]) -> dict[str, np.ndarray]:
        """The `fields` of rows `index` [n]: the text part of a cond."""
        return {name: getattr(self, name)[index] for name in fields}

    def null(self, fields: Sequence[str]) -> dict[str, np.ndarray]:
        """Row 0 without its batch axis (the empty caption's, when row 0 is "")."""
        return {name: getattr(self, name)[0] for name in fields}


def _cache_key(encoder, texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (encoder.cache_key, *texts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def embed_texts(encoder, texts: Sequence[str], *, cache_dir: str | None = None,
                log: Callable[[str], None] | None = None, batch_size: int = 256) -> Embeddings:
    """The encoder's outputs for `texts`, from `cache_dir` when they were computed before.

    The cache file name holds a hash of the encoder's cache_key (name, weights digest, token
    length) and of the texts, so another encoder or another vocabulary never reads stale rows.
    Written atomically (a temporary file renamed), so a run killed mid-write leaves no cache.
    """
    from text import encoders  # the encoders import jax and flax: only when embedding

    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"text_{encoder.name}_{_cache_key(encoder, texts)}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                return Embeddings(tokens=f["tokens"], mask=f["mask"], pooled=f["pooled"])
    out = encoders.encode_texts(encoder, list(texts), batch_size=batch_size, log=log)
    embeddings = Embeddings(tokens=np.asarray(out["tokens"], np.float32),
                            mask=np.asarray(out["mask"], bool),
                            pooled=np.asarray(out["pooled"], np.float32))
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, tokens=embeddings.tokens, mask=embeddings.mask, pooled=embeddings.pooled)
        os.replace(tmp, path)
    return embeddings


class CaptionSource(Protocol):
    """The captions of a dataset: a vocabulary and, per example, which caption it gets."""

    vocabulary: list[str]   # distinct caption strings; the embeddings' rows

    def __len__(self) -> int:
        """The number of examples."""
        ...

    def choose(self, indices: np.ndarray, *, seed: int, step: int, rows: slice) -> np.ndarray:
        """Vocabulary indices [n] for this process's rows of the global batch `indices` [B]:
        a pure function of (seed, step, indices)."""
        ...


class DigitCaptionSource:
    """mnist_5k captioned from label, thickness and slant measured on each digit's pixels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, split: str = "train"):
        ref = digit_captions.mnist_5k_reference()
        self.table = digit_captions.caption_table_from_images(images, labels, ref, split)
        self.vocabulary = digit_captions.caption_vocabulary(split)

    def __len__(self) -> int:
        return len(self.table.label)

    def choose(self, indices: np.ndarray, *, seed: int, step: int, rows: slice) -> np.ndarray:
        return digit_captions.pick_captions(self.table, indices, seed=seed, step=step, rows=rows)


class FixedCaptionSource:
    """One caption per example (e.g. a dataset's text feature): its vocabulary is deduplicated."""

    def __init__(self, captions: Sequence[str]):
        self.vocabulary, self._index = (list(v) for v in np.unique(np.asarray(captions, object),
                                                                   return_inverse=True))
        self._index = np.asarray(self._index, np.int32)

    def __len__(self) -> int:
        return len(self._index)

    def choose(self, indices: np.ndarray, *, seed: int, step: int, rows: slice) -> np.ndarray:
        del seed, step
        return self._index[np.asarray(indices)[rows]]


class TextBatcher:
    """The cond text fields of a batch: the chosen captions' cached embeddings.

    Row 0 of the embeddings is the empty caption "" (its encoding is ∅, the null condition of
    classifier-free guidance); vocabulary entry v is row v + 1.
    """

    def __init__(self, source: CaptionSource, encoder, fields: Sequence[str], *,
                 cache_dir: str | None = None, log: Callable[[str], None] | None = None,
                 embeddings: Embeddings | None = None):
        """embeddings: already computed rows of ["", *source.vocabulary] (else encoded here)."""
        self.source = source
        self.fields = tuple(fields)
        self.embeddings = embeddings or embed_texts(encoder, ["", *source.vocabulary],
                                                    cache_dir=cache_dir, log=log)
        self.null = self.embeddings.null(self.fields)

    def with_source(self, source: CaptionSource) -> TextBatcher:
        """The same embeddings for another dataset of the same vocabulary (e.g. the eval split)."""
        if list(source.vocabulary) != list(self.source.vocabulary):
            raise ValueError("with_source needs a caption source of the same vocabulary.")
        return TextBatcher(source, None, self.fields, embeddings=self.embeddings)

    def __call__(self, indices: np.ndarray, *, seed: int, step: int,
                 rows: slice = slice(None)) -> dict[str, np.ndarray]:
        caption = self.source.choose(indices, seed=seed, step=step, rows=rows)
        return self.embeddings.rows(caption + 1, self.fields)

    def spread(self, n: int, *, seed: int) -> dict[str, np.ndarray]:
        """The text fields of n examples spread evenly over the dataset (for sample grids: the
        digits are stored by class, so this spans the classes in order)."""
        indices = np.linspace(0, len(self.source) - 1, n).astype(np.int64)
        return self(indices, seed=seed, step=0)

    def captions(self, indices: np.ndarray, *, seed: int, step: int) -> list[str]:
        """The caption strings `__call__` gives for the same arguments (for logs and tests)."""
        caption = self.source.choose(indices, seed=seed, step=step, rows=slice(None))
        return [self.source.vocabulary[c] for c in caption]


def prompt_cond(encoder, prompts: Sequence[str], fields: Sequence[str], *,
                cache_dir: str | None = None) -> tuple[dict, dict]:
    """(cond text fields [N, ...] of `prompts`, ∅ = the empty caption's fields).

    An empty prompt is exactly the null condition: both are the encoding of "".
    """
    embeddings = embed_texts(encoder, ["", *prompts], cache_dir=cache_dir)
    return embeddings.rows(np.arange(1, len(prompts) + 1), fields), embeddings.null(fields)


def read_prompts(prompt: str, path: str) -> list[str]:
    """The prompts of config.sample.prompt (one) or config.sample.prompts (a file, one per line;
    blank lines are skipped, so use prompt="" for an unconditional row)."""
    from errors import UserError

    if prompt:
        return [prompt]
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"sample.prompts={path!r} cannot be read ({e.strerror}). Fix: give a "
                        f"text file with one prompt per line.") from e
    if not prompts:
        raise UserError(f"sample.prompts={path!r} holds no prompt. Fix: one prompt per line.")
    return prompts
