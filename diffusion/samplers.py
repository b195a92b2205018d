"""Reverse-process sampling: single steps and the full loop inside jit.

Single steps take the network output for (x_t, t) and return (x_{t-1}, x̂_0):
  * `p_sample`: ancestral DDPM step, x_{t-1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I), z = 0 at t = 0.
  * `ddim_step`: Song et al. 2021 eq. 12,
        x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,
        σ_t(η) = η √((1 - ᾱ_{t-1})/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1});
    η = 0 is deterministic DDIM, η = 1 matches ancestral sampling with σ_t² = β̃_t.
  * `dpm_solver_pp_2m_step`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), a second-order
    multistep solver of the probability-flow ODE in the data prediction x̂_0 and the half-log-SNR
    λ_t = log(α_t/σ_t), α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t). From step s (noisier) to t, h = λ_t - λ_s:
        x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D,
        D = (1 + 1/(2r)) x̂_0(x_s) - 1/(2r) x̂_0(previous step),   r = h_prev/h,
    with D = x̂_0(x_s) on the first step (no history; this is DDIM with η = 0). The last step,
    from the least noisy timestep to λ = ∞, returns x̂_0, as DDIM does.

Every step takes an optional `cond_grad` = s ∇ₓ log p_φ(y | x_t, t) for classifier guidance
(see guidance.py): ancestral shifts the mean by Σ cond_grad (Dhariwal & Nichol Algorithm 1); DDIM
and DPM-Solver++ correct ε̂ by -√(1 - ᾱ_t) cond_grad (Algorithm 2) and re-derive x̂_0 from it.

`sample` runs K steps in a `lax.fori_loop`. With num_steps = K < T it samples the respaced
diffusion on K of the T timesteps (ᾱ kept on those steps, guided-diffusion respacing) and feeds
the model the ORIGINAL timesteps. "ancestral" and "ddim" use `space_timesteps(T, K)`, uniform in
t (guided-diffusion); "dpm_solver_pp_2m" uses `space_timesteps_logsnr`, uniform in λ (Lu et al.'s
"logSNR" choice for low-resolution images): its steps are steps in λ, and on the linear schedule
uniform t leaves one step of Δλ ≈ 2.7 at the low-noise end, where the 2M extrapolation
overshoots (20 steps on Gaussian data: output variance +54 % with uniform t, +3 % uniform in λ).
The respaced schedule is built on the host (float64 numpy, at trace time) from the schedule's
concrete values: under jit, close over the schedule or build it inside the jitted function
(`make_schedule` returns concrete arrays even while tracing). A schedule passed as a jit
*argument* is a tracer; that works for num_steps=None and raises a ValueError saying so otherwise.

`sample_steps` runs any contiguous part of the same loop on a carried `SamplerState`, so a long
run can be split into jitted chunks with a progress line in between (one compilation: the chunk
bounds are traced). Where the boundaries fall does not change the result, bit for bit: the step
key is fold_in(key, i) of the step index i and DPM-Solver++'s history travels in the state. (A
separately compiled `sample` agrees to float32 rounding: XLA optimises a loop with a static
trip count differently.)

Dtype: the loop carries x in its own dtype (bfloat16 stays bfloat16); each step computes in
float32 (see gaussian.py) and casts x_{t-1} back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion import gaussian, guidance
from diffusion.gaussian import PREDICTIONS, VAR_TYPES, check_choice, extract
from diffusion.schedules import Schedule, respace_schedule

SAMPLERS = ("ancestral", "ddim", "dpm_solver_pp_2m")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t [B,...], t int32 [B]) -> out
# (x_t [B,...], t int32 [B]) -> s ∇ₓ log p_φ(y | x_t, t) [B,...], the scaled classifier gradient.
CondFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


class SamplerState(NamedTuple):
    """What the sampling loop carries from one step to the next."""

    x: jnp.ndarray  # [B, ...] the current x_t (x_0 after the last step)
    pred_x0: jnp.ndarray  # [B, ...] x̂_0 of the last step (DPM-Solver++ 2M's history)


def init_state(x_T: jnp.ndarray) -> SamplerState:
    """The loop state before the first step: x = x_T, no x̂_0 yet (zeros)."""
    return SamplerState(x=x_T, pred_x0=jnp.zeros_like(x_T))


def _noise_mask(t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """1.0 where t > 0, else 0.0; shape [B, 1, ..., 1]."""
    return (t > 0).astype(jnp.float32).reshape(t.shape + (1,) * (ndim - t.ndim))


def p_sample(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    key: jax.Array,
    *,
    prediction: str,
    var_type: str,
    clip_x0: bool,
    cond_grad: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One ancestral step x_{t-1} = μ_θ + exp(½ log σ_t²) z, with z = 0 where t == 0.

    With cond_grad (= s ∇ₓ log p_φ(y | x_t)), μ_θ is replaced by μ_θ + σ_t² cond_grad.
    Returns (x_prev, pred_x0), both [B, ...] in x_t's dtype.
    """
    out = gaussian.p_mean_variance(
        schedule, model_output, x_t, t, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    mean = out.mean
    if cond_grad is not None:
        mean = guidance.condition_mean(mean, out.variance, cond_grad)
    z = jax.random.normal(key, x_t.shape, jnp.float32)
    x_prev = mean + _noise_mask(t, x_t.ndim) * jnp.exp(0.5 * out.log_variance) * z
    return x_prev.astype(x_t.dtype), out.pred_x0


def _x0_and_eps(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str,
    clip_x0: bool,
    cond_grad: jnp.ndarray | None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x̂_0, ε̂) in float32, ε̂ classifier-corrected when cond_grad is given.

    As guided-diffusion's `condition_score`: the correction applies to the ε̂ consistent with the
    (clipped) x̂_0, and x̂_0 is then re-derived from the corrected ε̂ without clipping again.
    """
    pred_x0, pred_eps = gaussian.predict_x0_and_eps(
        schedule, model_output, x_t, t, prediction=prediction, clip_x0=clip_x0
    )
    pred_x0, pred_eps = pred_x0.astype(jnp.float32), pred_eps.astype(jnp.float32)
    if cond_grad is not None:
        pred_eps = guidance.condition_eps(schedule, pred_eps, t, cond_grad)
        pred_x0 = gaussian.predict_x0_from_eps(schedule, x_t.astype(jnp.float32), t, pred_eps)
    return pred_x0, pred_eps


def ddim_step(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    key: jax.Array,
    *,
    prediction: str,
    eta: float,
    clip_x0: bool,
    cond_grad: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One DDIM step (Song et al. eq. 12, see the module docstring); at t == 0 returns x̂_0.

    model_output has C channels (drop learned-variance channels first). The previous timestep is
    the schedule's previous index, so a respaced schedule gives the strided DDIM update.
    cond_grad: classifier guidance, ε̂ -> ε̂ - √(1 - ᾱ_t) cond_grad.
    Returns (x_prev, pred_x0), both [B, ...] in x_t's dtype.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    pred_x0, pred_eps = _x0_and_eps(
        schedule, model_output, x_t, t, prediction=prediction, clip_x0=clip_x0,
        cond_grad=cond_grad,
    )
    alpha_bar_prev = extract(schedule.alphas_cumprod_prev, t, x_t.shape)
    # σ_t(η)² = η² (1 - ᾱ_{t-1})/(1 - ᾱ_t) · β_t = η² β̃_t, since ᾱ_t/ᾱ_{t-1} = 1 - β_t along the
    # (possibly respaced) chain. 1 - ᾱ_{t-1} is read from the float64-built table rather than
    # computed in float32, where it cancels at small t.
    sigma2 = eta**2 * extract(schedule.posterior_variance, t, x_t.shape)
    not_last = _noise_mask(t, x_t.ndim)  # [B, 1, ..., 1]; 1 - ᾱ_{-1} = 0
    sqrt_one_minus_prev = extract(
        schedule.sqrt_one_minus_alphas_cumprod, jnp.maximum(t - 1, 0), x_t.shape
    )
    one_minus_prev = not_last * jnp.square(sqrt_one_minus_prev)
    # 1 - ᾱ_{t-1} - σ² >= 0 exactly (β̃_t <= 1 - ᾱ_{t-1}); the max only guards rounding.
    dir_coef = jnp.sqrt(jnp.maximum(one_minus_prev - sigma2, 0.0))
    z = jax.random.normal(key, x_t.shape, jnp.float32)
    x_prev = jnp.sqrt(alpha_bar_prev) * pred_x0 + dir_coef * pred_eps + jnp.sqrt(sigma2) * z
    x_prev = jnp.where(not_last > 0, x_prev, pred_x0)
    return x_prev.astype(x_t.dtype), pred_x0.astype(x_t.dtype)


def half_log_snr(schedule: Schedule) -> jnp.ndarray:
    """λ_t = log(√ᾱ_t / √(1 - ᾱ_t)) = ½ (log ᾱ_t - log(1 - ᾱ_t)). [T]"""
    return jnp.log(schedule.sqrt_alphas_cumprod) - 0.5 * schedule.log_one_minus_alphas_cumprod


def dpm_solver_pp_2m_step(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    prev_x0: jnp.ndarray,
    *,
    prediction: str,
    clip_x0: bool,
    cond_grad: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One DPM-Solver++(2M) step from index t to t - 1 of `schedule` (see the module docstring).

    prev_x0 is x̂_0 of the step before, at index t + 1; at t == T-1 (the first step, no history)
    the update is first order, and at t == 0 the step returns x̂_0. model_output has C channels.
    cond_grad: classifier guidance on ε̂, as in `ddim_step`.
    Returns (x_prev, pred_x0), both [B, ...] in x_t's dtype.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    pred_x0, _ = _x0_and_eps(
        schedule, model_output, x_t, t, prediction=prediction, clip_x0=clip_x0,
        cond_grad=cond_grad,
    )
    last = schedule.num_timesteps - 1
    lam = half_log_snr(schedule)  # [T]
    t_next, t_prev = jnp.maximum(t - 1, 0), jnp.minimum(t + 1, last)
    lam_t = extract(lam, t, x_t.shape)
    h = extract(lam, t_next, x_t.shape) - lam_t  # > 0 except at t == 0 (unused there)
    h_prev = lam_t - extract(lam, t_prev, x_t.shape)  # 0 at t == T-1 (unused there)
    # D = x̂_0 + (x̂_0 - x̂_0_prev)/(2r) with 1/(2r) = h/(2 h_prev); 0 on the first and last step.
    second_order = ((t > 0) & (t < last)).reshape(h.shape[:1] + (1,) * (h.ndim - 1))
    coef = jnp.where(second_order, h / (2.0 * jnp.where(second_order, h_prev, 1.0)), 0.0)
    d = pred_x0 + coef * (pred_x0 - prev_x0.astype(jnp.float32))
    # σ_{t-1}/σ_t from the float64-built log(1 - ᾱ), and α_{t-1} (1 - e^{-h}) via expm1.
    sigma_ratio = jnp.exp(
        0.5 * (extract(schedule.log_one_minus_alphas_cumprod, t_next, x_t.shape)
               - extract(schedule.log_one_minus_alphas_cumprod, t, x_t.shape))
    )
    alpha_next = extract(schedule.sqrt_alphas_cumprod, t_next, x_t.shape)
    x_prev = sigma_ratio * x_t.astype(jnp.float32) - alpha_next * jnp.expm1(-h) * d
    x_prev = jnp.where(_noise_mask(t, x_t.ndim) > 0, x_prev, pred_x0)
    return x_prev.astype(x_t.dtype), pred_x0.astype(x_t.dtype)


def respaced_for(
    schedule: Schedule, num_steps: int | None, sampler: str
) -> tuple[Schedule, jnp.ndarray]:
    """The schedule `sampler`'s loop walks (respaced when num_steps < T) and its int32
    timestep_map [K]: loop iteration j feeds the model the original timestep map[K - 1 - j]."""
    if num_steps is None or num_steps == schedule.num_timesteps:
        return schedule, jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    spacing = "logsnr" if sampler == "dpm_solver_pp_2m" else "uniform"
    steps_schedule, timestep_map = respace_schedule(schedule, num_steps, spacing)
    return steps_schedule, jnp.asarray(timestep_map)


def sample_steps(
    model_fn: ModelFn,
    schedule: Schedule,
    state: SamplerState,
    key: jax.Array,
    start: int | jnp.ndarray,
    stop: int | jnp.ndarray,
    *,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: bool = True,
    cond_fn: CondFn | None = None,
) -> SamplerState:
    """Loop iterations j = start..stop-1 of the K-step reverse process, on a carried state.

    Iteration j is the respaced index i = K-1-j (so j = 0 is the noisiest step); its key is
    fold_in(key, i). start/stop may be traced (one compilation for every chunk) and satisfy
    0 <= start <= stop <= K. See `sample` for the other arguments.
    """
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("var_type", var_type, VAR_TYPES)
    steps_schedule, timestep_map = respaced_for(schedule, num_steps, sampler)
    num = steps_schedule.num_timesteps
    batch = state.x.shape[0]
    channels = state.x.shape[-1]

    def body(j: jnp.ndarray, state: SamplerState) -> SamplerState:
        i = num - 1 - j  # respaced index, K-1 down to 0
        t = jnp.full((batch,), i, dtype=jnp.int32)
        t_model = jnp.full((batch,), timestep_map[i], dtype=jnp.int32)
        model_output = model_fn(state.x, t_model)
        cond_grad = None if cond_fn is None else cond_fn(state.x, t_model)
        if sampler == "ancestral":
            x_prev, pred_x0 = p_sample(
                steps_schedule, model_output, state.x, t, jax.random.fold_in(key, i),
                prediction=prediction, var_type=var_type, clip_x0=clip_x0, cond_grad=cond_grad,
            )
            return SamplerState(x_prev, pred_x0)
        if var_type == "learned_range":
            model_output = model_output[..., :channels]
        if sampler == "ddim":
            x_prev, pred_x0 = ddim_step(
                steps_schedule, model_output, state.x, t, jax.random.fold_in(key, i),
                prediction=prediction, eta=eta, clip_x0=clip_x0, cond_grad=cond_grad,
            )
        else:
            x_prev, pred_x0 = dpm_solver_pp_2m_step(
                steps_schedule, model_output, state.x, t, state.pred_x0,
                prediction=prediction, clip_x0=clip_x0, cond_grad=cond_grad,
            )
        return SamplerState(x_prev, pred_x0)

    return jax.lax.fori_loop(start, stop, body, state)


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: bool = True,
    x_T: jnp.ndarray | None = None,
    dtype: jnp.dtype = jnp.float32,
    cond_fn: CondFn | None = None,
) -> jnp.ndarray:
    """Draw x_0 [B, ...] by running the reverse process from x_T ~ N(0, I) (or the given x_T).

    model_fn(x_t, t_model) -> model_output, with t_model int32 [B] the ORIGINAL timestep (via
    timestep_map when respaced). sampler ∈ SAMPLERS; num_steps None means all T steps; eta is
    used by "ddim" only; var_type by "ancestral" only (for "ddim" and "dpm_solver_pp_2m" a
    learned_range output's variance channels are dropped). cond_fn(x_t, t_model) -> s ∇ₓ log
    p_φ(y | x_t, t), classifier guidance (None = off). The loop is a `lax.fori_loop` over
    i = K-1..0 with the step key fold_in(loop_key, i); x_T, when not given, is drawn from
    init_key, where (init_key, loop_key) = split(key). The result is not clipped beyond what
    clip_x0 does to x̂_0. dtype: of x_T when drawn here.
    """
    check_choice("sampler", sampler, SAMPLERS)
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, dtype) if x_T is None else x_T
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {x.shape}, expected {tuple(shape)}")
    num = num_steps or schedule.num_timesteps
    state = sample_steps(
        model_fn, schedule, init_state(x), loop_key, 0, num, sampler=sampler,
        num_steps=num_steps, eta=eta, prediction=prediction, var_type=var_type,
        clip_x0=clip_x0, cond_fn=cond_fn,
    )
    return state.x
