"""Training objectives and the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

The negative ELBO of a T-step diffusion, per example, is

    L_vlb = L_T + Σ_{t=1}^{T-1} L_t + L_0,
    L_T = KL(q(x_{T-1} | x_0) ‖ N(0, I))                                  (`prior_bpd`)
    L_t = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)),  t > 0          (`vlb_terms`)
    L_0 = -log p_θ(x_0 | x_1), discretized Gaussian decoder on 8-bit data  (`vlb_terms`, t = 0)

(0-based t as in schedules.py). Everything here is reported per example ([B]) in bits per dim:
the mean over all non-batch dims, divided by log 2.

Dtype policy: every input is promoted to at least float32 on entry and every output is float32;
KLs of nearly equal Gaussians cancel catastrophically in bfloat16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion import gaussian
from diffusion.gaussian import PREDICTIONS, VAR_TYPES, check_choice
from diffusion.schedules import Schedule
from errors import ConfigError

LOSS_TYPES = ("simple", "hybrid", "vlb")
WEIGHTINGS = ("none", "min_snr")
T_SAMPLINGS = ("uniform", "stratified")


def loss_options_problem(
    loss_type: str, var_type: str, weighting: str, prefix: str = ""
) -> str | None:
    """Why (loss_type, var_type, weighting) cannot train, one line with the fix; None if they can.

    The rules of `training_losses`, also checked by config_lib.validate before anything compiles
    (with prefix "diffusion." naming the config fields).
    """
    p = prefix
    if loss_type == "hybrid" and var_type != "learned_range":
        return (f"{p}loss_type='hybrid' trains only the variance through the bound, so it needs "
                f"{p}var_type='learned_range' (got {var_type!r}). Fix: set both, or use "
                f"{p}loss_type='simple'.")
    if loss_type == "simple" and var_type == "learned_range":
        return (f"{p}var_type='learned_range' is only trained by the bound term (the simple loss "
                f"leaves the variance channels untrained), so it needs loss_type 'hybrid' or "
                f"'vlb'. Fix: {p}loss_type='hybrid' (iDDPM) or 'vlb', or a fixed {p}var_type.")
    if loss_type == "vlb" and weighting != "none":
        return (f"{p}weighting={weighting!r} re-weights the MSE term, which {p}loss_type='vlb' "
                f"does not have. Fix: {p}loss_type='simple' or 'hybrid', or {p}weighting='none'.")
    return None


def sample_timesteps(key: jax.Array, batch: int, num_timesteps: int,
                     how: str = "uniform") -> jnp.ndarray:
    """The batch's training timesteps [B], each marginally U{0..T-1}.

    "uniform": independent draws. "stratified": one shared u ~ U[0, 1), and example i gets
    floor(T · ((u + i/B) mod 1)), so the batch has exactly one t in each of B equal strata of
    [0, T): the low-discrepancy sampler of Kingma et al. 2021 (VDM), a lower-variance estimate of
    the same expected loss.
    """
    check_choice("t_sampling", how, T_SAMPLINGS)
    if how == "uniform":
        return jax.random.randint(key, (batch,), 0, num_timesteps)
    u = (jax.random.uniform(key, ()) + jnp.arange(batch, dtype=jnp.float32) / batch) % 1.0
    return jnp.minimum(jnp.floor(u * num_timesteps), num_timesteps - 1).astype(jnp.int32)


def _f32(x: jnp.ndarray | float) -> jnp.ndarray:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over all non-batch axes: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: jnp.ndarray, logvar1: jnp.ndarray, mean2: jnp.ndarray, logvar2: jnp.ndarray
) -> jnp.ndarray:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats (broadcasting):

    ½ [-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)² e^(-logvar2)].
    """
    mean1, logvar1, mean2, logvar2 = map(_f32, (mean1, logvar1, mean2, logvar2))
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    """Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³))), the approximation used by DDPM and
    guided-diffusion (kept so that bits/dim are comparable with published numbers; its absolute
    error is below 2e-4).

    Evaluated as the identical sigmoid(2 √(2/π) (x + 0.044715 x³)), which keeps full relative
    precision in the lower tail where 1 + tanh(·) cancels in float32.
    """
    x = _f32(x)
    return jax.nn.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3)))


def discretized_gaussian_log_likelihood(
    x: jnp.ndarray, means: jnp.ndarray, log_scales: jnp.ndarray
) -> jnp.ndarray:
    """Elementwise log-probability (nats) of 8-bit data x ∈ [-1, 1] under N(means, e^(2 log_scales))
    discretized into the 256 bins of width 2/255 centred on the data values (DDPM §3.3):

        log [Φ((x + 1/255 - μ)/σ) - Φ((x - 1/255 - μ)/σ)],
    with the edge bins extended to ±∞ (x = -1: log Φ(·+), x = 1: log(1 - Φ(·-))). Φ is
    `approx_standard_normal_cdf`. Same values as guided-diffusion, but evaluated on the side of
    the mean where Φ is small (Φ(b) - Φ(a) = Φ(-a) - Φ(-b)), so far-off bins keep their digits
    in float32.
    """
    x, means, log_scales = map(_f32, (x, means, log_scales))
    inv_stdv = jnp.exp(-log_scales)
    # Reflect about the mean so that the bin lies below it: z_lo <= z_hi <= ~0.
    sign = jnp.where(x > means, -1.0, 1.0)
    centered = sign * (x - means)
    z_hi = inv_stdv * (centered + 1.0 / 255.0)
    z_lo = inv_stdv * (centered - 1.0 / 255.0)
    # After reflection an edge bin at x = ±1 is open towards -∞ when it lies below the mean.
    open_low = jnp.where(sign > 0, x < -0.999, x > 0.999)
    open_high = jnp.where(sign > 0, x > 0.999, x < -0.999)
    cdf_hi = jnp.where(open_high, 1.0, approx_standard_normal_cdf(z_hi))
    cdf_lo = jnp.where(open_low, 0.0, approx_standard_normal_cdf(z_lo))
    return jnp.log(jnp.maximum(cdf_hi - cdf_lo, 1e-12))


def snr(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) = 1 / (1/ᾱ_t - 1). [B], float32."""
    # From √(1/ᾱ - 1), built in float64: 1 - ᾱ_t in float32 loses digits at small t.
    return 1.0 / jnp.square(_f32(schedule.sqrt_recipm1_alphas_cumprod[t]))


def vlb_terms(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x0: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str,
    var_type: str,
    clip_x0: bool = False,
) -> jnp.ndarray:
    """The term L_t of the bound for each example, in bits/dim. [B]

    t > 0: KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) (two Gaussians, exact);
    t = 0: -log p_θ(x_0 | x_1) with the discretized Gaussian decoder (8-bit data in [-1, 1]).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("var_type", var_type, VAR_TYPES)
    model_output, x0, x_t = map(_f32, (model_output, x0, x_t))
    true_mean, _, true_log_variance = gaussian.q_posterior_mean_variance(schedule, x0, x_t, t)
    out = gaussian.p_mean_variance(
        schedule, model_output, x_t, t, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    kl = normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)
    # At t = 0 the "true" log-variance is the clipped log β̃_1, so kl stays finite there.
    return jnp.where(t == 0, mean_flat(decoder_nll), mean_flat(kl)) / math.log(2.0)


def prior_bpd(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
    """L_T = KL(q(x_{T-1} | x_0) ‖ N(0, I)) in bits/dim; no parameters, ≈ 0 for a good schedule.
    [B]"""
    x0 = _f32(x0)
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = gaussian.q_mean_variance(schedule, x0, t)
    zero = jnp.zeros((), jnp.float32)
    return mean_flat(normal_kl(mean, log_variance, zero, zero)) / math.log(2.0)


def _min_snr_weight(schedule: Schedule, t: jnp.ndarray, prediction: str, gamma: float):
    # x̂_0 - x_0 = -(b/a)(ε̂ - ε) = -b (v̂ - v), so ‖x̂_0 - x_0‖² = ‖ε̂ - ε‖²/SNR
    # = ‖v̂ - v‖²/(SNR + 1) (using b² = 1/(SNR + 1)).
    s = snr(schedule, t)
    clipped = jnp.minimum(s, gamma)
    if prediction == "eps":
        return clipped / s
    if prediction == "x0":
        return clipped
    return clipped / (s + 1.0)


def training_losses(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x0: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    noise: jnp.ndarray,
    *,
    prediction: str,
    var_type: str,
    loss_type: str = "simple",
    vlb_weight: float = 0.001,
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> dict[str, jnp.ndarray]:
    """Per-example losses for x_t = q_sample(schedule, x0, t, noise), all [B] float32.

    Keys: "loss" (what to minimise), "mse" (unweighted MSE on the target; logged always) and,
    for "hybrid"/"vlb", "vlb" = T · L_t in bits/dim (a one-sample estimate of Σ_t L_t).

    mse = mean_flat((target - pred)²), target = ε, x_0 or v for `prediction` "eps", "x0", "v"
    (the first C channels of model_output when var_type == "learned_range").

    loss_type ∈ LOSS_TYPES:
      "simple": w_t · mse (Ho et al.).
      "hybrid": w_t · mse + vlb_weight · T · L_t with stop_gradient on the mean channels inside
                L_t, so the bound trains only the variance (iDDPM, λ = 0.001); needs
                var_type="learned_range".
      "vlb":    T · L_t (iDDPM L_vlb); the gradient flows through mean and variance.
    weighting ∈ WEIGHTINGS gives w_t:
      "none":    w_t = 1.
      "min_snr": Min-SNR-γ (Hang et al. 2023): the x_0-space loss min(SNR_t, γ) ‖x̂_0 - x_0‖²,
                 rewritten in the target's space: w_t = min(SNR_t, γ)/SNR_t for "eps",
                 min(SNR_t, γ) for "x0", min(SNR_t, γ)/(SNR_t + 1) for "v".
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("var_type", var_type, VAR_TYPES)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("weighting", weighting, WEIGHTINGS)
    problem = loss_options_problem(loss_type, var_type, weighting)
    if problem:
        raise ConfigError(problem)
    learned = var_type == "learned_range"
    channels = x0.shape[-1]
    want = 2 * channels if learned else channels
    if model_output.shape[-1] != want:
        raise ValueError(
            f"var_type={var_type!r} needs model_output with {want} channels on the last axis "
            f"(x0 has {channels}); got shape {model_output.shape}"
        )

    model_output, x0, x_t, noise = map(_f32, (model_output, x0, x_t, noise))
    pred = model_output[..., :channels]
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    else:
        target = gaussian.get_v(schedule, x0, noise, t)
    mse = mean_flat(jnp.square(target - pred))  # [B]
    terms = {"mse": mse}

    if loss_type == "vlb":
        vlb_output = model_output
    else:
        weight = (
            _min_snr_weight(schedule, t, prediction, min_snr_gamma)
            if weighting == "min_snr"
            else jnp.ones_like(mse)
        )
        terms["loss"] = weight * mse
        if loss_type == "simple":
            return terms
        vlb_output = jnp.concatenate(
            [jax.lax.stop_gradient(pred), model_output[..., channels:]], axis=-1
        )
    vlb = schedule.num_timesteps * vlb_terms(
        schedule, vlb_output, x0, x_t, t, prediction=prediction, var_type=var_type
    )
    terms["vlb"] = vlb
    terms["loss"] = vlb if loss_type == "vlb" else terms["loss"] + vlb_weight * vlb
    return terms
