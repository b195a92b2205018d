"""InceptionV3 as used for FID (pytorch-fid's `FIDInceptionA/C/E_1/E_2` variant), in Flax.

This is the network of the standard FID: the TensorFlow "2015-12-05" Inception graph of the
original FID code (TTUR), as ported to PyTorch by pytorch-fid. Outputs: the 2048-d pool3
features (FID, KID) and the 1008 logits of its classifier (Inception Score).

Weights (never downloaded by this code):
  1. Get `pt_inception-2015-12-05-6726825d.pth` (95 MB) from the pytorch-fid releases:
     https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  2. Convert it once, where torch is installed (torch is not a dependency of this project):
        python -m evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
            ~/.cache/ddpm_jax/pt_inception-2015-12-05-6726825d.npz
  3. Point `--config.eval.inception_weights` at the .npz (that path is the default).
The .npz holds plain float32 arrays under the PyTorch state_dict names and layouts ("Mixed_5b.
branch1x1.conv.weight" [O, I, kh, kw], ...); it is read with allow_pickle=False and mapped to
Flax here (`torch_to_flax`).

Preprocessing as pytorch-fid: images in [-1, 1] (pytorch-fid maps [0, 1] to 2x − 1), grey-scale
repeated to 3 channels, bilinearly resized to 299 × 299 without antialiasing (torch
`interpolate(..., mode="bilinear", align_corners=False)`). Numbers match pytorch-fid, which
differ slightly from the TensorFlow FID code (different resizing); neither is comparable with
FIDs computed on other image sizes or from other checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from errors import MissingFileError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.npz"
DEFAULT_WEIGHTS = os.path.join("~", ".cache", "ddpm_jax", WEIGHTS_FILE)
SOURCE_FILE = "pt_inception-2015-12-05-6726825d.pth"
SOURCE_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
              + SOURCE_FILE)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> relu."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric (height, width) zero padding, as in torch

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # pytorch-fid's blocks average without counting the zero padding (the TF graph's behaviour).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b pools with an average (FIDInceptionE_1), Mixed_7c with a max (FIDInceptionE_2)."""

    pool: str  # "avg" | "max"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """images [B, H, W, C ∈ {1, 3}] in [-1, 1] -> (pool3 [B, 2048], logits [B, 1008]), float32."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                                 antialias=False)
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)           # [B, 149, 149]
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)                       # 147
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)      # 147
        x = _max_pool_3x3_s2(x)                                                  # 73
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)                      # 71
        x = _max_pool_3x3_s2(x)                                                  # 35
        x = InceptionA(32, name="Mixed_5b")(x)                                   # 256 ch
        x = InceptionA(64, name="Mixed_5c")(x)                                   # 288
        x = InceptionA(64, name="Mixed_5d")(x)                                   # 288
        x = InceptionB(name="Mixed_6a")(x)                                       # 17, 768
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)                                       # 8, 1280
        x = InceptionE("avg", name="Mixed_7b")(x)                                # 2048
        x = InceptionE("max", name="Mixed_7c")(x)                                # 2048
        pool3 = jnp.mean(x, axis=(1, 2))                                         # [B, 2048]
        logits = nn.Dense(NUM_LOGITS, name="fc")(pool3)                          # [B, 1008]
        return pool3, logits


def abstract_variables() -> dict:
    """Shapes and dtypes of InceptionV3's {"params", "batch_stats"} (nothing is allocated)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: InceptionV3().init(jax.random.key(0), x), x)


# --- PyTorch state_dict <-> Flax variables -------------------------------------------------------
# conv.weight [O, I, kh, kw] <-> params conv/kernel [kh, kw, I, O]; bn.weight/bias <-> params
# bn/scale/bias; bn.running_mean/var <-> batch_stats bn/mean/var; fc.weight [K, D] <-> fc/kernel
# [D, K]; fc.bias <-> fc/bias. torch's bn.num_batches_tracked counters are not weights: skipped.
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _flax_location(key: str) -> tuple[str, tuple[str, ...], bool]:
    """(collection, path, transpose?) of a torch state_dict key."""
    *modules, leaf = key.split(".")
    if modules and modules[-1] == "conv" and leaf == "weight":
        return "params", (*modules, "kernel"), True
    if modules and modules[-1] == "bn" and leaf in _BN:
        collection, name = _BN[leaf]
        return collection, (*modules, name), False
    if modules == ["fc"] and leaf in ("weight", "bias"):
        return "params", ("fc", "kernel" if leaf == "weight" else "bias"), leaf == "weight"
    raise ValueError(f"unexpected InceptionV3 weight {key!r}")


def _torch_layout(x: np.ndarray, transpose: bool) -> np.ndarray:
    return np.transpose(x, (3, 2, 0, 1) if x.ndim == 4 else (1, 0)) if transpose else x


def _flax_layout(x: np.ndarray, transpose: bool) -> np.ndarray:
    return np.transpose(x, (2, 3, 1, 0) if x.ndim == 4 else (1, 0)) if transpose else x


def torch_to_flax(arrays: Mapping[str, np.ndarray]) -> dict:
    """Flax variables from a pytorch-fid state_dict given as numpy arrays, checked key by key
    and shape by shape against the architecture."""
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, value in arrays.items():
        if key.endswith("num_batches_tracked"):
            continue
        collection, path, transpose = _flax_location(key)
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.asarray(_flax_layout(np.asarray(value), transpose), np.float32)
    _check_against_architecture(variables)
    return variables


def flax_to_torch(variables: Mapping) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: {torch key: array in torch layout}."""
    out = {}
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(variables[collection])[0]
        for path, value in flat:
            names = [p.key for p in path]
            *modules, leaf = names
            if modules == ["fc"]:
                key, transpose = f"fc.{'weight' if leaf == 'kernel' else 'bias'}", leaf == "kernel"
            elif leaf == "kernel":
                key, transpose = ".".join([*modules, "weight"]), True
            else:
                torch_leaf = {v: k for k, v in _BN.items()}[(collection, leaf)]
                key, transpose = ".".join([*modules, torch_leaf]), False
            out[key] = _torch_layout(np.asarray(value, np.float32), transpose)
    return out


def _check_against_architecture(variables: dict) -> None:
    want = {jax.tree_util.keystr(p): v.shape
            for p, v in jax.tree_util.tree_flatten_with_path(abstract_variables())[0]}
    got = {jax.tree_util.keystr(p): v.shape
           for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"InceptionV3 weights do not match the architecture: missing "
                         f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
                         f"({len(unexpected)}). Is this the pytorch-fid {SOURCE_FILE}?")
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    if bad:
        raise ValueError(f"InceptionV3 weights have wrong shapes (name, got, want): {bad[:5]}")


def save_npz(variables: Mapping, path: str) -> None:
    """Writes Flax variables as the converted-weights .npz (torch names and layouts)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **flax_to_torch(variables))


def load_variables(path: str = DEFAULT_WEIGHTS) -> dict:
    """Flax variables {"params", "batch_stats"} from the converted .npz (no pickles)."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise MissingFileError(
            f"InceptionV3 FID weights not found at {path}. Fix: download {SOURCE_FILE} from "
            f"{SOURCE_URL} and convert it once with `python -m evaluation.convert_inception "
            f"{SOURCE_FILE} {path}` (needs torch), or set --config.eval.inception_weights to "
            f"the converted .npz; or use --config.eval.feature_net=mnist_classifier for "
            f"mnist_5k.")
    with np.load(path, allow_pickle=False) as f:
        return torch_to_flax({k: f[k] for k in f.files})


def features_fn(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pool3 [B, 2048], logits [B, 1008]) of images [B, H, W, C] in [-1, 1]."""
    return InceptionV3().apply(variables, images)
