"""Forward process q, its Gaussian posterior, and the reverse-process parameters p_θ.

With a = √ᾱ_t and b = √(1 - ᾱ_t) (so a² + b² = 1), a noised sample and the three common
network parameterizations are

    x_t = a x_0 + b ε,            ε ~ N(0, I)
    "eps": ε,   "x0": x_0,   "v": v = a ε - b x_0        (Salimans & Ho 2022)
    x_0 = (x_t - b ε)/a = a x_t - b v,     ε = (x_t - a x_0)/b = b x_t + a v.

Arrays are channels-last ([B, H, W, C], or any [B, ..., C]); t is an int array [B] of 0-based
timesteps indexing the `Schedule` (see schedules.py for the notation).

Dtype policy: arithmetic runs in the promoted dtype of the input and the schedule (float32 for a
float32 schedule, also when the input is bfloat16), then sample-like outputs (x_t, means,
predictions) are cast back to the input's dtype, so a bfloat16 sampling loop stays bfloat16.
Variances and log-variances are returned in the promoted (float32) dtype: bfloat16 keeps only
~3 significant digits, too few for log σ².
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")


def check_choice(kind: str, value: str, legal: tuple[str, ...]) -> None:
    """Raise ValueError naming the bad `value` of option `kind` and the `legal` values."""
    if value not in legal:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {legal}")


def _compute_dtype(x: jnp.ndarray, schedule: Schedule) -> jnp.dtype:
    return jnp.promote_types(x.dtype, schedule.betas.dtype)


def extract(arr: jnp.ndarray, t: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """arr[t] reshaped to broadcast against an array of `shape`: [T], [B] -> [B, 1, ..., 1].

    Out-of-range t is clamped by JAX's gather semantics; callers pass 0 <= t < T.
    """
    return arr[t].reshape(t.shape + (1,) * (len(shape) - t.ndim))


def q_mean_variance(
    schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I): (mean, variance, log_variance), each [B, ...]."""
    ct = _compute_dtype(x0, schedule)
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.shape)
    # Squaring √(1-ᾱ) (built in float64) avoids the float32 cancellation in 1 - ᾱ at small t.
    variance = jnp.square(extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape))
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape)
    return (
        (a * x0.astype(ct)).astype(x0.dtype),
        jnp.broadcast_to(variance, x0.shape).astype(ct),
        jnp.broadcast_to(log_variance, x0.shape).astype(ct),
    )


def q_sample(
    schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
    """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, a draw from q(x_t | x_0) given ε ~ N(0, I). [B, ...]"""
    ct = _compute_dtype(x0, schedule)
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.shape)
    b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape)
    return (a * x0.astype(ct) + b * noise.astype(ct)).astype(x0.dtype)


def q_posterior_mean_variance(
    schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I): (mean, variance, log_variance_clipped).

        μ̃_t = β_t √ᾱ_{t-1}/(1 - ᾱ_t) x_0 + (1 - ᾱ_{t-1}) √α_t/(1 - ᾱ_t) x_t,
        β̃_t = β_t (1 - ᾱ_{t-1})/(1 - ᾱ_t);   at t = 0: μ̃ = x_0, β̃ = 0, log β̃ := log β̃_1.
    All outputs [B, ...]; the mean has x_t's dtype.
    """
    ct = _compute_dtype(x_t, schedule)
    coef1 = extract(schedule.posterior_mean_coef1, t, x_t.shape)
    coef2 = extract(schedule.posterior_mean_coef2, t, x_t.shape)
    mean = coef1 * x0.astype(ct) + coef2 * x_t.astype(ct)
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return (
        mean.astype(x_t.dtype),
        jnp.broadcast_to(variance, x_t.shape).astype(ct),
        jnp.broadcast_to(log_variance, x_t.shape).astype(ct),
    )


def predict_x0_from_eps(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
    """x_0 = x_t/√ᾱ_t - √(1/ᾱ_t - 1) ε. [B, ...]"""
    ct = _compute_dtype(x_t, schedule)
    recip = extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape)
    recipm1 = extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape)
    return (recip * x_t.astype(ct) - recipm1 * eps.astype(ct)).astype(x_t.dtype)


def predict_eps_from_x0(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray
) -> jnp.ndarray:
    """ε = (x_t/√ᾱ_t - x_0) / √(1/ᾱ_t - 1) = (x_t - √ᾱ_t x_0)/√(1 - ᾱ_t). [B, ...]"""
    ct = _compute_dtype(x_t, schedule)
    recip = extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape)
    recipm1 = extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape)
    return ((recip * x_t.astype(ct) - x0.astype(ct)) / recipm1).astype(x_t.dtype)


def predict_x0_from_v(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray
) -> jnp.ndarray:
    """x_0 = √ᾱ_t x_t - √(1 - ᾱ_t) v. [B, ...]"""
    ct = _compute_dtype(x_t, schedule)
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.shape)
    b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    return (a * x_t.astype(ct) - b * v.astype(ct)).astype(x_t.dtype)


def predict_eps_from_v(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray
) -> jnp.ndarray:
    """ε = √(1 - ᾱ_t) x_t + √ᾱ_t v. [B, ...]"""
    ct = _compute_dtype(x_t, schedule)
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.shape)
    b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    return (b * x_t.astype(ct) + a * v.astype(ct)).astype(x_t.dtype)


def get_v(schedule: Schedule, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """The v-prediction target v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022). [B, ...]"""
    ct = _compute_dtype(x0, schedule)
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.shape)
    b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape)
    return (a * noise.astype(ct) - b * x0.astype(ct)).astype(x0.dtype)


def predict_x0_and_eps(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str,
    clip_x0: bool,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x̂_0, ε̂) from a C-channel model output under `prediction` ∈ PREDICTIONS.

    With clip_x0, x̂_0 is clipped to [-1, 1] and ε̂ is re-derived from the clipped x̂_0 so the
    pair stays consistent with x_t (what DDIM needs). Both [B, ..., C], dtype of x_t.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    ct = _compute_dtype(x_t, schedule)
    x, out = x_t.astype(ct), model_output.astype(ct)
    if prediction == "eps":
        pred_x0, pred_eps = predict_x0_from_eps(schedule, x, t, out), out
    elif prediction == "x0":
        pred_x0 = out
        pred_eps = predict_eps_from_x0(schedule, x, t, pred_x0)
    else:
        pred_x0 = predict_x0_from_v(schedule, x, t, out)
        pred_eps = predict_eps_from_v(schedule, x, t, out)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = predict_eps_from_x0(schedule, x, t, pred_x0)
    return pred_x0.astype(x_t.dtype), pred_eps.astype(x_t.dtype)


class PMeanVar(NamedTuple):
    """Parameters of p_θ(x_{t-1} | x_t) = N(mean, variance) and the implied predictions."""

    mean: jnp.ndarray  # [B, ..., C] μ_θ = μ̃_t(x̂_0, x_t), dtype of x_t
    variance: jnp.ndarray  # [B, ..., C] σ_t², float32 (fixed_small: exactly 0 at t = 0)
    log_variance: jnp.ndarray  # [B, ..., C] log σ_t², float32 (always finite)
    pred_x0: jnp.ndarray  # [B, ..., C] x̂_0 (clipped if clip_x0), dtype of x_t
    pred_eps: jnp.ndarray  # [B, ..., C] ε̂ consistent with pred_x0, dtype of x_t


def p_mean_variance(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str,
    var_type: str,
    clip_x0: bool,
) -> PMeanVar:
    """Mean and variance of p_θ(x_{t-1} | x_t) from the network output.

    The mean is the posterior mean with x_0 replaced by the prediction, μ_θ = μ̃_t(x̂_0, x_t).
    The variance, by `var_type` ∈ VAR_TYPES:
      "fixed_small":   σ_t² = β̃_t, with log β̃_0 := log β̃_1 (DDPM code);
      "fixed_large":   σ_t² = β_t, with β_0 := β̃_1 so the decoder variance is not inflated
                       (DDPM / guided-diffusion);
      "learned_range": iDDPM, model_output has 2C channels [pred, v]; with f = (v + 1)/2,
                       log σ_t² = f log β_t + (1 - f) log β̃_t (clipped as above).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("var_type", var_type, VAR_TYPES)
    channels = x_t.shape[-1]
    want = 2 * channels if var_type == "learned_range" else channels
    if model_output.shape[-1] != want:
        raise ValueError(
            f"var_type={var_type!r} needs model_output with {want} channels on the last axis "
            f"(x_t has {channels}); got shape {model_output.shape}"
        )
    ct = _compute_dtype(x_t, schedule)
    x = x_t.astype(ct)
    out = model_output.astype(ct)
    if var_type == "learned_range":
        out, var_values = out[..., :channels], out[..., channels:]
        min_log = extract(schedule.posterior_log_variance_clipped, t, x.shape)
        max_log = extract(jnp.log(schedule.betas), t, x.shape)
        frac = (var_values + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jnp.exp(log_variance)
    elif var_type == "fixed_large":
        large = schedule.betas.at[0].set(schedule.posterior_variance[1])  # [T]
        variance = jnp.broadcast_to(extract(large, t, x.shape), x.shape)
        log_variance = jnp.log(variance)
    else:  # fixed_small: the exact β̃_t (0 at t = 0), but the clipped log
        variance = jnp.broadcast_to(extract(schedule.posterior_variance, t, x.shape), x.shape)
        log_variance = jnp.broadcast_to(
            extract(schedule.posterior_log_variance_clipped, t, x.shape), x.shape
        )
    pred_x0, pred_eps = predict_x0_and_eps(
        schedule, out, x, t, prediction=prediction, clip_x0=clip_x0
    )
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x, t)
    return PMeanVar(
        mean=mean.astype(x_t.dtype),
        variance=variance.astype(ct),
        log_variance=log_variance.astype(ct),
        pred_x0=pred_x0.astype(x_t.dtype),
        pred_eps=pred_eps.astype(x_t.dtype),
    )
