"""FID, KID and IS of a model's samples against cached statistics of real data.

A feature network is anything with the `FeatureNet` interface: images (uint8 [N, H, W, C] or
float in [-1, 1]) -> (pooled features [N, D], logits [N, K]). Two ship:

  * "inception_v3": the standard FID network (pool3, 2048-d; 1008 logits for IS), weights from a
    user-supplied file (see evaluation/inception.py). Metrics are named FID, KID, IS.
  * "mnist_classifier": the project's CNN trained on the mnist_5k training digits (64-d
    penultimate features, 10 logits; evaluation/mnist_classifier.py). Metrics are named
    MNIST-FID, MNIST-KID, MNIST-IS everywhere: only comparable with each other, never with
    published FIDs. Calibration: the 500 real held-out digits score MNIST-FID ≈ 10.8 against the
    4,500 training digits (a 500-sample floor), and the training digits MNIST-IS ≈ 9.64.

Statistics of the real data are computed once per (dataset, split, number of examples, network
and its weights) and cached as an .npz in the workdir. Samples are streamed: each batch from the
`sampling_lib.Sampler` is quantised to uint8 (as saved images would be), passed through the
network and folded into `fid.FeatureStats`, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import input_pipeline
import metric_logging
import sampling_lib
from data_spec import encode_pixels
from evaluation import FEATURE_NETS, fid, inception, mnist_classifier

MNIST_NOTE = ("MNIST-FID/KID/IS use the features of the project's MNIST classifier "
              "(evaluation/mnist_classifier.py); not comparable with published Inception FID.")


class FeatureNet:
    """A jitted, batch-sharded feature network with a fixed batch size (one compilation)."""

    def __init__(self, name: str, features_fn: Callable, params: Any, *, batch_size: int,
                 mesh: jax.sharding.Mesh, metric_prefix: str = "", note: str = "",
                 image_shape: tuple[int, int, int] | None = None):
        self.name = name
        self.metric_prefix = metric_prefix   # "MNIST-" for the MNIST classifier, "" for Inception
        self.note = note
        self.batch_size = batch_size
        self.image_shape = image_shape       # required input shape, or None for any
        self.params = params
        digest = hashlib.sha1()
        for leaf in jax.tree.leaves(params):
            digest.update(np.asarray(leaf).tobytes())
        self.fingerprint = digest.hexdigest()[:8]  # names caches: new weights, new statistics
        data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        self._data = data
        self._fn = jax.jit(features_fn, in_shardings=(replicated, data),
                           out_shardings=(data, data))

    def metric(self, name: str) -> str:
        """The displayed name of a metric: "FID" -> "MNIST-FID" for the MNIST classifier."""
        return self.metric_prefix + name

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images uint8 [N, H, W, C] or float [-1, 1] -> (features [N, D], logits [N, K])."""
        images = np.asarray(images)
        if self.image_shape is not None and images.shape[1:] != self.image_shape:
            raise ValueError(f"feature network {self.name!r} takes images of shape "
                             f"{self.image_shape}, got {images.shape[1:]}")
        if images.dtype == np.uint8:
            images = encode_pixels(images)
        n = len(images)
        feats, logits = [], []
        for start in range(0, n, self.batch_size):
            batch = images[start:start + self.batch_size]
            m = len(batch)
            batch = np.concatenate([batch, np.repeat(batch[:1], self.batch_size - m, 0)])
            f, lg = self._fn(self.params, jax.device_put(jnp.asarray(batch, jnp.float32),
                                                         self._data))
            feats.append(np.asarray(jax.device_get(f))[:m])
            logits.append(np.asarray(jax.device_get(lg))[:m])
        return np.concatenate(feats), np.concatenate(logits)


def make_feature_net(name: str, *, batch_size: int, mesh: jax.sharding.Mesh,
                     inception_weights: str = inception.DEFAULT_WEIGHTS) -> FeatureNet:
    """The named network of FEATURE_NETS with its weights loaded (clear error when missing)."""
    if name == "inception_v3":
        return FeatureNet(name, inception.features_fn, inception.load_variables(inception_weights),
                          batch_size=batch_size, mesh=mesh)
    if name == "mnist_classifier":
        _, params = mnist_classifier.load_classifier()
        return FeatureNet(name, mnist_classifier.features_fn, params, batch_size=batch_size,
                          mesh=mesh, metric_prefix="MNIST-", note=MNIST_NOTE,
                          image_shape=mnist_classifier.IMAGE_SHAPE)
    raise ValueError(f"unknown feature network {name!r}; expected one of {FEATURE_NETS}")


def stats_of_images(net: FeatureNet, images: np.ndarray, *, num_splits: int = 10,
                    kid_max_features: int = 10_000) -> fid.Stats:
    """Statistics of an in-memory image set (tests, small sets)."""
    acc = fid.FeatureStats(len(images), num_splits=num_splits, kid_max_features=kid_max_features)
    for start in range(0, len(images), net.batch_size):
        acc.update(*net(images[start:start + net.batch_size]))
    return acc.finalize()


def reference_stats(net: FeatureNet, source: input_pipeline.Source, *, cache_dir: str,
                    dataset: str, split: str, num_examples: int = 0, num_splits: int = 10,
                    kid_max_features: int = 10_000,
                    log: Callable[[str], None] = metric_logging.log_line) -> fid.Stats:
    """Statistics of `num_examples` (0 = all) real images, a fixed random subset, cached in
    cache_dir."""
    n = len(source) if num_examples <= 0 else min(num_examples, len(source))
    path = os.path.join(cache_dir, f"fid_reference_{dataset}_{split}_{n}_{net.name}_"
                                   f"{net.fingerprint}_k{kid_max_features}.npz")
    if os.path.exists(path):
        return fid.Stats.load(path)
    log(f"Computing {net.name} reference statistics of {n} {dataset}/{split} images -> {path}")
    # A fixed random order: the subset is random when n < len(source), and IS splits are not
    # single classes when the dataset is stored sorted by class (mnist_5k is).
    order = np.random.default_rng(0).permutation(len(source))[:n]
    acc = fid.FeatureStats(n, num_splits=num_splits, kid_max_features=kid_max_features)
    for start in range(0, n, net.batch_size):
        images, _ = source.get(order[start:start + net.batch_size])
        acc.update(*net(images))
    stats = acc.finalize()
    if jax.process_index() == 0:
        stats.save(path)
    return stats


def sample_stats(net: FeatureNet, sampler: sampling_lib.Sampler, params, *,
                 decode: Callable[[np.ndarray], np.ndarray], num_samples: int,
                 num_classes: int, seed: int, num_splits: int = 10,
                 kid_max_features: int = 10_000,
                 log: Callable[[str], None] | None = None,
                 cond_fn: Callable[[int, int], dict] | None = None) -> fid.Stats:
    """Statistics of `num_samples` samples, streamed batch by batch (keys as
    `sampling_lib.sample_many`) and made uint8 by `decode` (the data's `DataSpec.decode`), as
    sample files hold them; class-conditional models get balanced labels i mod K, or
    cond_fn(start, batch_size) gives the condition of samples start.. (e.g. captions)."""
    acc = fid.FeatureStats(num_samples, num_splits=num_splits, kid_max_features=kid_max_features)
    key = jax.random.key(seed)
    num_batches = -(-num_samples // sampler.batch_size)
    progress = metric_logging.Progress(0, num_batches, sampler.batch_size)
    for i, start in enumerate(range(0, num_samples, sampler.batch_size)):
        n = min(sampler.batch_size, num_samples - start)
        cond = None
        if num_classes:
            cond = {"label": (np.arange(start, start + sampler.batch_size)
                              % num_classes).astype(np.int32)}
        if cond_fn is not None:
            cond = cond_fn(start, sampler.batch_size)
        images = sampler(params, jax.random.fold_in(key, i), cond)[:n]
        acc.update(*net(decode(images)))
        if log:
            log("samples " + progress.line(i + 1, {"images": start + n}, progress.update(i + 1)))
    return acc.finalize()


def named_metrics(net: FeatureNet, metrics: dict[str, float]) -> dict[str, float]:
    """{"fid": x, "kid_std": y, ...} -> {"MNIST-FID": x, "MNIST-KID_std": y, ...}."""
    out = {}
    for key, value in metrics.items():
        base, _, suffix = key.partition("_")
        out[net.metric(base.upper()) + (f"_{suffix}" if suffix else "")] = value
    return out
