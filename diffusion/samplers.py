"""Reverse-process sampling: single steps and the full loop inside jit.

Single steps take the network output for (x_t, t) and return (x_{t-1}, x̂_0):
  * `p_sample`: ancestral DDPM step, x_{t-1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I), z = 0 at t = 0.
  * `ddim_step`: Song et al. 2021 eq. 12,
        x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,
        σ_t(η) = η √((1 - ᾱ_{t-1})/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1});
    η = 0 is deterministic DDIM, η = 1 matches ancestral sampling with σ_t² = β̃_t.

`sample` runs K steps in a `lax.fori_loop`. With num_steps = K < T it samples the respaced
diffusion on the timesteps `space_timesteps(T, K)` (ᾱ kept on those steps, guided-diffusion
respacing) and feeds the model the ORIGINAL timesteps. The respaced schedule is built on the host
(float64 numpy, at trace time) from the schedule's concrete values: under jit, close over the
schedule or build it inside the jitted function (`make_schedule` returns concrete arrays even
while tracing). A schedule passed as a jit *argument* is a tracer; that works for num_steps=None
and raises a ValueError saying so otherwise.

Dtype: the loop carries x in its own dtype (bfloat16 stays bfloat16); each step computes in
float32 (see gaussian.py) and casts x_{t-1} back.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion import gaussian
from diffusion.gaussian import PREDICTIONS, VAR_TYPES, check_choice, extract
from diffusion.schedules import Schedule, respace_schedule

SAMPLERS = ("ancestral", "ddim")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t [B,...], t int32 [B]) -> out


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
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One ancestral step x_{t-1} = μ_θ + exp(½ log σ_t²) z, with z = 0 where t == 0.

    Returns (x_prev, pred_x0), both [B, ...] in x_t's dtype.
    """
    out = gaussian.p_mean_variance(
        schedule, model_output, x_t, t, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    z = jax.random.normal(key, x_t.shape, jnp.float32)
    x_prev = out.mean + _noise_mask(t, x_t.ndim) * jnp.exp(0.5 * out.log_variance) * z
    return x_prev.astype(x_t.dtype), out.pred_x0


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
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One DDIM step (Song et al. eq. 12, see the module docstring); at t == 0 returns x̂_0.

    model_output has C channels (drop learned-variance channels first). The previous timestep is
    the schedule's previous index, so a respaced schedule gives the strided DDIM update.
    Returns (x_prev, pred_x0), both [B, ...] in x_t's dtype.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    pred_x0, pred_eps = gaussian.predict_x0_and_eps(
        schedule, model_output, x_t, t, prediction=prediction, clip_x0=clip_x0
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
    x_prev = (
        jnp.sqrt(alpha_bar_prev) * pred_x0.astype(jnp.float32)
        + dir_coef * pred_eps.astype(jnp.float32)
        + jnp.sqrt(sigma2) * z
    )
    x_prev = jnp.where(not_last > 0, x_prev, pred_x0.astype(jnp.float32))
    return x_prev.astype(x_t.dtype), pred_x0


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
) -> jnp.ndarray:
    """Draw x_0 [B, ...] by running the reverse process from x_T ~ N(0, I) (or the given x_T).

    model_fn(x_t, t_model) -> model_output, with t_model int32 [B] the ORIGINAL timestep (via
    timestep_map when respaced). sampler ∈ SAMPLERS; num_steps None means all T steps; eta is
    used by "ddim" only; var_type by "ancestral" only (for "ddim" a learned_range output's
    variance channels are dropped). The loop is a `lax.fori_loop` over i = K-1..0 with the step
    key fold_in(key, i); x_T, when not given, is drawn from a key split off `key`.
    The result is not clipped beyond what clip_x0 does to x̂_0. dtype: of x_T when drawn here.
    """
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("var_type", var_type, VAR_TYPES)
    if num_steps is None or num_steps == schedule.num_timesteps:
        steps_schedule = schedule
        timestep_map = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    else:
        steps_schedule, timestep_map_np = respace_schedule(schedule, num_steps)
        timestep_map = jnp.asarray(timestep_map_np)  # [K] int32
    num = steps_schedule.num_timesteps
    batch = shape[0]
    channels = shape[-1]

    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, dtype) if x_T is None else x_T
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {x.shape}, expected {tuple(shape)}")

    def body(j: int, x_t: jnp.ndarray) -> jnp.ndarray:
        i = num - 1 - j  # respaced index, K-1 down to 0
        t = jnp.full((batch,), i, dtype=jnp.int32)
        t_model = jnp.full((batch,), timestep_map[i], dtype=jnp.int32)
        model_output = model_fn(x_t, t_model)
        step_key = jax.random.fold_in(loop_key, i)
        if sampler == "ancestral":
            x_prev, _ = p_sample(
                steps_schedule,
                model_output,
                x_t,
                t,
                step_key,
                prediction=prediction,
                var_type=var_type,
                clip_x0=clip_x0,
            )
        else:
            if var_type == "learned_range":
                model_output = model_output[..., :channels]
            x_prev, _ = ddim_step(
                steps_schedule,
                model_output,
                x_t,
                t,
                step_key,
                prediction=prediction,
                eta=eta,
                clip_x0=clip_x0,
            )
        return x_prev

    return jax.lax.fori_loop(0, num, body, x)
