"""Image decoding and the one preprocessing every decoded source goes through.

`fit(payload, spec, position)` turns an encoded file (PNG/JPEG/WebP/BMP bytes) or a decoded
array of any size and channel count into uint8 [S, S, C]:

1. decode (JPEGs at a reduced DCT scale that stays >= 2x the target, as Pillow's `thumbnail`
   does: a 1024x1024 JPEG for a 64x64 model decodes at 128x128; measured 8 ms instead of 52,
   output within 0.34/255 mean absolute difference of a full decode); JPEG EXIF orientation
   is applied, so phone photos stand upright;
2. channels: transparency is composited over white; grey, palette, CMYK, ... become RGB for
   C = 3, and RGB becomes grey (ITU-R 601 luma, Pillow's "L") for C = 1;
3. the shorter side is resized to S (bicubic, antialiased), and an S x S window is cut at
   `position` in [0, 1] along the longer side (0.5 = the centre; the random crop of
   `data.crop='random'` draws it per (seed, step, position in the batch), so resume is exact).

An image already S x S x C is returned as is (CIFAR-10, MNIST: no resampling, bit-exact).

`DecodingSource` is the base of the sources that decode (image folders, tfds): it decodes a
batch on a thread pool (Pillow releases the GIL while it decodes and resizes) and handles
unreadable files (`data.on_bad_image`): "stop" raises `BadImageError` naming the file; "skip"
logs it with its path, counts it, and reads the next readable example in index order instead
(index i -> i+1 -> ... wrapping at the end), so a batch never holds a wrong or blank image, the
replacement is a pure function of the files, and its label and caption come with it
(`Examples.indices` says which examples were read).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import threading
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROPS = ("center", "random")
ON_BAD_IMAGE = ("skip", "stop")
CHANNELS = (1, 3)

# What Pillow raises for a file that is not an image, is truncated or is corrupt.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112


class BadImageError(UserError):
    """An unreadable image with data.on_bad_image='stop'; the message names the file."""


class NoReadableImageError(UserError):
    """Every example of a source failed to decode."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What every example becomes: uint8 [size, size, channels]."""

    size: int
    channels: int  # 1 or 3

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one example."""
        return (self.size, self.size, self.channels)


@dataclasses.dataclass(frozen=True)
class Examples:
    """A batch read from a source."""

    images: np.ndarray   # [N, S, S, C] uint8
    labels: np.ndarray   # [N] int32
    indices: np.ndarray  # [N] int64: the examples read (another than asked where one was skipped)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)


def _decode(payload: bytes | np.ndarray | OSError,
            spec: ImageSpec) -> Image.Image | np.ndarray:
    """The decoded image (a Pillow image, or the array itself when nothing needs changing);
    raises one of DECODE_ERRORS for a file that is not a readable image (or is one: the
    error met while reading the file)."""
    if isinstance(payload, OSError):
        raise payload
    if isinstance(payload, np.ndarray):
        array = payload[..., None] if payload.ndim == 2 else payload
        if array.shape == spec.shape:
            return array
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image = Image.open(io.BytesIO(payload))
    if image.format == "JPEG":
        w, h = image.size
        scale = 2 * spec.size / min(w, h)  # decode at >= 2x the target, as Image.thumbnail
        image.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))
    image.load()  # decodes now: a truncated or corrupt file raises here, not later
    if image.format == "JPEG" and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return image


def _convert(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PNG): 65535 -> 255
        grey = np.asarray(image, np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def _resize_and_crop(image: Image.Image, size: int, position: float) -> Image.Image:
    w, h = image.size
    if w == h == size:
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left = round(position * (nw - size))
    top = round(position * (nh - size))
    return image.crop((left, top, left + size, top + size))


def _fit(payload: bytes | np.ndarray, spec: ImageSpec,
         position: float) -> tuple[np.ndarray, bool]:
    """(fit's output, whether it is the same at every position: the image came out square)."""
    decoded = _decode(payload, spec)
    if isinstance(decoded, np.ndarray):
        return decoded, True
    converted = _convert(decoded, spec.channels)
    w, h = converted.size
    image = _resize_and_crop(converted, spec.size, position)
    array = np.asarray(image, np.uint8)
    return (array[..., None] if array.ndim == 2 else array), w == h


def fit(payload: bytes | np.ndarray, spec: ImageSpec, position: float = 0.5) -> np.ndarray:
    """An encoded image or a uint8 array [H, W] / [H, W, C] -> uint8 [S, S, C] (module doc).

    Raises one of Pillow's errors (OSError, ...) when `payload` is not a readable image."""
    return _fit(payload, spec, position)[0]


class DecodingSource:
    """The base of sources whose examples are decoded: threads, bad files, `read` and `get`.

    Subclasses set `self.spec`, `self.on_bad_image` and implement `__len__`,
    `payloads(indices) -> (list of encoded bytes or arrays, labels int [n])` and
    `describe(index) -> str` (the path or record, for messages).

    Decoded examples are kept in memory when all of them fit in `cache_mb` MB (CIFAR-10 at
    32x32: 150 MB; CelebA at 64x64: 2 GB), filled as they are first read: from the second
    epoch on a batch costs a gather instead of decoding. Only outputs that do not depend on
    the crop position (square after resizing), or at the same position, are served from it,
    so a cached read equals a decoded one bit for bit.
    """

    spec: ImageSpec
    on_bad_image: str

    def __init__(self, threads: int = 0, cache_mb: int = 0):
        self._threads = threads or os.cpu_count() or 1
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._bad: dict[int, str] = {}  # index -> why it cannot be read (this process)
        self._lock = threading.Lock()
        self._cache_bytes = cache_mb * 2**20
        self._cache = None  # (images [N, S, S, C], labels [N], position [N], state [N]) or None

    def __getstate__(self) -> dict:
        """Picklable for worker processes (e.g. grain's): the pool, lock and cache stay."""
        state = dict(self.__dict__)
        state["_pool"], state["_lock"], state["_cache"] = None, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        raise NotImplementedError

    def payloads(self, indices: Sequence[int]) -> tuple[list, np.ndarray]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    @property
    def num_bad_images(self) -> int:
        """Distinct unreadable examples this process has met (and skipped) so far."""
        return len(self._bad)

    def _mark_bad(self, index: int, error: Exception) -> None:
        where = self.describe(index)
        reason = f"{type(error).__name__}: {error}"
        if self.on_bad_image == "stop":
            raise BadImageError(
                f"{where} cannot be read as an image ({reason}). Fix: delete or replace the "
                f"file, or skip unreadable files with --config.data.on_bad_image=skip.") from error
        with self._lock:
            new = index not in self._bad
            self._bad[index] = reason
            count = len(self._bad)
        if new:
            logging.warning("Skipped an unreadable image (data.on_bad_image='skip', %d so far; "
                            "the next readable example takes its place): %s (%s)",
                            count, where, reason)

    # The cache: state[i] is 0 (empty), 1 (cached at position[i]) or 2 (any position).
    def _cached(self, i: int, position: float) -> tuple[np.ndarray, int, int] | None:
        """A copy, never a view: a later store of example i at another crop position (the same
        example twice in one batch) must not change an image already handed out."""
        if self._cache is None:
            return None
        images, labels, positions, state = self._cache
        with self._lock:
            if state[i] == 2 or (state[i] == 1 and positions[i] == position):
                return images[i].copy(), int(labels[i]), i
        return None

    def _store(self, i: int, image: np.ndarray, label: int, position: float,
               anywhere: bool) -> None:
        if self._cache is None:
            n, shape = len(self), self.spec.shape
            if n * int(np.prod(shape)) > self._cache_bytes:
                return
            with self._lock:
                if self._cache is None:  # np.empty: pages are only used once written
                    self._cache = (np.empty((n, *shape), np.uint8), np.zeros(n, np.int32),
                                   np.zeros(n), np.zeros(n, np.int8))
        images, labels, positions, state = self._cache
        with self._lock:  # one entry at a time: decode threads may store the same example
            images[i], labels[i], positions[i] = image, label, position
            state[i] = 2 if anywhere else 1

    def _decoded(self, i: int, payload, label: int, position: float):
        """(image, label, i), or None when example i cannot be decoded (now marked bad)."""
        try:
            image, anywhere = _fit(payload, self.spec, position)
        except DECODE_ERRORS as e:
            self._mark_bad(i, e)
            return None
        self._store(i, image, int(label), position, anywhere)
        return image, int(label), i

    def _replacement(self, index: int, position: float) -> tuple[np.ndarray, int, int]:
        """(image, label, index) of the first readable example after `index`, in index order."""
        n = len(self)
        for step in range(1, n):
            j = (index + step) % n
            if j in self._bad:
                continue
            found = self._cached(j, position)
            if found is None:
                (payload,), labels = self.payloads([j])
                found = self._decoded(j, payload, labels[0], position)
            if found is not None:
                return found
        raise NoReadableImageError(
            f"none of the {n} examples of {self.describe(index)}'s dataset can be read as an "
            f"image. Fix: check the files (e.g. open one in an image viewer).")

    def _read_chunk(self, indices: np.ndarray, positions: np.ndarray) -> list[tuple]:
        out = [None if int(i) in self._bad else self._cached(int(i), p)
               for i, p in zip(indices, positions, strict=True)]
        todo = [k for k, (i, row) in enumerate(zip(indices, out, strict=True))
                if row is None and int(i) not in self._bad]
        if todo:
            payloads, labels = self.payloads([int(indices[k]) for k in todo])
            for k, payload, label in zip(todo, payloads, labels, strict=True):
                out[k] = self._decoded(int(indices[k]), payload, label, positions[k])
        return [row if row is not None else self._replacement(int(i), p)
                for i, p, row in zip(indices, positions, out, strict=True)]

    def read(self, indices: np.ndarray, crop: np.ndarray | None = None) -> Examples:
        """Examples at `indices` [n]; crop [n] in [0, 1]: the window positions (None = centre)."""
        indices = np.asarray(indices, np.int64)
        positions = np.full(len(indices), 0.5) if crop is None else np.asarray(crop, np.float64)
        chunks = min(self._threads, max(1, len(indices) // 8))  # >= 8 images per task
        parts = [(indices[c], positions[c])
                 for c in np.array_split(np.arange(len(indices)), chunks)]
        if chunks == 1:
            results = [self._read_chunk(*parts[0])]
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._threads, thread_name_prefix="decode")
            results = list(self._pool.map(lambda part: self._read_chunk(*part), parts))
        rows = [row for chunk in results for row in chunk]
        shape = (0, *self.spec.shape)
        images = np.stack([r[0] for r in rows]) if rows else np.zeros(shape, np.uint8)
        return Examples(images=images, labels=np.asarray([r[1] for r in rows], np.int32),
                        indices=np.asarray([r[2] for r in rows], np.int64))

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [N, S, S, C] (centre crops) and labels int32 [N] at `indices`."""
        examples = self.read(indices)
        return examples.images, examples.labels
