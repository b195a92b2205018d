"""Noise schedules β_1..β_T and the frozen `Schedule` pytree of derived quantities.

Notation (Ho et al. 2020, guided-diffusion): timesteps are 0-based indices t = 0..T-1 (index t is
the paper's step t+1),

    α_t = 1 - β_t,    ᾱ_t = ∏_{s<=t} α_s,    ᾱ_{-1} = 1,
    q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I),
    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),
    μ̃_t = [β_t √ᾱ_{t-1} / (1 - ᾱ_t)] x_0 + [(1 - ᾱ_{t-1}) √α_t / (1 - ᾱ_t)] x_t,
    β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t).

Everything is computed once in float64 numpy, validated, and only then cast to the requested
dtype, so float32 schedules carry no accumulated cumprod error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULES = ("linear", "cosine", "sigmoid")
# How `respace_schedule` picks K of the T timesteps: uniform in t by one of diffusers'
# `timestep_spacing` rules (`space_timesteps`), or uniform in λ = log(α/σ) ("logsnr",
# `space_timesteps_logsnr`).
T_SPACINGS = ("linspace", "leading", "trailing")
SPACINGS = (*T_SPACINGS, "logsnr")

# The noisy end of the uniform-λ grid. Below λ = -5 the signal √ᾱ_t x_0 is under 0.7 % of the
# noise and solver steps there barely move x_t; the cosine schedule's last
# timestep is at λ = -9.9 (β clipped at 0.999), so an unclipped 20-step grid spent 8 of its steps
# on t >= 991. DPM-Solver's reference code ends cosine at T = 0.9946 (λ = -4.8) for the same
# reason; the linear DDPM schedule ends at λ = -5.06, just below (its grid moves by <= 7 of the
# 1000 timesteps).
LOGSNR_MIN = -5.0

_MAX_BETA = 0.999  # Nichol & Dhariwal clip: avoids the singularity β = 1 at the end of cosine.


def _linear_betas(num_timesteps: int) -> np.ndarray:
    # DDPM uses 1e-4..0.02 for T = 1000; guided-diffusion rescales the endpoints by 1000 / T so
    # that ᾱ_{T-1} stays roughly the same for other T.
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def _betas_from_alpha_bar(alpha_bar: np.ndarray) -> np.ndarray:
    """β_t = min(1 - ᾱ(t+1)/ᾱ(t), 0.999) from a continuous ᾱ sampled at t/T, t = 0..T."""
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], _MAX_BETA)


def _cosine_betas(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    # Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s)) π/2).
    tau = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((tau + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return _betas_from_alpha_bar(f / f[0])


def _sigmoid_betas(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> np.ndarray:
    # Chen 2023 ("On the importance of noise scheduling"), sigmoid on ᾱ:
    #   ᾱ(τ) ∝ (σ(end/tau) - σ((τ (end - start) + start)/tau)) / (σ(end/tau) - σ(start/tau)),
    # normalised so ᾱ(0) = 1, then discretised like the cosine schedule.
    def sigmoid(z: np.ndarray | float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    alpha_bar = (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar(alpha_bar / alpha_bar[0])


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
    """β_0..β_{T-1} (float64, shape [T]) of a named schedule.

    * "linear": DDPM, β linear from 1e-4 to 0.02 at T = 1000; for other T both endpoints are
      scaled by 1000/T (guided-diffusion), so T must exceed 20 to keep β < 1.
    * "cosine": Nichol & Dhariwal 2021, ᾱ(t) = cos²(((t/T + s)/(1 + s)) π/2) / ᾱ(0), s = 0.008,
      β_t = 1 - ᾱ(t+1)/ᾱ(t) clipped at 0.999.
    * "sigmoid": Chen 2023 / Jabri et al. 2023 sigmoid on ᾱ with start = -3, end = 3, tau = 1:
      ᾱ(τ) = (σ(3) - σ(6τ - 3)) / (σ(3) - σ(-3)), τ = t/T, discretised and clipped as cosine.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule name {name!r}; expected one of {SCHEDULES}")
    if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if name == "linear":
        return _linear_betas(num_timesteps)
    if name == "cosine":
        return _cosine_betas(num_timesteps)
    return _sigmoid_betas(num_timesteps)


@struct.dataclass
class Schedule:
    """All per-timestep constants of a discrete-time diffusion; every field has shape [T].

    A frozen pytree, so it can be passed through `jax.jit` or closed over. Fields follow the
    guided-diffusion names (see the module docstring for the math):
      betas = β_t, alphas = α_t, alphas_cumprod = ᾱ_t, alphas_cumprod_prev = ᾱ_{t-1} (ᾱ_{-1} = 1),
      sqrt_alphas_cumprod = √ᾱ_t, sqrt_one_minus_alphas_cumprod = √(1-ᾱ_t),
      log_one_minus_alphas_cumprod = log(1-ᾱ_t), sqrt_recip_alphas_cumprod = 1/√ᾱ_t,
      sqrt_recipm1_alphas_cumprod = √(1/ᾱ_t - 1), posterior_variance = β̃_t (β̃_0 = 0),
      posterior_log_variance_clipped = log β̃_t with log β̃_0 replaced by log β̃_1,
      posterior_mean_coef1 = β_t √ᾱ_{t-1}/(1-ᾱ_t), posterior_mean_coef2 = (1-ᾱ_{t-1}) √α_t/(1-ᾱ_t).
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        """T (static: read from the shape, so it is a Python int even under tracing)."""
        return int(self.betas.shape[0])


def _validate_betas(betas: np.ndarray) -> None:
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D [T], got shape {betas.shape}")
    if betas.shape[0] < 2:
        raise ValueError(f"need at least 2 timesteps, got {betas.shape[0]}")
    bad = np.flatnonzero(~((betas > 0.0) & (betas < 1.0)))  # also catches NaN
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"every beta must satisfy 0 < beta < 1; betas[{i}] = {float(betas[i])} "
            f"({bad.size} bad values). For 'linear', num_timesteps must be > 20."
        )
    alphas_cumprod = np.cumprod(1.0 - betas)
    if not np.all(np.diff(alphas_cumprod) < 0.0):
        i = int(np.flatnonzero(np.diff(alphas_cumprod) >= 0.0)[0]) + 1
        raise ValueError(f"alphas_cumprod must be strictly decreasing; it is not at t = {i}")


def make_schedule(betas: np.ndarray | Sequence[float], dtype: jnp.dtype = jnp.float32) -> Schedule:
    """The `Schedule` of β_0..β_{T-1}: computed and checked in float64, then cast to `dtype`.

    Raises ValueError unless betas is 1-D with T >= 2, 0 < β < 1 and ᾱ strictly decreasing.
    """
    betas = np.asarray(betas, dtype=np.float64)
    _validate_betas(betas)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    one_minus = 1.0 - alphas_cumprod
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus
    quantities = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus),
        log_one_minus_alphas_cumprod=np.log(one_minus),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        # β̃_0 = 0: the DDPM code replaces log β̃_0 by log β̃_1 so the log stays finite.
        posterior_log_variance_clipped=np.log(
            np.append(posterior_variance[1], posterior_variance[1:])
        ),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / one_minus,
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / one_minus,
    )
    for key, value in quantities.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"schedule quantity {key} is not finite; check the betas")
    # Concrete arrays even when called while tracing (e.g. inside a jitted sampler), so that
    # host-side respacing (`respace_schedule`) can read them back.
    with jax.ensure_compile_time_eval():
        return Schedule(**{k: jnp.asarray(v, dtype=dtype) for k, v in quantities.items()})


def schedule_from_name(name: str, num_timesteps: int, dtype: jnp.dtype = jnp.float32) -> Schedule:
    """`make_schedule(get_betas(name, num_timesteps), dtype)`."""
    return make_schedule(get_betas(name, num_timesteps), dtype)


def _check_num_steps(num_timesteps: int, num_steps: int) -> None:
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be in [2, num_timesteps={num_timesteps}], got {num_steps!r}"
        )


def space_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """`num_steps` distinct timesteps K of 0..T-1, uniform in t, sorted ascending. int64 [K].

    spacing ∈ T_SPACINGS, the rules of diffusers' `DDIMScheduler.set_timesteps` (its
    `timestep_spacing` with steps_offset = 0; diffusers lists them descending), compared in
    Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed"), Table 2:
      "linspace": t_i = round(i (T-1)/(K-1)): keeps both 0 and T-1 (guided-diffusion's respacing);
      "leading":  t_i = i ⌊T/K⌋: keeps 0 but not T-1 (the DDIM paper; diffusers' default);
      "trailing": t_i = round(T - i T/K) - 1: keeps T-1 but not 0; its lowest is round(T/K) - 1.
    Consecutive t differ by >= 1 for K <= T, so the K are distinct in every rule.
    """
    if spacing not in T_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {T_SPACINGS}")
    _check_num_steps(num_timesteps, num_steps)
    if spacing == "linspace":
        return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    if spacing == "leading":
        return np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
    # diffusers' own expression (a float-step arange), so that ties round as there (half to even).
    # Where the arange's float length is K + 1 (e.g. T = 50, K = 29) its extra point is timestep
    # -1; [:K] drops it.
    trailing = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))[:num_steps]
    return (trailing.astype(np.int64) - 1)[::-1].copy()


def space_timesteps_logsnr(alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """`num_steps` timesteps of 0..T-1 as evenly spaced in λ_t = ½ log(ᾱ_t/(1 - ᾱ_t)) as the
    integer t allow (DPM-Solver's "logSNR" spacing), sorted, always including 0 and T-1.

    The grid is uniform from λ_0 to max(λ_{T-1}, LOGSNR_MIN), with T-1 itself (where x_T is
    drawn) in place of its last point. Each grid point takes its nearest timestep; where two
    collide (the low-noise end, where λ changes fastest per t) the later ones move up by one so
    that the K timesteps are distinct. Returns int64 [K].
    """
    ab = np.asarray(alphas_cumprod, np.float64)
    num_timesteps = ab.shape[0]
    _check_num_steps(num_timesteps, num_steps)
    neg_lam = -0.5 * (np.log(ab) - np.log1p(-ab))  # increasing in t
    grid = np.linspace(neg_lam[0], min(neg_lam[-1], -LOGSNR_MIN), num_steps)
    right = np.clip(np.searchsorted(neg_lam, grid), 1, num_timesteps - 1)
    nearer_left = grid - neg_lam[right - 1] < neg_lam[right] - grid
    ts = np.where(nearer_left, right - 1, right)
    ts[0], ts[-1] = 0, num_timesteps - 1
    for k in range(1, num_steps - 1):  # distinct, and leave room for the ones after
        ts[k] = min(max(ts[k], ts[k - 1] + 1), num_timesteps - num_steps + k)
    return ts.astype(np.int64)


def respace_betas(
    betas: np.ndarray, use_timesteps: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the diffusion restricted to the timesteps t_0 < t_1 < ... (guided-diffusion).

    The sub-chain keeps the marginals q(x_{t_i} | x_0): ᾱ_new_i = ᾱ_{t_i}, hence
        β_new_i = 1 - ᾱ_{t_i} / ᾱ_{t_{i-1}},   with ᾱ_{t_{-1}} = 1.
    Returns (new betas float64 [K], timestep_map int32 [K]); timestep_map[i] = t_i is the
    original timestep to feed the model at respaced index i.
    """
    betas = np.asarray(betas, dtype=np.float64)
    _validate_betas(betas)
    use = np.asarray(use_timesteps)
    if use.ndim != 1 or use.size == 0 or not np.issubdtype(use.dtype, np.integer):
        raise ValueError(f"use_timesteps must be a non-empty 1-D integer array, got {use!r}")
    if np.any(np.diff(use) <= 0) or use[0] < 0 or use[-1] >= betas.shape[0]:
        raise ValueError(
            f"use_timesteps must be strictly increasing within [0, {betas.shape[0] - 1}], "
            f"got {use.tolist()}"
        )
    alphas_cumprod = np.cumprod(1.0 - betas)[use]
    new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return new_betas, use.astype(np.int32)


def respace_schedule(
    schedule: Schedule, num_steps: int, spacing: str = "linspace"
) -> tuple[Schedule, np.ndarray]:
    """The respaced `Schedule` with `num_steps` steps and its int32 timestep_map [K].

    spacing ∈ SPACINGS: one of T_SPACINGS, uniform in t (`space_timesteps`), or "logsnr", uniform
    in λ (`space_timesteps_logsnr`). Host-side: the schedule must be concrete (not a tracer).
    Built from the schedule's own betas (read back and promoted to float64), keeping its dtype.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    try:
        betas = np.asarray(jax.device_get(schedule.betas), dtype=np.float64)
    except jax.errors.TracerArrayConversionError as e:
        raise ValueError(
            "respacing needs a concrete Schedule, but it is a tracer (it was passed as an "
            "argument of a jitted function). Close over the schedule (or build it inside the "
            "jitted function) instead of passing it, or respace outside jit with "
            "respace_schedule."
        ) from e
    if spacing == "logsnr":
        use = space_timesteps_logsnr(np.cumprod(1.0 - betas), num_steps)
    else:
        use = space_timesteps(schedule.num_timesteps, num_steps, spacing)
    new_betas, timestep_map = respace_betas(betas, use)
    return make_schedule(new_betas, schedule.betas.dtype), timestep_map
