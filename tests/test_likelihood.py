"""The bound in bits/dim (evaluation/likelihood.py) against closed forms of the Gaussian oracle.

The data are 8-bit: x_0 = v/127.5 − 1 for uint8 v, v from a rounded N(μ, s²) (tests/
gaussian_oracle.py), fed through `dataset_batches` and `bound_on_dataset` exactly as --mode=eval
feeds the test split, with the oracle ε-model as the network. The oracle is the exact denoiser of
*continuous* N(μ, s²) data; on our 8-bit x_0 it is simply a fixed linear model, and the bound
given each x_0 still has closed forms (expectations over the noise ε only):

  * L_T: deterministic, ½(ᾱ x_0² + (1 − ᾱ) − log(1 − ᾱ) − 1) per dim at t = T − 1;
  * L_t, t ≥ 1: the posterior means differ by d = c1_t (x_0 − x̂_0) = c1_t (A + B ε), with
    A = (1 − k√ᾱ)(x_0 − μ), B = −k√(1 − ᾱ), k = √ᾱ s²/(ᾱ s² + 1 − ᾱ), so
    E[KL] = ½(log(σ²/β̃) + β̃/σ² − 1) + c1² (A² + B²)/(2σ²), Var[KL] = c1⁴ (4A²B² + 2B⁴)/(4σ⁴);
  * L_0: the discretized decoder with mean x̂_0 = m_0 + s_0 ε (linear in ε), its expectation
    over ε by 60-point Gauss–Hermite quadrature (the integrand is smooth in ε).

The eval draws one ε per (example, t, dim), so its result differs from these expectations by
Monte Carlo noise whose standard deviation we also know in closed form: we require agreement
within 4 standard deviations, and check that this is a tight test: the SD is < 0.01 bits/dim
(measured 0.006) against a bound of ~ 7.85 bits/dim, and fixed_large and learned_range (fed the
optimal variance) differ by 0.09 bits/dim, 15 SDs. (The bound is far above the differential
entropy of the continuous Gaussian because the 8-bit data are scored by the discretized decoder:
−log of a bin probability, not of a density.)
"""

import math

import gaussian_oracle as oracle
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import input_pipeline
import train_lib
from diffusion import schedules
from evaluation import likelihood

LOG2 = math.log(2.0)
T = 250
NUM_EXAMPLES, BATCH, SHAPE = 100, 64, (32, 32, 1)  # 100 = a full batch + a padded one


def _phi(z):  # the DDPM / guided-diffusion tanh approximation of the normal CDF
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def _closed_form(betas, x0, var_type):
    """Per-example expectations and Monte Carlo variances (bits/dim) of L_T, Σ_{t≥1} L_t, L_0."""
    ab = np.cumprod(1 - betas)
    c1, _, post_var = oracle.posterior_coefs(betas)
    x = x0.reshape(len(x0), -1).astype(np.float64)          # [N, D]
    d = x.shape[1]
    if var_type == "fixed_large":
        sigma2 = np.concatenate([[post_var[1]], betas[1:]])
    else:  # learned_range fed the optimal reverse variance
        sigma2 = oracle.optimal_reverse_variance(betas)
    prior = 0.5 * (ab[-1] * x**2 + (1 - ab[-1]) - np.log(1 - ab[-1]) - 1).mean(1) / LOG2

    # Only A depends on the pixel, through (x_0 − μ)²: per-example moments suffice. [T-1, N]
    m2 = ((x - oracle.MU) ** 2).mean(1)                                  # [N]
    a, b = np.sqrt(ab)[1:, None], np.sqrt(1 - ab)[1:, None]
    k = a * oracle.S2 / (a**2 * oracle.S2 + b**2)
    a2, b2 = (1 - k * a) ** 2 * m2, (k * b) ** 2                         # mean A², B²
    c1_, s2_, pv = c1[1:, None], sigma2[1:, None], post_var[1:, None]
    kl_mean = 0.5 * (np.log(s2_ / pv) + pv / s2_ - 1) + c1_**2 * (a2 + b2) / (2 * s2_)
    kl_var = c1_**4 * (4 * a2 * b2 + 2 * b2**2) / (4 * s2_**2) / d        # of the dim mean
    kl, kl_var = kl_mean.sum(0) / LOG2, kl_var.sum(0) / LOG2**2          # [N]

    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    k0 = math.sqrt(ab[0]) * oracle.S2 / (ab[0] * oracle.S2 + 1 - ab[0])
    m = oracle.MU + k0 * math.sqrt(ab[0]) * (x[..., None] - oracle.MU) \
        + k0 * math.sqrt(1 - ab[0]) * nodes                              # [N, D, nodes]
    sd = math.sqrt(sigma2[0])
    hi = np.where(x[..., None] > 0.999, 1.0, _phi((x[..., None] + 1 / 255 - m) / sd))
    lo = np.where(x[..., None] < -0.999, 0.0, _phi((x[..., None] - 1 / 255 - m) / sd))
    nll = -np.log(np.maximum(hi - lo, 1e-12)) / LOG2
    dec = (nll @ weights).mean(1)                                        # [N]
    dec_var = ((nll**2 @ weights) - (nll @ weights) ** 2).sum(1) / d**2  # [N]
    return prior, kl, kl_var, dec, dec_var


def _uint8_gaussian_images(seed=0):
    x = oracle.MU + math.sqrt(oracle.S2) * np.random.default_rng(seed).standard_normal(
        (NUM_EXAMPLES, *SHAPE))
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def _oracle_evaluator(betas, var_type, mesh=None):
    schedule = schedules.make_schedule(betas)
    ab = np.cumprod(1 - betas)
    values = None
    if var_type == "learned_range":
        values = oracle.learned_range_values(betas, oracle.optimal_reverse_variance(betas))
    eps_model = oracle.make_eps_model(ab, variance_values=values)
    with oracle.fast_inference():
        return likelihood.BoundEvaluator(lambda params, x, t, y: eps_model(x, t), schedule,
                                         mesh or train_lib.make_mesh(), prediction="eps",
                                         var_type=var_type)


def _bound(evaluator, source, **kwargs):
    return likelihood.bound_on_dataset(
        evaluator, None, likelihood.dataset_batches(source, batch_size=BATCH),
        num_batches=-(-len(source) // BATCH), seed=0, **kwargs)


@pytest.fixture(scope="module")
def data():
    images = _uint8_gaussian_images()
    return input_pipeline.ArraySource(images, np.zeros(len(images), np.int32))


@pytest.mark.parametrize("var_type", ["fixed_large", "learned_range"])
def test_oracle_bound_equals_the_closed_form(data, var_type):
    betas = schedules.get_betas("linear", T)
    result = _bound(_oracle_evaluator(betas, var_type), data, t_chunk=300)
    x0 = input_pipeline.preprocess(data.images, None)
    prior, kl, kl_var, dec, dec_var = _closed_form(betas, x0, var_type)
    n = len(x0)
    assert result.num_examples == n

    np.testing.assert_allclose(result.prior, prior.mean(), rtol=1e-3, atol=1e-8)
    kl_sd, dec_sd = math.sqrt(kl_var.sum()) / n, math.sqrt(dec_var.sum()) / n
    total_sd = math.hypot(kl_sd, dec_sd)
    exact = prior.mean() + kl.mean() + dec.mean()
    assert total_sd < 0.01 and exact > 5.0  # the tolerance below is tight
    assert abs(result.kl_sum - kl.mean()) < 4 * kl_sd
    assert abs(result.decoder - dec.mean()) < 4 * dec_sd
    assert abs(result.total - exact) < 4 * total_sd, (result.total, exact, total_sd)
    # the breakdown adds up, and the per-timestep means are those of the sum
    np.testing.assert_allclose(result.prior + result.decoder + result.kl_sum, result.total)
    np.testing.assert_allclose(np.sum(result.per_timestep), result.decoder + result.kl_sum)
    np.testing.assert_allclose(sum(result.ranges.values()), result.decoder + result.kl_sum)
    assert list(result.ranges)[0] == "t0000-0024" and len(result.ranges) == 10


def test_chunks_and_device_count_do_not_change_the_bound(data):
    """Noise is fold_in(fold_in(key, batch), t) for the global batch: chunking the timesteps or
    sharding the batch over 8 devices instead of 1 leaves every term the same."""
    betas = schedules.get_betas("linear", 100)
    source = input_pipeline.ArraySource(data.images[:40], data.labels[:40])
    whole = _bound(_oracle_evaluator(betas, "fixed_large"), source)
    evaluator = _oracle_evaluator(betas, "fixed_large")
    chunked = _bound(evaluator, source, t_chunk=7)  # 15 chunks, the last padded, 2 batches
    assert evaluator.num_traces == 1
    one_device = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,),
                               devices=jax.devices()[:1])
    single = _bound(_oracle_evaluator(betas, "fixed_large", one_device), source, t_chunk=7)
    np.testing.assert_allclose(chunked.per_timestep, whole.per_timestep, rtol=1e-12)
    np.testing.assert_allclose(single.per_timestep, whole.per_timestep, rtol=1e-6)
    assert whole.total == pytest.approx(chunked.total, rel=1e-12)


def test_stratified_estimate_is_unbiased_and_covers_every_timestep():
    rng = np.random.default_rng(0)
    terms = rng.gamma(0.5, 1.0, size=T)  # any per-timestep values
    ts, w = likelihood.stratified_timesteps(T, 32, rng, batch_size=4000)   # [33, 4000], [33]
    assert ts.shape == (33, 4000) and np.all(ts[0] == 0) and w[0] == 1 and w.sum() == T
    assert np.all(np.diff(ts[1:], axis=0) > 0)  # one per stratum, in order
    np.testing.assert_array_equal(np.unique(ts), np.arange(T))
    estimates = w @ terms[ts]                                                # [4000]
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - terms.sum()) < 4 * se


def test_estimate_of_the_oracle_bound_agrees_with_the_full_bound(data):
    betas = schedules.get_betas("linear", T)
    evaluator = _oracle_evaluator(betas, "fixed_large")
    source = input_pipeline.ArraySource(data.images[:64], data.labels[:64])
    full = _bound(evaluator, source)
    estimate = _bound(evaluator, source, estimate_timesteps=32)
    assert estimate.estimate and not full.estimate
    assert estimate.decoder == pytest.approx(full.decoder, rel=0.05)
    assert abs(estimate.total - full.total) < 4 * math.hypot(estimate.total_stderr,
                                                             full.total_stderr)
