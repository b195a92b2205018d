"""Closed-form oracle for diffusion of Gaussian data, x_0 ~ N(μ, s² I) (each dimension iid).

With a = √ᾱ_t, b² = 1 - ᾱ_t and x_t = a x_0 + b ε, (x_0, ε, x_t) are jointly Gaussian, so

    Var(x_t) = ᾱ_t s² + 1 - ᾱ_t,
    E[ε | x_t]   = b (x_t - a μ) / Var(x_t),                    (the optimal ε-predictor)
    E[x_0 | x_t] = μ + a s² (x_t - a μ) / Var(x_t),
    Var(x_0 | x_t) = s² (1 - ᾱ_t) / Var(x_t),

and the true reverse kernel q(x_{t-1} | x_t) is Gaussian with mean μ̃_t(E[x_0 | x_t], x_t) and
variance β̃_t + c1_t² Var(x_0 | x_t) (c1_t = β_t √ᾱ_{t-1}/(1 - ᾱ_t)). Every sampler step with this
oracle is an affine map of x_t plus independent Gaussian noise, so the exact distribution of a
sampler's output is N(m, v) with (m, v) from a scalar recursion (`chain_moments`).

Written in float64 numpy from the definitions, independent of `diffusion/`, for reuse by the
sampling and evaluation tests. Timesteps are 0-based as in diffusion/schedules.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import cpu_runtime

MU = 0.3  # data mean used by the oracle tests
S2 = 0.25  # data variance (s = 0.5)

# conftest.py compiles the suite without LLVM's optimisation passes: most tests compile far longer
# than they run. A sampler chain on the oracle is the opposite (thousands of samples through up
# to 1,000 steps of element-wise code XLA emits itself: test_guidance's chains ran 8 s at level 0,
# under 2 s optimised), so its programs ask for XLA's level 2 (LLVM -O2; XLA's default is 3).
# Same HLO, same float32 semantics (no fast-math either way). Where conftest did not turn the
# passes off (DDPM_TEST_XLA_OPT=1, or a level chosen in XLA_FLAGS), nothing is overridden.
OPTIMIZED = ({"xla_backend_optimization_level": 2}
             if os.environ.get("DDPM_TEST_UNOPTIMIZED") == "1" else {})
fast_jit = functools.partial(jax.jit, compiler_options=OPTIMIZED)


@contextlib.contextmanager
def fast_inference():
    """Inside: the library's inference programs built here (sampling_lib.Sampler and
    likelihood.BoundEvaluator take their options from cpu_runtime.inference_compiler_options at
    construction) compile with OPTIMIZED too, as fast_jit."""
    original = cpu_runtime.inference_compiler_options
    cpu_runtime.inference_compiler_options = lambda: {**original(), **OPTIMIZED}
    try:
        yield
    finally:
        cpu_runtime.inference_compiler_options = original


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - np.asarray(betas, np.float64))


def eps_oracle(alpha_bar, x_t, mu: float = MU, s2: float = S2):
    """E[ε | x_t] = √(1-ᾱ) (x_t - √ᾱ μ) / (ᾱ s² + 1 - ᾱ); numpy or jnp, broadcasting."""
    return (
        (1.0 - alpha_bar) ** 0.5 * (x_t - alpha_bar**0.5 * mu) / (alpha_bar * s2 + 1.0 - alpha_bar)
    )


def x0_posterior_mean(alpha_bar, x_t, mu: float = MU, s2: float = S2):
    """E[x_0 | x_t] = μ + √ᾱ s² (x_t - √ᾱ μ) / (ᾱ s² + 1 - ᾱ)."""
    return mu + alpha_bar**0.5 * s2 * (x_t - alpha_bar**0.5 * mu) / (alpha_bar * s2 + 1 - alpha_bar)


def x0_posterior_variance(alpha_bar, s2: float = S2):
    """Var(x_0 | x_t) = s² (1 - ᾱ) / (ᾱ s² + 1 - ᾱ)."""
    return s2 * (1.0 - alpha_bar) / (alpha_bar * s2 + 1.0 - alpha_bar)


def posterior_coefs(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c1, c2, β̃) of q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, β̃), from Bayes' rule.

    Prior x_{t-1} | x_0 ~ N(√ᾱ_{t-1} x_0, 1 - ᾱ_{t-1}), likelihood x_t | x_{t-1} ~
    N(√α_t x_{t-1}, β_t): precision 1/(1 - ᾱ_{t-1}) + α_t/β_t. At t = 0 the prior is a point mass.
    """
    betas = np.asarray(betas, np.float64)
    alpha = 1.0 - betas
    ab_prev = np.append(1.0, alphas_cumprod(betas)[:-1])
    c1, c2, var = np.ones_like(betas), np.zeros_like(betas), np.zeros_like(betas)
    prec = 1.0 / (1.0 - ab_prev[1:]) + alpha[1:] / betas[1:]
    var[1:] = 1.0 / prec
    c1[1:] = var[1:] * np.sqrt(ab_prev[1:]) / (1.0 - ab_prev[1:])
    c2[1:] = var[1:] * np.sqrt(alpha[1:]) / betas[1:]
    return c1, c2, var


def optimal_reverse_variance(betas: np.ndarray, s2: float = S2) -> np.ndarray:
    """Variance of the true reverse kernel q(x_{t-1} | x_t): β̃_t + c1_t² Var(x_0 | x_t). [T]"""
    c1, _, var = posterior_coefs(betas)
    return var + c1**2 * x0_posterior_variance(alphas_cumprod(betas), s2)


def learned_range_values(betas: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """The iDDPM output v ∈ [-1, 1] per t with exp(f log β_t + (1-f) log β̃_t^clip) = variance,
    f = (v + 1)/2 (β̃_0 clipped to β̃_1 as in DDPM)."""
    _, _, post_var = posterior_coefs(betas)
    min_log = np.log(np.append(post_var[1], post_var[1:]))
    frac = (np.log(variances) - min_log) / (np.log(betas) - min_log)
    if np.any(frac < 0.0) or np.any(frac > 1.0):
        raise ValueError("variance outside [β̃_t, β_t]; not representable by learned_range")
    return 2.0 * frac - 1.0


def make_eps_model(
    alphas_cumprod_np: np.ndarray,
    mu: float = MU,
    s2: float = S2,
    variance_values: np.ndarray | None = None,
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """model_fn(x_t [B, ..., C], t int32 [B]) -> E[ε | x_t] in x_t's dtype (computed in float32).

    With variance_values ([T], from `learned_range_values`) the output has 2C channels
    [ε, v_t], the learned_range layout.
    """
    ab = np.asarray(alphas_cumprod_np, np.float64)
    # Coefficients in float64, cast once: 1 - ᾱ in float32 would cancel at small t.
    sqrt_ab = jnp.asarray(np.sqrt(ab), jnp.float32)
    eps_gain = jnp.asarray(np.sqrt(1.0 - ab) / (ab * s2 + 1.0 - ab), jnp.float32)
    values = None if variance_values is None else jnp.asarray(variance_values, jnp.float32)

    def model_fn(x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        shape = t.shape + (1,) * (x_t.ndim - 1)
        x = x_t.astype(jnp.float32)
        eps = eps_gain[t].reshape(shape) * (x - sqrt_ab[t].reshape(shape) * mu)
        if values is not None:
            eps = jnp.concatenate([eps, jnp.broadcast_to(values[t].reshape(shape), eps.shape)], -1)
        return eps.astype(x_t.dtype)

    return model_fn


# One reverse step as an affine-Gaussian map: x_prev = gain · x_t + offset + N(0, noise_var).
Step = tuple[float, float, float]


def chain_moments(steps: list[Step], mean: float = 0.0, var: float = 1.0) -> tuple[float, float]:
    """Mean and variance of the output of the steps (applied in order) from x ~ N(mean, var)."""
    for gain, offset, noise_var in steps:
        mean, var = gain * mean + offset, gain**2 * var + noise_var
    return mean, var


def ancestral_steps(
    betas: np.ndarray, sigma2: np.ndarray, mu: float = MU, s2: float = S2
) -> list[Step]:
    """Ancestral steps t = T-1..0: x_{t-1} = c1 E[x_0|x_t] + c2 x_t + σ_t z, no noise at t = 0."""
    ab = alphas_cumprod(betas)
    c1, c2, _ = posterior_coefs(betas)
    steps = []
    for t in range(len(betas) - 1, -1, -1):
        k = math.sqrt(ab[t]) * s2 / (ab[t] * s2 + 1.0 - ab[t])  # E[x0|x] = k x + μ(1 - k√ᾱ)
        gain = c1[t] * k + c2[t]
        offset = c1[t] * mu * (1.0 - k * math.sqrt(ab[t]))
        steps.append((gain, offset, float(sigma2[t]) if t > 0 else 0.0))
    return steps


def ddim_steps(
    alphas_cumprod_steps: np.ndarray, eta: float, mu: float = MU, s2: float = S2
) -> list[Step]:
    """DDIM steps over the (respaced) ᾱ sequence, from the last index down to 0:
    x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z, ε̂ = (x - √ᾱ x̂_0)/√(1 - ᾱ)."""
    ab = np.asarray(alphas_cumprod_steps, np.float64)
    ab_prev = np.append(1.0, ab[:-1])
    steps = []
    for i in range(len(ab) - 1, -1, -1):
        a, p = ab[i], ab_prev[i]
        k = math.sqrt(a) * s2 / (a * s2 + 1.0 - a)
        x0_gain, x0_offset = k, mu * (1.0 - k * math.sqrt(a))
        eps_gain = (1.0 - math.sqrt(a) * x0_gain) / math.sqrt(1.0 - a)
        eps_offset = -math.sqrt(a) * x0_offset / math.sqrt(1.0 - a)
        sigma2 = eta**2 * (1.0 - p) / (1.0 - a) * (1.0 - a / p)
        dir_coef = math.sqrt(max(1.0 - p - sigma2, 0.0))
        gain = math.sqrt(p) * x0_gain + dir_coef * eps_gain
        offset = math.sqrt(p) * x0_offset + dir_coef * eps_offset
        steps.append((gain, offset, sigma2))
    return steps


def _denoiser(sigma: float, mu: float, s2: float) -> tuple[float, float]:
    """(k, m) of the exact denoiser D(x̃; σ) = E[x_0 | x̃] = k x̃ + m for x̃ = x_0 + σ ε (Bayes)."""
    k = s2 / (s2 + sigma**2)
    return k, (1.0 - k) * mu


def heun_steps(alphas_cumprod_steps: np.ndarray, mu: float = MU, s2: float = S2) -> list[Step]:
    """Heun steps (Karras et al. 2022, Algorithm 1, S_churn = 0) over the (respaced) ᾱ sequence,
    from the last index down to 0, with the exact denoiser; each an affine map of x (no noise).

    In x̃ = x/√ᾱ, σ = √(1/ᾱ - 1) (σ = 0 after index 0): d = (x̃ - D(x̃; σ))/σ; Euler
    x̃' = x̃ + (σ' - σ) d; unless σ' = 0, d' = (x̃' - D(x̃'; σ'))/σ' and x̃ ← x̃ + (σ' - σ)(d + d')/2;
    then x' = √ᾱ' x̃. Affine maps are carried as (gain, offset) pairs of x_i.
    """
    ab = np.asarray(alphas_cumprod_steps, np.float64)
    sigma = np.sqrt(1.0 / ab - 1.0)
    steps = []
    for i in range(len(ab) - 1, -1, -1):
        s_now, s_next = sigma[i], (sigma[i - 1] if i > 0 else 0.0)
        g, c = 1.0 / math.sqrt(ab[i]), 0.0  # x̃_i = g x_i + c
        k, m = _denoiser(s_now, mu, s2)
        dg, dc = (1.0 - k) * g / s_now, ((1.0 - k) * c - m) / s_now
        eg, ec = g + (s_next - s_now) * dg, c + (s_next - s_now) * dc
        if s_next > 0.0:
            k, m = _denoiser(s_next, mu, s2)
            d2g, d2c = (1.0 - k) * eg / s_next, ((1.0 - k) * ec - m) / s_next
            eg = g + (s_next - s_now) * (dg + d2g) / 2.0
            ec = c + (s_next - s_now) * (dc + d2c) / 2.0
        scale = math.sqrt(ab[i - 1]) if i > 0 else 1.0  # x = √ᾱ x̃; ᾱ = 1 after index 0
        steps.append((scale * eg, scale * ec, 0.0))
    return steps


def probability_flow_limit(
    alpha_bar_first: float, alpha_bar_last: float, mu: float = MU, s2: float = S2
) -> Step:
    """What a deterministic sampler whose timesteps run from ᾱ_first (noisiest) to ᾱ_last tends to
    as its steps K → ∞: the exact probability-flow ODE from σ_first to σ_last, then the last step's
    x̂_0 = D(x̃; σ_last). For Gaussian data dx̃/dσ = (x̃ - D)/σ = (x̃ - μ) σ/(s² + σ²), so x̃ - μ
    scales by √((s² + σ_last²)/(s² + σ_first²)). Returned as an affine map of x_first."""
    var_first, var_last = 1.0 / alpha_bar_first - 1.0, 1.0 / alpha_bar_last - 1.0
    ratio = math.sqrt((s2 + var_last) / (s2 + var_first))
    k, _ = _denoiser(math.sqrt(var_last), mu, s2)
    return k * ratio / math.sqrt(alpha_bar_first), mu * (1.0 - k * ratio), 0.0


def gaussian_entropy_bits(s2: float = S2) -> float:
    """Differential entropy of N(μ, s²) per dimension in bits: ½ log₂(2πe s²)."""
    return 0.5 * math.log2(2.0 * math.pi * math.e * s2)


def gaussian_kl(m1: float, v1: float, m2: float, v2: float) -> float:
    """KL(N(m1, v1) ‖ N(m2, v2)) in nats."""
    return 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)
