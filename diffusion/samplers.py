"""Reverse-process sampling: a registry of samplers, their steps, and the loop inside jit.

A sampler is one entry of `SAMPLERS` (name -> `SamplerEntry`), added with `@register(name)` on
its step function: the entry says which timesteps the loop visits, what it carries from step to
step, how many network evaluations a run costs, and how one step goes. How to sample is one frozen
`SamplerSpec` (sampler, num_steps, spacing, eta, prediction, var_type, clip_x0); config_lib builds
it from config.sample.

The step functions, from respaced index i to i - 1 (x_t to x_{t-1}), each a short function below:
  * "ancestral" (`p_sample`): Ho et al. 2020 Algorithm 2, x_{t-1} = μ_θ(x_t, t) + σ_t z, z = 0 at
    t = 0.
  * "ddim" (`ddim_step`): Song et al. 2021 eq. 12,
        x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,
        σ_t(η) = η √((1 - ᾱ_{t-1})/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t-1});
    η = 0 is deterministic DDIM, η = 1 matches ancestral sampling with σ_t² = β̃_t.
  * "dpm_solver_pp_2m" (`dpm_solver_pp_2m_step`): DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2),
    a second-order multistep solver of the probability-flow ODE in the data prediction x̂_0 and the
    half-log-SNR λ_t = log(α_t/σ_t), α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t). From s (noisier) to t,
    h = λ_t - λ_s:
        x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D,
        D = (1 + 1/(2r)) x̂_0(x_s) - 1/(2r) x̂_0(previous step),   r = h_prev/h,
    with D = x̂_0(x_s) on the first step (no history; this is DDIM with η = 0). Its history is the
    previous step's x̂_0, which every step leaves in `SamplerState.pred_x0`.
  * "dpm_solver_pp_2m_sde": the same solver for the reverse SDE (Lu et al. 2022's SDE-DPM-Solver++
    (2M)), x_t = (σ_t/σ_s) e^{-h} x_s + α_t (1 - e^{-2h}) D + σ_t √(1 - e^{-2h}) z.
  * "heun" (`heun_step`): Heun's second-order step of the probability-flow ODE, Karras et al. 2022
    (EDM) Algorithm 1 with S_churn = 0, in x̃ = x/√ᾱ and σ = √(1/ᾱ - 1) (there dx̃/dσ = ε̂; an Euler
    step of it is DDIM with η = 0), Euler on the last step. Two network evaluations per step except
    the last: a K-step run costs 2K - 1.
The last step of every sampler, from the least noisy timestep to ᾱ_{-1} = 1, returns x̂_0 (for
ancestral: μ_θ = x̂_0 there, no noise).

Every step takes an optional `cond_grad` = s ∇ₓ log p_φ(y | x_t, t) for classifier guidance
(see guidance.py): ancestral shifts the mean by Σ cond_grad (Dhariwal & Nichol Algorithm 1); the
others correct ε̂ by -√(1 - ᾱ_t) cond_grad (Algorithm 2) and re-derive x̂_0 from it.

Timesteps. With num_steps = K < T the loop walks the respaced diffusion on K of the T timesteps
(ᾱ kept on those steps, guided-diffusion respacing) and feeds the model the ORIGINAL timesteps.
Samplers that take spec.spacing (ancestral, ddim, heun) pick their K uniformly in t by one of
diffusers' rules (`schedules.space_timesteps`): "linspace" (the default: both ends kept),
"leading" (the DDIM paper, diffusers' default) or "trailing" (keeps t = T-1). DPM-Solver++ always
spaces uniformly in λ (`space_timesteps_logsnr`, Lu et al.'s "logSNR" choice for low-resolution
images): its steps are steps in λ, and on the linear schedule uniform t leaves one step of
Δλ ≈ 2.7 at the low-noise end, where the 2M extrapolation overshoots (20 steps on Gaussian data:
output variance +54 % with uniform t, +3 % uniform in λ); the grid stops at λ = -5
(`schedules.LOGSNR_MIN`), below which x_t is noise to 0.7 %. So it takes only the default spacing
(`spacing_problem` names the fix otherwise). The respaced schedule is built on the host (float64
numpy, at trace time) from the schedule's concrete values: under jit, close over the schedule or
build it inside the jitted function (`make_schedule` returns concrete arrays even while tracing).
A schedule passed as a jit *argument* is a tracer; that works for num_steps=None and raises a
ValueError saying so otherwise.

`sample_steps` runs any contiguous part of the same loop on a carried `SamplerState`, so a long
run can be split into jitted chunks with a progress line in between (one compilation: the chunk
bounds are traced). Where the boundaries fall does not change the result, bit for bit: the step
key is fold_in(key, i) of the step index i and every carried value travels in the state. (A
separately compiled `sample` agrees to float32 rounding: XLA optimises a loop with a static
trip count differently.)

Dtype: the loop carries x in its own dtype (bfloat16 stays bfloat16); each step computes in
float32 (see gaussian.py) and casts x_{t-1} back.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffusion import gaussian, guidance
from diffusion.gaussian import PREDICTIONS, VAR_TYPES, check_choice, extract
from diffusion.schedules import SPACINGS, T_SPACINGS, Schedule, respace_schedule
from errors import ConfigError

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t [B,...], t int32 [B]) -> out
# (x_t [B,...], t int32 [B]) -> s ∇ₓ log p_φ(y | x_t, t) [B,...], the scaled classifier gradient.
CondFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


class SamplerState(NamedTuple):
    """What the sampling loop carries from one step to the next."""

    x: jnp.ndarray  # [B, ...] the current x_t (x_0 after the last step)
    pred_x0: jnp.ndarray  # [B, ...] x̂_0 of the last step (figures show it; DPM-Solver++ reads it)
    extra: Any = ()  # the sampler's own carried pytree, leaves [B, ...] (SamplerEntry.init_extra)


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
    noise: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One DPM-Solver++(2M) step from index t to t - 1 of `schedule` (see the module docstring).

    prev_x0 is x̂_0 of the step before, at index t + 1; at t == T-1 (the first step, no history)
    the update is first order, and at t == 0 the step returns x̂_0. model_output has C channels.
    cond_grad: classifier guidance on ε̂, as in `ddim_step`. noise: z ~ N(0, I) [B, ...] for the
    SDE solver (SDE-DPM-Solver++(2M)); None: the ODE solver.
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
    if noise is None:
        x_prev = sigma_ratio * x_t.astype(jnp.float32) - alpha_next * jnp.expm1(-h) * d
    else:  # e^{-h} more of x̂_0's pull, and the noise that restores the marginal's variance
        sigma_next = extract(schedule.sqrt_one_minus_alphas_cumprod, t_next, x_t.shape)
        one_minus = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
        x_prev = (sigma_ratio * jnp.exp(-h) * x_t.astype(jnp.float32) + alpha_next * one_minus * d
                  + sigma_next * jnp.sqrt(one_minus) * noise.astype(jnp.float32))
    x_prev = jnp.where(_noise_mask(t, x_t.ndim) > 0, x_prev, pred_x0)
    return x_prev.astype(x_t.dtype), pred_x0.astype(x_t.dtype)




# --- the registry: one entry per sampler ---------------------------------------------------------

# (ctx, state, i, key) -> state: one step from respaced index i (a traced int32 scalar) to i - 1;
# key = fold_in(loop key, i) for a stochastic step.
StepFn = Callable[["StepContext", SamplerState, jnp.ndarray, jax.Array], SamplerState]


def _one_per_step(num_steps: int) -> int:
    return num_steps


def _no_extra(x_T: jnp.ndarray) -> tuple:
    del x_T
    return ()


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    """One sampler: its timesteps, its carried state, its cost and its step."""

    step: StepFn
    # None: the K timesteps of spec.spacing (uniform in t); else the schedules.SPACINGS rule this
    # sampler always uses (then spec.spacing must stay at its default, see `spacing_problem`).
    spacing: str | None = None
    # Network evaluations of a K-step run (K -> NFE); one per step unless said otherwise.
    model_evaluations: Callable[[int], int] = _one_per_step
    # x_T -> the sampler's own initial carried state (SamplerState.extra), a pytree of [B, ...].
    init_extra: Callable[[jnp.ndarray], Any] = _no_extra

    def __post_init__(self):
        if self.spacing is not None:
            check_choice("spacing", self.spacing, SPACINGS)


_REGISTRY: dict[str, SamplerEntry] = {}
SAMPLERS = types.MappingProxyType(_REGISTRY)  # name -> SamplerEntry, in registration order


def register(name: str, **fields: Any) -> Callable[[StepFn], StepFn]:
    """Decorator: registers its step function as sampler `name` (fields: those of SamplerEntry).

    That is all a new sampler needs: `name` is then a legal --config.sample.sampler, and
    SamplerSpec, `sample`, sampling_lib.Sampler and the CLI run it.
    """

    def add(step: StepFn) -> StepFn:
        if name in _REGISTRY:
            raise ValueError(f"a sampler named {name!r} is already registered")
        _REGISTRY[name] = SamplerEntry(step=step, **fields)
        return step

    return add


def unregister(name: str) -> None:
    """Removes sampler `name` (for tests and notebooks that register one of their own)."""
    del _REGISTRY[name]


DEFAULT_SPACING = T_SPACINGS[0]  # "linspace": uniform in t with both ends (guided-diffusion)


def spacing_problem(sampler: str, spacing: str, prefix: str = "") -> str | None:
    """Why `spacing` cannot go with `sampler`, in one line with the fix; None if it can.

    A sampler with its own spacing (DPM-Solver++: uniform in log-SNR) ignores spec.spacing, so
    anything but the default would silently do nothing. prefix names the config fields
    ("sample.").
    """
    own = SAMPLERS[sampler].spacing
    if own is None or spacing == DEFAULT_SPACING:
        return None
    others = tuple(name for name, entry in SAMPLERS.items() if entry.spacing is None)
    return (f"{prefix}spacing={spacing!r} does not apply to {prefix}sampler={sampler!r}, which "
            f"always uses its own {own!r} timesteps. Fix: leave {prefix}spacing at its default "
            f"{DEFAULT_SPACING!r}, or use a sampler that takes it: {others}.")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to run the reverse process: everything but the network, guidance and the batch.

    sampler ∈ SAMPLERS. num_steps: K loop steps on K of the T timesteps (None or 0: all T).
    spacing ∈ T_SPACINGS: how a t-spaced sampler picks its K (`schedules.space_timesteps`).
    eta: DDIM's η ("ddim" only). prediction ∈ PREDICTIONS and var_type ∈ VAR_TYPES describe the
    network output; var_type is used by "ancestral" only (the others drop learned_range's
    variance channels). clip_x0: clip x̂_0 to [-1, 1] (ε̂ re-derived from the clipped x̂_0).
    """

    sampler: str = "ancestral"
    num_steps: int | None = None
    spacing: str = DEFAULT_SPACING
    eta: float = 0.0
    prediction: str = "eps"
    var_type: str = "fixed_large"
    clip_x0: bool = True

    def __post_init__(self):
        check_choice("sampler", self.sampler, tuple(SAMPLERS))
        check_choice("spacing", self.spacing, T_SPACINGS)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("var_type", self.var_type, VAR_TYPES)
        problem = spacing_problem(self.sampler, self.spacing)
        if problem:
            raise ConfigError(problem)

    @property
    def entry(self) -> SamplerEntry:
        return SAMPLERS[self.sampler]

    def loop_length(self, num_timesteps: int) -> int:
        """K, the loop steps of a run on a T-step diffusion."""
        return self.num_steps or num_timesteps

    def model_evaluations(self, num_timesteps: int) -> int:
        """Network evaluations (NFE) of a run: K for most samplers, 2K - 1 for "heun"."""
        return self.entry.model_evaluations(self.loop_length(num_timesteps))


def as_spec(spec: SamplerSpec | None = None, **fields: Any) -> SamplerSpec:
    """`spec` (default: SamplerSpec()) with `fields` replaced: the keyword form of the samplers."""
    return dataclasses.replace(spec or SamplerSpec(), **fields)


@dataclasses.dataclass(frozen=True, eq=False)
class StepContext:
    """What a step function sees besides the state: the chain it walks, the spec, the network."""

    schedule: Schedule  # the chain the loop walks: K entries, respaced index i = 0..K-1
    timestep_map: jnp.ndarray  # int32 [K]: the original timestep of respaced index i
    spec: SamplerSpec
    model_fn: ModelFn
    cond_fn: CondFn | None
    batch: int

    def t(self, i: jnp.ndarray) -> jnp.ndarray:
        """Respaced index i as the int32 [B] timesteps of the step formulas."""
        return jnp.full((self.batch,), i, dtype=jnp.int32)

    def model(self, x: jnp.ndarray, i: jnp.ndarray, *, mean_only: bool = False):
        """(network output [B, ...], cond_grad [B, ...] or None) at x and respaced index i.

        The network is fed the ORIGINAL timestep timestep_map[i]. mean_only: the C prediction
        channels only (learned_range's variance channels dropped).
        """
        t_model = jnp.full((self.batch,), self.timestep_map[i], dtype=jnp.int32)
        out = self.model_fn(x, t_model)
        cond_grad = None if self.cond_fn is None else self.cond_fn(x, t_model)
        if mean_only and self.spec.var_type == "learned_range":
            out = out[..., : x.shape[-1]]
        return out, cond_grad

    def x0_and_eps(self, x: jnp.ndarray, i: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(x̂_0, ε̂) float32 at x and respaced index i, ε̂ classifier-corrected (`_x0_and_eps`)."""
        out, cond_grad = self.model(x, i, mean_only=True)
        return _x0_and_eps(self.schedule, out, x, self.t(i), prediction=self.spec.prediction,
                           clip_x0=self.spec.clip_x0, cond_grad=cond_grad)


@register("ancestral")
def _ancestral(ctx: StepContext, state: SamplerState, i: jnp.ndarray, key: jax.Array):
    """Ho et al. 2020 Algorithm 2 line 4: x_{t-1} = μ_θ(x_t, t) + σ_t z (`p_sample`)."""
    out, cond_grad = ctx.model(state.x, i)
    s = ctx.spec
    x_prev, pred_x0 = p_sample(ctx.schedule, out, state.x, ctx.t(i), key, prediction=s.prediction,
                               var_type=s.var_type, clip_x0=s.clip_x0, cond_grad=cond_grad)
    return SamplerState(x_prev, pred_x0, state.extra)


@register("ddim")
def _ddim(ctx: StepContext, state: SamplerState, i: jnp.ndarray, key: jax.Array):
    """Song et al. 2021 eq. 12 with σ_t(η) of eq. 16 (`ddim_step`)."""
    out, cond_grad = ctx.model(state.x, i, mean_only=True)
    s = ctx.spec
    x_prev, pred_x0 = ddim_step(ctx.schedule, out, state.x, ctx.t(i), key, prediction=s.prediction,
                                eta=s.eta, clip_x0=s.clip_x0, cond_grad=cond_grad)
    return SamplerState(x_prev, pred_x0, state.extra)


def _dpm_solver_pp_2m_update(ctx: StepContext, state: SamplerState, i: jnp.ndarray,
                             noise: jnp.ndarray | None) -> SamplerState:
    """Both DPM-Solver++(2M) entries (`dpm_solver_pp_2m_step`); the history is state.pred_x0."""
    out, cond_grad = ctx.model(state.x, i, mean_only=True)
    s = ctx.spec
    x_prev, pred_x0 = dpm_solver_pp_2m_step(
        ctx.schedule, out, state.x, ctx.t(i), state.pred_x0, prediction=s.prediction,
        clip_x0=s.clip_x0, cond_grad=cond_grad, noise=noise)
    return SamplerState(x_prev, pred_x0, state.extra)


@register("dpm_solver_pp_2m", spacing="logsnr")
def _dpm_solver_pp_2m(ctx: StepContext, state: SamplerState, i: jnp.ndarray, key: jax.Array):
    """Lu et al. 2022 Algorithm 2: the probability-flow ODE, no noise."""
    del key
    return _dpm_solver_pp_2m_update(ctx, state, i, None)


@register("dpm_solver_pp_2m_sde", spacing="logsnr")
def _dpm_solver_pp_2m_sde(ctx: StepContext, state: SamplerState, i: jnp.ndarray, key: jax.Array):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", its 2M solver of the reverse SDE;
    diffusers' "sde-dpmsolver++" midpoint): fresh noise z each step."""
    return _dpm_solver_pp_2m_update(ctx, state, i,
                                    jax.random.normal(key, state.x.shape, jnp.float32))


def _heun_evaluations(num_steps: int) -> int:
    return 2 * num_steps - 1  # two per step, one on the last (Euler) step


@register("heun", model_evaluations=_heun_evaluations)
def heun_step(ctx: StepContext, state: SamplerState, i: jnp.ndarray, key: jax.Array):
    """Heun's 2nd-order step of the probability-flow ODE from respaced index i to i - 1:
    Karras et al. 2022 (EDM) Algorithm 1 (S_churn = 0), Euler on the last step (i = 0).

    EDM's σ(t) = t, s(t) = 1 in the VP chain's own terms: x̃ = x/√ᾱ, σ = √(1/ᾱ - 1), so
    x̃ = x_0 + σ ε and the ODE is dx̃/dσ = (x̃ - D(x̃; σ))/σ = ε̂ (EDM eqs. 1 and 3, D = x̂_0).
    With σ_{-1} = 0 (ᾱ_{-1} = 1) and EDM's lines:
        4: d_i = ε̂(x_i, t_i)
        5: x̃' = x̃_i + (σ_{i-1} - σ_i) d_i                  (Euler)
        6: if σ_{i-1} ≠ 0:
        7:     d' = ε̂(x', t_{i-1})
        8:     x̃_{i-1} = x̃_i + (σ_{i-1} - σ_i) (d_i + d')/2  (trapezoid)
    Back in x = √ᾱ x̃: x' = √ᾱ_{i-1} x̂_0 + √(1 - ᾱ_{i-1}) ε̂ (DDIM with η = 0; x̂_0 at i = 0) and
        x_{i-1} = x' + ½ √ᾱ_{i-1} (σ_{i-1} - σ_i) (d' - d_i).
    Classifier guidance corrects ε̂ at both evaluations. pred_x0 is x̂_0 at (x_i, t_i).
    """
    del key
    s, x, t = ctx.schedule, state.x, ctx.t(i)
    pred_x0, eps = ctx.x0_and_eps(x, i)  # line 4: d_i = ε̂
    not_last = _noise_mask(t, x.ndim)
    sqrt_ab_prev = jnp.sqrt(extract(s.alphas_cumprod_prev, t, x.shape))  # √ᾱ_{i-1}, 1 at i = 0
    # √(1 - ᾱ_{i-1}) = √ᾱ_{i-1} σ_{i-1} from the float64-built table; 0 at i = 0.
    sqrt_one_minus_prev = not_last * extract(
        s.sqrt_one_minus_alphas_cumprod, jnp.maximum(t - 1, 0), x.shape)
    x_euler = sqrt_ab_prev * pred_x0 + sqrt_one_minus_prev * eps  # line 5
    # √ᾱ_{i-1} (σ_{i-1} - σ_i), with σ_i = √(1/ᾱ_i - 1) from the float64-built table.
    step = sqrt_one_minus_prev - sqrt_ab_prev * extract(s.sqrt_recipm1_alphas_cumprod, t, x.shape)

    def trapezoid(x_euler: jnp.ndarray) -> jnp.ndarray:
        _, eps_next = ctx.x0_and_eps(x_euler.astype(x.dtype), i - 1)  # line 7: d'
        return x_euler + 0.5 * step * (eps_next - eps)  # line 8

    x_prev = jax.lax.cond(i > 0, trapezoid, lambda x_euler: x_euler, x_euler)  # line 6
    return SamplerState(x_prev.astype(x.dtype), pred_x0.astype(x.dtype), state.extra)


# --- the loop ------------------------------------------------------------------------------------

def respaced_for(schedule: Schedule, spec: SamplerSpec) -> tuple[Schedule, jnp.ndarray]:
    """The schedule spec's loop walks (respaced when num_steps < T) and its int32 timestep_map
    [K]: loop iteration j feeds the model the original timestep map[K - 1 - j]."""
    if not spec.num_steps or spec.num_steps == schedule.num_timesteps:
        return schedule, jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    spacing = spec.entry.spacing or spec.spacing
    steps_schedule, timestep_map = respace_schedule(schedule, spec.num_steps, spacing)
    return steps_schedule, jnp.asarray(timestep_map)


def init_state(x_T: jnp.ndarray, spec: SamplerSpec | None = None) -> SamplerState:
    """The loop state before the first step: x = x_T, no x̂_0 yet (zeros), and the sampler's own
    initial `extra` (none without a spec)."""
    extra = () if spec is None else spec.entry.init_extra(x_T)
    return SamplerState(x=x_T, pred_x0=jnp.zeros_like(x_T), extra=extra)


def sample_steps(
    model_fn: ModelFn,
    schedule: Schedule,
    state: SamplerState,
    key: jax.Array,
    start: int | jnp.ndarray,
    stop: int | jnp.ndarray,
    spec: SamplerSpec | None = None,
    *,
    cond_fn: CondFn | None = None,
    **spec_fields: Any,
) -> SamplerState:
    """Loop iterations j = start..stop-1 of the K-step reverse process, on a carried state.

    Iteration j is the respaced index i = K-1-j (so j = 0 is the noisiest step); its key is
    fold_in(key, i). start/stop may be traced (one compilation for every chunk) and satisfy
    0 <= start <= stop <= K. spec_fields: SamplerSpec fields, replacing spec's (see `as_spec`).
    See `sample` for the other arguments.
    """
    spec = as_spec(spec, **spec_fields)
    steps_schedule, timestep_map = respaced_for(schedule, spec)
    num = steps_schedule.num_timesteps
    ctx = StepContext(steps_schedule, timestep_map, spec, model_fn, cond_fn, state.x.shape[0])
    step = spec.entry.step

    def body(j: jnp.ndarray, state: SamplerState) -> SamplerState:
        i = num - 1 - j  # respaced index, K-1 down to 0
        return step(ctx, state, i, jax.random.fold_in(key, i))

    return jax.lax.fori_loop(start, stop, body, state)


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    spec: SamplerSpec | None = None,
    *,
    x_T: jnp.ndarray | None = None,
    dtype: jnp.dtype = jnp.float32,
    cond_fn: CondFn | None = None,
    **spec_fields: Any,
) -> jnp.ndarray:
    """Draw x_0 [B, ...] by running the reverse process from x_T ~ N(0, I) (or the given x_T).

    model_fn(x_t, t_model) -> model_output, with t_model int32 [B] the ORIGINAL timestep (via
    timestep_map when respaced). spec (or its fields as keywords, `as_spec`): the sampler, its
    steps and how to read the network output. cond_fn(x_t, t_model) -> s ∇ₓ log p_φ(y | x_t, t),
    classifier guidance (None = off). The loop is a `lax.fori_loop` over i = K-1..0 with the step
    key fold_in(loop_key, i); x_T, when not given, is drawn from init_key, where (init_key,
    loop_key) = split(key). The result is not clipped beyond what clip_x0 does to x̂_0. dtype: of
    x_T when drawn here.
    """
    spec = as_spec(spec, **spec_fields)
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, dtype) if x_T is None else x_T
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {x.shape}, expected {tuple(shape)}")
    num = spec.loop_length(schedule.num_timesteps)
    state = sample_steps(model_fn, schedule, init_state(x, spec), loop_key, 0, num, spec,
                         cond_fn=cond_fn)
    return state.x
