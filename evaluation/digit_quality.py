"""Generated digits judged as a user judges them: the asked digit, confidently, on a clean
background, and distributed like real digits.

All on uint8 images [N, 28, 28, 1] (what is written to disk), with the project's offline MNIST
classifier (evaluation/mnist_classifier.py) as the judge and its features for MNIST-FID:

* accuracy: the classifier's top class is the requested digit;
* confident: the classifier gives the requested digit probability >= CONFIDENT (0.9);
* border: the mean intensity in [0, 1] of the outer BORDER (4) pixels of every side, where
  real MNIST digits are black (~0.00): speckled backgrounds show here first;
* MNIST-FID: the Fréchet distance of the samples' classifier features to the real digits'
  (not comparable with Inception FID; the floor of real held-out digits is ~10.8 at 500).
"""

from __future__ import annotations

import numpy as np

from evaluation import fid
from evaluation.sample_quality import FeatureNet

BORDER = 4
CONFIDENT = 0.9


def border_mean(images: np.ndarray, border: int = BORDER) -> float:
    """Mean intensity in [0, 1] of the pixels within `border` of an edge, uint8 [N, H, W, C]."""
    x = np.asarray(images, np.float64) / 255.0
    inner = np.zeros(x.shape[1:3], bool)
    inner[border:-border, border:-border] = True
    return float(x[:, ~inner].mean())


def judge(net: FeatureNet, images: np.ndarray, requested: np.ndarray, *,
          real: fid.Stats | None = None, kid_subset_size: int = 100,
          num_splits: int = 1) -> dict[str, float]:
    """{"accuracy", "confident", "border"[, "fid"]} of uint8 digits [N, 28, 28, 1] asked to be
    `requested` [N]; "fid" (the Fréchet distance to `real`) when real statistics are given."""
    if images.dtype != np.uint8:
        raise ValueError(f"judge takes uint8 images (as written to disk), got {images.dtype}.")
    features, logits = net(images)
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    rows = np.arange(len(requested))
    out = {"accuracy": float(np.mean(np.argmax(logits, -1) == requested)),
           "confident": float(np.mean(probs[rows, requested] >= CONFIDENT)),
           "border": border_mean(images)}
    if real is not None:
        acc = fid.FeatureStats(len(images), num_splits=num_splits,
                               kid_max_features=real.kid_features.shape[0])
        acc.update(features, logits)
        fake = acc.finalize()
        out["fid"] = fid.frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    return out
