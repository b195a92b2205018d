"""The DDPM variational bound on a dataset, in bits/dim, with its per-term breakdown.

For 8-bit images x_0 ∈ {−1, −1 + 2/255, ..., 1}^D (uint8 v ↦ v/127.5 − 1) the negative ELBO is

    L = L_T + Σ_{t=1}^{T−1} L_t + L_0                                       (0-based t)
    L_T = KL(q(x_{T−1} | x_0) ‖ N(0, I))                          `losses.prior_bpd`
    L_t = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)),  x_t ~ q(x_t | x_0)   `losses.vlb_terms`
    L_0 = −log p_θ(x_0 | x_1), the discretized Gaussian decoder          `losses.vlb_terms`, t = 0

in bits per dimension, so L upper-bounds −log₂ P(x_0)/D of the discrete data, comparable with
DDPM's 3.70 (≤ 3.75) on CIFAR-10. Each L_t is a one-sample Monte Carlo estimate (one x_t per
example and t), so the dataset mean is unbiased with a standard error that we report.

`BoundEvaluator` computes terms [B, K] for K given timesteps in one jitted call (a `lax.scan` over
the timesteps, the batch sharded on the mesh "data" axis). The noise for (batch b, timestep t) is
drawn from fold_in(fold_in(key, b), t) for the whole global batch, so the result depends neither
on the device count nor on how the timesteps are chunked. (Estimates draw their timesteps per
example, and key the noise by the stratum instead.)

`bound_on_dataset` runs all T timesteps in chunks (a progress line per chunk) and returns a
`BoundResult`. With `estimate_timesteps` it is a cheap unbiased estimate instead: L_0 exactly,
and Σ_{t≥1} L_t from one uniformly drawn timestep per example and stratum of K contiguous strata,
weighted by the stratum size (`stratified_timesteps`); examples stay independent, so its standard
error is valid too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cpu_runtime
import input_pipeline
import metric_logging
from diffusion import gaussian, losses
from diffusion.schedules import Schedule

# model_fn(params, x_t [B, H, W, C], t int32 [B], cond) -> network output; cond is the
# conditioning pytree of models/conditioning.py, fields [B, ...] (e.g. {"label": int32 [B]}).
ModelFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


class BoundEvaluator:
    """Jitted, batch-sharded per-timestep terms of the bound for one batch size."""

    def __init__(self, model_fn: ModelFn, schedule: Schedule, mesh: jax.sharding.Mesh, *,
                 prediction: str, var_type: str):
        self.num_timesteps = schedule.num_timesteps
        self.num_traces = 0  # one per distinct number of timesteps per call
        data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

        def terms(params, x0, cond, timesteps, positions, key):
            # x0 [B, H, W, C] in [-1, 1], cond fields [B, ...], timesteps [K, B] int32 (per
            # example), positions [K] int32 (the noise of row k is keyed by positions[k])
            # -> [B, K], [B]
            self.num_traces += 1
            def one_row(_, row):
                t, position = row
                noise = jax.random.normal(jax.random.fold_in(key, position), x0.shape,
                                          jnp.float32)
                x_t = gaussian.q_sample(schedule, x0, t, noise)
                out = model_fn(params, x_t, t, cond)
                return None, losses.vlb_terms(schedule, out, x0, x_t, t,
                                              prediction=prediction, var_type=var_type)

            _, per_t = jax.lax.scan(one_row, None, (timesteps, positions))   # [K, B]
            return per_t.T, losses.prior_bpd(schedule, x0)

        rows = NamedSharding(mesh, P(None, "data"))
        self._terms = jax.jit(
            terms, in_shardings=(replicated, data, data, rows, replicated, replicated),
            out_shardings=(data, data), compiler_options=cpu_runtime.inference_compiler_options())
        self._data, self._rows = data, rows

    def __call__(self, params, x0: np.ndarray, cond: dict, timesteps: np.ndarray,
                 key: jax.Array, positions: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(terms [B, K], prior [B]) in bits/dim on the host, float64.

        x0 [B, H, W, C] in [-1, 1]; cond fields [B, ...]; timesteps [K] (shared by the batch) or
        [K, B] (per example);
        the noise of row k is keyed by positions[k] (default: the timesteps, which must then be
        shared), so a timestep gets the same noise whatever chunk it is evaluated in.
        """
        timesteps = np.asarray(timesteps, np.int32)
        if positions is None:
            if timesteps.ndim != 1:
                raise ValueError("per-example timesteps [K, B] need explicit positions [K]")
            positions = timesteps
        timesteps = np.broadcast_to(timesteps.reshape(len(timesteps), -1),
                                    (len(timesteps), len(x0)))
        terms, prior = self._terms(
            params, jax.device_put(jnp.asarray(x0, jnp.float32), self._data),
            jax.device_put({name: jnp.asarray(v) for name, v in cond.items()}, self._data),
            jax.device_put(jnp.asarray(timesteps), self._rows),
            jnp.asarray(positions, jnp.int32), key)
        return (np.asarray(jax.device_get(terms), np.float64),
                np.asarray(jax.device_get(prior), np.float64))


def stratified_timesteps(num_timesteps: int, num_strata: int, rng: np.random.Generator,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [K + 1, B], weights [K + 1]): row 0 is t = 0 with weight 1; row i ≥ 1 holds,
    for each example independently, a uniform draw from the i-th of K near-equal contiguous
    strata of 1..T−1, weighted by the stratum's size. So Σ_i w_i L_{t_i} is an unbiased estimate
    of Σ_{t=0}^{T−1} L_t for each example, independently across examples."""
    num_strata = min(num_strata, num_timesteps - 1)
    edges = np.linspace(1, num_timesteps, num_strata + 1).round().astype(np.int64)
    draws = rng.integers(edges[:-1, None], edges[1:, None], size=(num_strata, batch_size))
    return (np.concatenate([np.zeros((1, batch_size), np.int64), draws]).astype(np.int32),
            np.concatenate([[1.0], np.diff(edges).astype(np.float64)]))


def timestep_ranges(num_timesteps: int, num_ranges: int = 10) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of 0..T−1 for the per-range breakdown."""
    edges = np.linspace(0, num_timesteps, min(num_ranges, num_timesteps) + 1).round()
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@dataclasses.dataclass
class BoundResult:
    """Dataset means in bits/dim. Paper notation: per_timestep[0] is L_0, per_timestep[t] is the
    KL at the paper's step t + 1 (its L_t), prior is L_T."""

    num_examples: int
    total: float              # L_T + Σ_t L_t, the bound
    total_stderr: float       # standard error of `total` over examples (incl. Monte Carlo noise)
    prior: float              # L_T
    decoder: float            # L_0
    kl_sum: float             # Σ_{t=1}^{T−1} L_t
    per_timestep: np.ndarray  # [T] mean L_t; NaN where not evaluated (estimates)
    ranges: dict[str, float]  # "t0000-0099": Σ of L_t over the range (empty for estimates)
    estimate: bool            # True: stratified timesteps, not all T

    def scalars(self, prefix: str = "") -> dict[str, float]:
        out = {"bpd": self.total, "bpd_stderr": self.total_stderr, "bpd_prior_LT": self.prior,
               "bpd_decoder_L0": self.decoder, "bpd_kl_sum": self.kl_sum}
        out.update({f"bpd_range/{k}": v for k, v in self.ranges.items()})
        return {prefix + k: v for k, v in out.items()}

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["per_timestep"] = [None if math.isnan(v) else float(v) for v in self.per_timestep]
        return d


def dataset_batches(source: input_pipeline.Source, *, batch_size: int, num_examples: int = 0,
                    cond_fn: Callable[[np.ndarray, np.ndarray, int], dict] | None = None
                    ) -> Iterator[tuple[np.ndarray, dict, np.ndarray]]:
    """(images [B, H, W, C] in [-1, 1], cond, mask [B]) over the first `num_examples` (0 = all)
    examples in order; the last batch is padded by repeating example 0, mask False.

    cond: {"label": [B]}, or cond_fn(dataset indices [B], labels [B], batch number) (e.g. the
    caption embeddings of a text model)."""
    n = len(source) if num_examples <= 0 else min(num_examples, len(source))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        images, labels = source.get(np.where(mask, idx, 0))
        labels = labels.astype(np.int32)
        cond = {"label": labels}
        if cond_fn is not None:
            cond = cond_fn(np.where(mask, idx, 0), labels, start // batch_size)
        yield input_pipeline.preprocess(images, None), cond, mask


def bound_on_dataset(evaluator: BoundEvaluator, params, batches: Iterable, *, num_batches: int,
                     seed: int, t_chunk: int = 0, estimate_timesteps: int = 0,
                     log: Callable[[str], None] | None = None) -> BoundResult:
    """The bound over `batches` (from `dataset_batches`).

    All T timesteps in jitted chunks of `t_chunk` (0 = all at once), or, with
    `estimate_timesteps` = K > 0, the stratified estimate with K + 1 timesteps per batch.
    `log` receives a progress line (steps/s, ETA) after each call.
    """
    T = evaluator.num_timesteps
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)
    chunk = T if t_chunk <= 0 else min(t_chunk, T)
    sums = np.zeros(T)            # Σ over examples of L_t
    counts = np.zeros(T)          # examples evaluated at t
    prior_sum = total_sum = total_sq = 0.0
    n = 0
    work = num_batches * (estimate_timesteps + 1 if estimate_timesteps else T)
    progress = None  # "img/s" of its line: images denoised per second
    done = 0
    start_time = time.perf_counter()
    for b, (x0, cond, mask) in enumerate(batches):
        progress = progress or metric_logging.Progress(0, work, len(mask))
        batch_key = jax.random.fold_in(key, b)
        if estimate_timesteps:
            ts, weights = stratified_timesteps(T, estimate_timesteps, rng, len(mask))
            chunks = [(ts, weights, np.arange(len(ts)))]
        else:
            # Every chunk has `chunk` timesteps (one shape, one compilation); the last is padded
            # with T − 1 at weight 0.
            chunks = []
            for i in range(0, T, chunk):
                ts = np.minimum(np.arange(i, i + chunk), T - 1)
                weights = (np.arange(i, i + chunk) < T).astype(float)
                chunks.append((np.broadcast_to(ts[:, None], (chunk, len(mask))), weights, ts))
        per_example = np.zeros(len(mask))
        for ts_c, w_c, positions in chunks:
            terms, prior = evaluator(params, x0, cond, ts_c, batch_key, positions)  # [B, K]
            terms = terms[mask]
            per_example[mask] += terms @ w_c
            used = w_c > 0
            t_used = ts_c[used][:, mask]                                        # [K', n]
            np.add.at(sums, t_used.ravel(), terms[:, used].T.ravel())
            np.add.at(counts, t_used.ravel(), 1.0)
            done += int(used.sum())
            if log:
                rates = progress.update(done)
                log("bpd " + progress.line(done, {"examples": n + mask.sum()}, rates))
        per_example[mask] += prior[mask]
        prior_sum += prior[mask].sum()
        total_sum += per_example[mask].sum()
        total_sq += np.square(per_example[mask]).sum()
        n += int(mask.sum())
    if log:
        log(f"bpd: {n} examples, {done} timestep-batches in "
            f"{metric_logging.format_duration(time.perf_counter() - start_time)}")
    with np.errstate(invalid="ignore", divide="ignore"):
        per_t = np.where(counts > 0, sums / counts, np.nan)
    mean = total_sum / n
    var = max(total_sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    prior_mean = prior_sum / n
    decoder = float(per_t[0])
    return BoundResult(
        num_examples=n, total=float(mean), total_stderr=float(math.sqrt(var / n)),
        prior=float(prior_mean), decoder=decoder, kl_sum=float(mean - prior_mean - decoder),
        per_timestep=per_t,
        ranges={} if estimate_timesteps else {f"t{a:04d}-{b - 1:04d}": float(np.sum(per_t[a:b]))
                                              for a, b in timestep_ranges(T)},
        estimate=bool(estimate_timesteps))
