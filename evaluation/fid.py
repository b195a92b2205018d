"""Sample-quality metrics from network features: Fréchet distance, KID and Inception Score.

For features f of real (r) and generated (g) images, with means μ and covariances Σ:

    FD  = ‖μ_r − μ_g‖² + tr Σ_r + tr Σ_g − 2 tr (Σ_r^½ Σ_g Σ_r^½)^½          (Heusel et al. 2017)
    KID = unbiased MMD² with the kernel k(a, b) = (aᵀb / D + 1)³, averaged over random subsets
          (Bińkowski et al. 2018):
          MMD²_u = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(m(m−1))
                   − 2 Σ_{i,j} k(x_i, y_j)/m²
    IS  = exp E_x KL(p(y|x) ‖ p(y)), per split of the samples; mean and std over splits
          (Salimans et al. 2016, 10 splits).

tr (Σ_r Σ_g)^½ = tr (Σ_r^½ Σ_g Σ_r^½)^½ is the sum of the singular values of Σ_g^½ Σ_r^½ (symmetric
eigendecomposition square roots), so it is real and needs no scipy.linalg.sqrtm.

`FeatureStats` accumulates everything in one streaming pass: running mean and covariance
(Chan et al.'s pairwise update, float64), per-split IS sums, and a uniform reservoir of features
for KID, so 50k samples never need 50k images (or 50k feature rows) in memory.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a covariance (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1 [D], sigma1 [D, D]) and N(mu2, sigma2), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{sigma1.shape} vs "
                         f"{mu2.shape}/{sigma2.shape}; were they made by the same network?")
    # tr (Σ1^½ Σ2 Σ1^½)^½ is the sum of the singular values of Σ2^½ Σ1^½: no squared condition
    # number, no complex round-off, and exactly 0 − 0 for identical inputs up to float64 eps.
    tr_covmean = np.sum(np.linalg.svd(_psd_sqrt(sigma2) @ _psd_sqrt(sigma1), compute_uv=False))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(a, b) = (aᵀb / D + 1)³ for rows of x [N, D], y [M, D] -> [N, M], float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD² between the rows of x [m, D] and y [n, D] (U-statistic:
    the diagonals k(x_i, x_i), k(y_j, y_j) are left out)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of `mmd2_unbiased` over `num_subsets` random subsets of min(subset_size,
    len(x), len(y)) rows of each (drawn without replacement within a subset)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {len(x)}, {len(y)}")
    values = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)],
                            y[rng.choice(len(y), m, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class Stats:
    """Finished statistics of one image set under one feature network."""

    count: int
    mu: np.ndarray            # [D] float64
    sigma: np.ndarray         # [D, D] float64, unbiased (divided by count - 1)
    kid_features: np.ndarray  # [min(count, kid_max_features), D] float32, a uniform subset
    is_mean: float            # Inception Score of this set (mean over splits)
    is_std: float

    def save(self, path: str) -> None:
        """An .npz of plain arrays (no pickles); written to a temporary name, then renamed."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, count=self.count, mu=self.mu, sigma=self.sigma,
                 kid_features=self.kid_features, is_mean=self.is_mean, is_std=self.is_std)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Stats:
        with np.load(path, allow_pickle=False) as f:
            return cls(count=int(f["count"]), mu=f["mu"], sigma=f["sigma"],
                       kid_features=f["kid_features"], is_mean=float(f["is_mean"]),
                       is_std=float(f["is_std"]))


class FeatureStats:
    """Streaming statistics of `num_examples` feature rows fed in batches by `update`.

    Rows are assigned to IS split i·num_splits // num_examples by their position in the stream,
    as the usual non-streaming IS code splits an array of samples.
    """

    def __init__(self, num_examples: int, *, num_splits: int = 10,
                 kid_max_features: int = 10_000, seed: int = 0):
        if num_examples < 2:
            raise ValueError(f"need at least 2 examples for a covariance, got {num_examples}")
        self.num_examples = num_examples
        self.num_splits = max(1, min(num_splits, num_examples))
        self._kid_max = kid_max_features
        self._rng = np.random.default_rng(seed)
        self.count = 0
        self._mean = self._m2 = None            # [D], [D, D] float64
        self._kid: np.ndarray | None = None     # [kid_max, D] float32 reservoir
        self._plogp = np.zeros(self.num_splits)           # Σ_x Σ_y p log p per split
        self._psum: np.ndarray | None = None               # [splits, K] Σ_x p(y|x)
        self._split_count = np.zeros(self.num_splits)

    def update(self, features: np.ndarray, logits: np.ndarray) -> None:
        """features [n, D], logits [n, K] of the next n examples of the stream."""
        f = np.asarray(features, np.float64)
        n = len(f)
        if self.count + n > self.num_examples:
            raise ValueError(f"got {self.count + n} examples, more than the {self.num_examples} "
                             f"announced")
        if self._mean is None:
            d = f.shape[1]
            self._mean, self._m2 = np.zeros(d), np.zeros((d, d))
            self._kid = np.zeros((min(self._kid_max, self.num_examples), d), np.float32)
            self._psum = np.zeros((self.num_splits, logits.shape[1]))
        # Chan et al.: merge the batch's mean and centred scatter into the running ones.
        batch_mean = f.mean(0)
        centred = f - batch_mean
        delta = batch_mean - self._mean
        total = self.count + n
        self._m2 += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self._reservoir(f)
        log_p = _log_softmax(logits)
        p = np.exp(log_p)
        split = (np.arange(self.count, total) * self.num_splits) // self.num_examples
        np.add.at(self._plogp, split, np.sum(p * log_p, axis=1))
        np.add.at(self._psum, split, p)
        np.add.at(self._split_count, split, 1.0)
        self.count = total

    def _reservoir(self, f: np.ndarray) -> None:
        # Algorithm R: after i rows, each is kept with probability k/i, independently of order.
        k = len(self._kid)
        for i, row in zip(range(self.count, self.count + len(f)), f, strict=True):
            j = i if i < k else int(self._rng.integers(0, i + 1))
            if j < k:
                self._kid[j] = row

    def finalize(self) -> Stats:
        if self.count != self.num_examples:
            raise ValueError(f"saw {self.count} of the {self.num_examples} announced examples")
        p_y = self._psum / self._split_count[:, None]                      # [splits, K]
        log_p_y = np.log(np.maximum(p_y, 1e-300))
        kl = (self._plogp - np.sum(self._psum * log_p_y, axis=1)) / self._split_count
        scores = np.exp(kl)
        return Stats(count=self.count, mu=self._mean.copy(),
                     sigma=self._m2 / (self.count - 1), kid_features=self._kid.copy(),
                     is_mean=float(scores.mean()), is_std=float(scores.std()))


def compare(real: Stats, fake: Stats, *, kid_num_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FD, KID (mean and std over subsets) and the IS of `fake`, as plain floats."""
    kid, kid_std = kernel_inception_distance(
        real.kid_features, fake.kid_features, num_subsets=kid_num_subsets,
        subset_size=kid_subset_size, seed=seed)
    return {"fid": frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma),
            "kid": kid, "kid_std": kid_std, "is": fake.is_mean, "is_std": fake.is_std}
