"""A small CNN trained on the 4,500 real mnist_5k training digits: the feature network of MNIST-FID.

    python -m evaluation.mnist_classifier --train   # ~1 min on 2 CPU cores; rewrites the weights
    python -m evaluation.mnist_classifier           # held-out accuracy of the committed weights

The trained parameters ship in the repository as `mnist_classifier.msgpack` (flax.serialization
msgpack: arrays only, no pickles), so neither users nor tests retrain. Training is deterministic
for a given seed on a given machine; it reads only mnist_5k's "train" split and reports accuracy
on the 500 held-out "test" digits, which it never sees.

Architecture (93k parameters, 365 KiB, inputs [B, 28, 28, 1] in [-1, 1]):

    conv3x3(32) relu -> maxpool2 -> conv3x3(64) relu -> maxpool2 -> conv3x3(64) relu
    -> maxpool2 -> flatten [B, 576] -> dense(64) relu = features [B, 64] -> dense(10) = logits

The 64-d penultimate activations are the features of "MNIST-FID"/"MNIST-KID" and the logits those
of "MNIST-IS". These numbers are only comparable with each other, never with published
(InceptionV3) FID/IS.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import input_pipeline
from errors import MissingFileError

WEIGHTS_PATH = pathlib.Path(__file__).with_name("mnist_classifier.msgpack")
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64


class MnistCNN(nn.Module):
    """images [B, 28, 28, 1] in [-1, 1] -> (features [B, 64], logits [B, 10]), float32."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))                 # [B, 28, 28, 32]
        x = nn.max_pool(x, (2, 2), strides=(2, 2))                        # [B, 14, 14, 32]
        x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))                 # [B, 14, 14, 64]
        x = nn.max_pool(x, (2, 2), strides=(2, 2))                        # [B, 7, 7, 64]
        x = nn.relu(nn.Conv(64, (3, 3), name="conv3")(x))                 # [B, 7, 7, 64]
        x = nn.max_pool(x, (2, 2), strides=(2, 2))                        # [B, 3, 3, 64]
        x = x.reshape(x.shape[0], -1)                                     # [B, 576]
        features = nn.relu(nn.Dense(FEATURE_DIM, name="dense1")(x))       # [B, 64]
        logits = nn.Dense(NUM_CLASSES, name="logits")(features)           # [B, 10]
        return features, logits


def features_fn(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(penultimate features [B, 64], logits [B, 10]) of images [B, 28, 28, 1] in [-1, 1]."""
    return MnistCNN().apply({"params": params}, images)


def logits_fn(params: Any, images: jax.Array) -> jax.Array:
    """logits [B, 10] of images [B, 28, 28, 1] in [-1, 1]."""
    return features_fn(params, images)[1]


def _abstract_params() -> Any:
    x = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
    return jax.eval_shape(lambda x: MnistCNN().init(jax.random.key(0), x), x)["params"]


def load_classifier(path: str | pathlib.Path = WEIGHTS_PATH) -> tuple[Callable, Any]:
    """(apply_fn, params): apply_fn(params, images [B, 28, 28, 1] in [-1, 1]) -> logits [B, 10].

    Use `features_fn` with the same params for the penultimate features.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(
            f"MNIST classifier weights {path} not found. Fix: restore it from the repository "
            f"(`git checkout -- {path.name}`) or retrain with "
            f"`python -m evaluation.mnist_classifier --train`.")
    params = serialization.msgpack_restore(path.read_bytes())
    want = jax.tree.map(lambda a: a.shape, _abstract_params())
    got = jax.tree.map(lambda a: a.shape, params)
    if want != got:
        raise ValueError(f"{path} does not hold MnistCNN parameters: shapes {got}, want {want}.")
    return logits_fn, jax.tree.map(jnp.asarray, params)


def save_params(params: Any, path: str | pathlib.Path) -> None:
    """Writes params as msgpack (float32 arrays only)."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
    pathlib.Path(path).write_bytes(serialization.msgpack_serialize(params))


# --- training ------------------------------------------------------------------------------------

def _to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def _random_shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translates each image by up to ±max_shift pixels (zero = background fill)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)                                     # [N, H]
    cols = dx[:, None] + np.arange(w)                                     # [N, W]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy on uint8 images [N, 28, 28, 1]."""
    fn = jax.jit(logits_fn)
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = np.asarray(fn(params, _to_float(images[start:start + batch_size])))
        correct += int(np.sum(np.argmax(logits, -1) == labels[start:start + batch_size]))
    return correct / len(images)


def train(*, num_steps: int = 800, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
          log: Callable[[str], None] = print) -> Any:
    """Adam with cosine decay on the 4,500 training digits (random ±2 px shifts); returns params."""
    data = input_pipeline.load_mnist_5k("train")
    model = MnistCNN()
    params = model.init(jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    optimizer = optax.adamw(optax.cosine_decay_schedule(lr, num_steps), weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = logits_fn(p, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in range(num_steps):
        idx = rng.integers(0, len(data), batch_size)
        images = _to_float(_random_shift(data.images[idx], rng, max_shift=2))
        params, opt_state, loss = step(params, opt_state, images, data.labels[idx])
        if (i + 1) % 100 == 0 or i + 1 == num_steps:
            log(f"step {i + 1}/{num_steps} | loss {float(loss):.4f} | "
                f"{(i + 1) / (time.perf_counter() - start):.1f} steps/s")
    return params


def main(argv: Sequence[str] | None = None) -> float:
    """Trains (with --train) and/or reports held-out accuracy; returns that accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="train and write --out")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help="weights file (msgpack)")
    args = parser.parse_args(argv)
    if args.train:
        params = train(num_steps=args.steps, seed=args.seed)
        save_params(params, args.out)
        print(f"wrote {args.out} ({pathlib.Path(args.out).stat().st_size / 1024:.0f} KiB)")
    _, params = load_classifier(args.out)
    test = input_pipeline.load_mnist_5k("test")
    acc = accuracy(params, test.images, test.labels)
    print(f"held-out accuracy on the {len(test)} mnist_5k test digits: {acc:.2%}")
    return acc


if __name__ == "__main__":
    main()
