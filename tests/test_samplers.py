"""Sampler steps and loops: exact step formulas, noise statistics, and the Gaussian-data oracle."""

import math
import re

import chex
import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian, samplers, schedules

T = 1000
ORACLE_SHAPE = (1024, 4, 4, 4)  # [B, H, W, C]: 65536 iid scalars per sampler run


@pytest.fixture(scope="module")
def schedule():
    return schedules.schedule_from_name("linear", T)


@pytest.fixture(scope="module")
def betas():
    return schedules.get_betas("linear", T)


def _standard_errors(var: float, n: int) -> tuple[float, float]:
    """Standard errors of the sample mean and the sample variance of n iid N(·, var) draws."""
    return math.sqrt(var / n), var * math.sqrt(2.0 / (n - 1))


def test_p_sample_adds_model_std_noise_except_at_t0(schedule, betas):
    """x_{t-1} - μ_θ must be σ_t z with z ~ N(0, 1) where t > 0, and exactly 0 where t = 0
    (per example). z's mean and variance are checked to 5 standard errors."""
    shape = (256, 4, 4, 4)
    t = jnp.asarray(np.where(np.arange(shape[0]) % 2 == 0, 0, 500), jnp.int32)  # mixed batch
    x_t = jax.random.normal(jax.random.key(0), shape)
    out = jax.random.normal(jax.random.key(1), shape)
    kwargs = dict(prediction="eps", var_type="fixed_large", clip_x0=False)
    x_prev, pred_x0 = jax.jit(samplers.p_sample, static_argnames=tuple(kwargs))(
        schedule, out, x_t, t, jax.random.key(2), **kwargs
    )
    p = jax.jit(gaussian.p_mean_variance, static_argnames=tuple(kwargs))(
        schedule, out, x_t, t, **kwargs
    )
    np.testing.assert_allclose(pred_x0, p.pred_x0, rtol=1e-5, atol=1e-5)
    # No noise where t = 0 (σ_0 z would be ~7e-3 here).
    np.testing.assert_allclose(x_prev[0::2], p.mean[0::2], rtol=0, atol=1e-5)
    z = np.asarray((x_prev[1::2] - p.mean[1::2]) / math.sqrt(betas[500]), np.float64)
    mean_se, var_se = _standard_errors(1.0, z.size)
    assert abs(z.mean()) < 5 * mean_se
    assert abs(z.var() - 1.0) < 5 * var_se


def test_ddim_step_formula_and_noise(schedule, betas):
    """η = 0: x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}) ε̂ exactly; t = 0 returns x̂_0;
    η = 0.5: the added noise has variance σ_t² = η² β̃_t (to 5 standard errors)."""
    shape = (256, 2, 2, 4)
    ts = np.resize(np.array([0, 1, 10, 500, 999], np.int32), shape[0])
    t = jnp.asarray(ts)
    x_t = jax.random.normal(jax.random.key(0), shape)
    out = jax.random.normal(jax.random.key(1), shape)
    step = jax.jit(samplers.ddim_step, static_argnames=("prediction", "clip_x0"))
    x_prev, pred_x0 = step(
        schedule, out, x_t, t, jax.random.key(2), prediction="eps", eta=0.0, clip_x0=False
    )

    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])[ts].reshape(-1, 1, 1, 1)
    a = np.sqrt(ab[ts]).reshape(-1, 1, 1, 1)
    x, e = np.asarray(x_t, np.float64), np.asarray(out, np.float64)
    x0_hat = (x - np.sqrt(1 - a**2) * e) / a
    expected = np.sqrt(ab_prev) * x0_hat + np.sqrt(1 - ab_prev) * e
    np.testing.assert_allclose(pred_x0, x0_hat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_prev, expected, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(x_prev[ts == 0], pred_x0[ts == 0])

    # η = 0.5 on one shared (x_t, output) pair across the batch: the spread is σ_t z.
    i = 3  # ts[3] == 500
    t500 = jnp.full((4096,), 500, jnp.int32)
    x1 = jnp.broadcast_to(x_t[i], (4096, 2, 2, 4))
    o1 = jnp.broadcast_to(out[i], (4096, 2, 2, 4))
    noisy, _ = step(
        schedule, o1, x1, t500, jax.random.key(3), prediction="eps", eta=0.5, clip_x0=False
    )
    deterministic, _ = step(
        schedule, o1, x1, t500, jax.random.key(3), prediction="eps", eta=0.0, clip_x0=False
    )
    sigma2 = 0.25 * betas[500] * (1 - ab[499]) / (1 - ab[500])
    mean_expected = np.sqrt(ab[499]) * x0_hat[i] + np.sqrt(1 - ab[499] - sigma2) * e[i]
    residual = np.asarray(noisy, np.float64) - mean_expected
    mean_se, var_se = _standard_errors(sigma2, residual.shape[0])
    assert np.all(np.abs(residual.mean(0)) < 5 * mean_se)
    assert np.all(np.abs(residual.var(0) - sigma2) < 5 * var_se)
    assert not np.allclose(noisy[0], deterministic[0])


def _sample_moments(x: jnp.ndarray) -> tuple[float, float, int]:
    x = np.asarray(x, np.float64).ravel()
    return x.mean(), x.var(ddof=1), x.size


@pytest.mark.parametrize("var_type", gaussian.VAR_TYPES)
def test_ancestral_sampling_with_the_oracle_reproduces_the_data(schedule, betas, var_type):
    """1000 ancestral steps with the exact ε-oracle for x_0 ~ N(0.3, 0.5²).

    Every step is affine in x_t plus Gaussian noise, so the output is exactly N(m, v) with
    (m, v) from `oracle.chain_moments`. The sample moments of 65536 iid scalars must match
    (m, v) within 5 standard errors (SE of the mean √(v/n) ≈ 0.002, of the variance
    v √(2/(n-1)) ≈ 0.0014), and (μ, s²) within 5 SE + |bias|, where the bias (m - μ, v - s²) is
    that of the variance choice, not sampling error:
      fixed_large  σ² = β_t:  v - s² ≈ +0.3 % of s²   (exact for s = 1 data; nearly exact here)
      fixed_small  σ² = β̃_t:  v - s² ≈ -1.5 % of s²   (exact only for a point mass)
      learned_range, fed the true reverse variance β̃_t + c1² Var(x_0|x_t): ≈ -0.04 % (only the
      noise-free last step), i.e. exact.
    """
    ab = np.cumprod(1 - betas)
    _, _, post_var = oracle.posterior_coefs(betas)
    values = None
    if var_type == "fixed_large":
        sigma2 = np.concatenate([[post_var[1]], betas[1:]])
    elif var_type == "fixed_small":
        sigma2 = post_var
    else:
        sigma2 = oracle.optimal_reverse_variance(betas)
        values = oracle.learned_range_values(betas, sigma2)
    model_fn = oracle.make_eps_model(ab, variance_values=values)
    run = oracle.fast_jit(
        lambda key: samplers.sample(
            model_fn, schedule, ORACLE_SHAPE, key, var_type=var_type, clip_x0=False
        )
    )
    mean, var, n = _sample_moments(run(jax.random.key(0)))

    m, v = oracle.chain_moments(oracle.ancestral_steps(betas, sigma2))
    mean_se, var_se = _standard_errors(v, n)
    assert abs(mean - m) < 5 * mean_se, (mean, m)
    assert abs(var - v) < 5 * var_se, (var, v)
    assert abs(mean - oracle.MU) < 5 * mean_se + abs(m - oracle.MU)
    assert abs(var - oracle.S2) < 5 * var_se + abs(v - oracle.S2)
    relative_bias = (v - oracle.S2) / oracle.S2
    assert abs(m - oracle.MU) < 1e-5
    expected_bias = {"fixed_large": (0.0, 0.005), "fixed_small": (-0.02, -0.01)}
    low, high = expected_bias.get(var_type, (-1e-3, 0.0))
    assert low < relative_bias < high, relative_bias


def test_ddim_with_the_oracle_is_the_exact_deterministic_map(schedule, betas):
    """DDIM, η = 0, 50 respaced steps: x_0 = gain · x_T + offset exactly (no sampling error), with
    the map composed in float64 over ᾱ on `space_timesteps(1000, 50)`. This also checks that
    the model sees the ORIGINAL timesteps (the oracle is indexed by them).

    Note the discretisation error of 50 DDIM steps on this data: the output variance is ≈ 11 %
    below s² (it is first order in the step size: ≈ 5.6 % at 100 steps, 0.6 % at 1000), while
    the mean is within 1e-3 of μ. So "DDIM reproduces s²" holds only up to that known bias.
    """
    ab = np.cumprod(1 - betas)
    model_fn = oracle.make_eps_model(ab)
    x_T = jax.random.normal(jax.random.key(0), ORACLE_SHAPE)
    run = oracle.fast_jit(
        lambda x_T: samplers.sample(
            model_fn,
            schedule,
            ORACLE_SHAPE,
            jax.random.key(1),
            sampler="ddim",
            num_steps=50,
            clip_x0=False,
            x_T=x_T,
        )
    )
    x0 = np.asarray(run(x_T), np.float64)

    steps = oracle.ddim_steps(ab[schedules.space_timesteps(T, 50)], eta=0.0)
    offset = oracle.chain_moments(steps, mean=0.0, var=0.0)[0]  # image of x_T = 0
    gain = oracle.chain_moments(steps, mean=1.0, var=0.0)[0] - offset
    np.testing.assert_allclose(x0, gain * np.asarray(x_T, np.float64) + offset, atol=2e-4)

    m, v = oracle.chain_moments(steps)
    assert abs(m - oracle.MU) < 1e-3 and -0.12 < (v - oracle.S2) / oracle.S2 < -0.10
    mean, var, n = _sample_moments(x0)
    mean_se, var_se = _standard_errors(v, n)
    assert abs(mean - m) < 5 * mean_se and abs(var - v) < 5 * var_se


def test_stochastic_ddim_with_the_oracle_matches_its_exact_moments(schedule, betas):
    """DDIM with η = 0.5 over 50 respaced steps: output N(m, v) from the affine-Gaussian chain."""
    ab = np.cumprod(1 - betas)
    run = oracle.fast_jit(
        lambda key: samplers.sample(
            oracle.make_eps_model(ab),
            schedule,
            ORACLE_SHAPE,
            key,
            sampler="ddim",
            num_steps=50,
            eta=0.5,
            clip_x0=False,
        )
    )
    mean, var, n = _sample_moments(run(jax.random.key(0)))
    m, v = oracle.chain_moments(oracle.ddim_steps(ab[schedules.space_timesteps(T, 50)], eta=0.5))
    mean_se, var_se = _standard_errors(v, n)
    assert abs(mean - m) < 5 * mean_se and abs(var - v) < 5 * var_se


def test_sample_feeds_the_model_the_original_timesteps():
    schedule = schedules.schedule_from_name("cosine", 100)
    seen = []

    def model_fn(x_t, t):
        jax.debug.callback(lambda t: seen.append(int(t[0])), t, ordered=True)
        return jnp.zeros_like(x_t)

    out = jax.jit(
        lambda key: samplers.sample(model_fn, schedule, (2, 3), key, sampler="ddim", num_steps=5)
    )(jax.random.key(0))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert seen == schedules.space_timesteps(100, 5)[::-1].tolist()


def _sample_10_of_50(key):
    return samplers.sample(
        lambda x, t: 0.1 * x,
        schedules.schedule_from_name("linear", 50),
        (4, 2, 2, 3),
        key,
        num_steps=10,
    )


def test_sample_under_jit_keys_dtypes_and_respacing():
    small = schedules.schedule_from_name("linear", 50)
    model_fn = lambda x, t: 0.1 * x
    chex.clear_trace_counter()
    closure = jax.jit(chex.assert_max_traces(_sample_10_of_50, n=1))
    a, b = closure(jax.random.key(0)), closure(jax.random.key(0))
    np.testing.assert_array_equal(a, b)  # same key -> same sample, and no retrace on new keys
    assert not np.allclose(a, closure(jax.random.key(1)))

    # A schedule passed as a jit argument is a tracer: fine for all steps, not for respacing.
    as_arg = jax.jit(lambda s, key: samplers.sample(model_fn, s, (4, 2, 2, 3), key))
    full = jax.jit(lambda key: samplers.sample(model_fn, small, (4, 2, 2, 3), key))
    np.testing.assert_allclose(as_arg(small, jax.random.key(0)), full(jax.random.key(0)), rtol=1e-5)
    with pytest.raises(ValueError, match="Close over the schedule"):
        jax.jit(lambda s, key: samplers.sample(model_fn, s, (4, 2, 2, 3), key, num_steps=10))(
            small, jax.random.key(0)
        )
    # The message lists every registered sampler (the built-in three first), so it is read from
    # the registry rather than written out: a new sampler lengthens the list.
    assert tuple(samplers.SAMPLERS)[:3] == ("ancestral", "ddim", "dpm_solver_pp_2m")
    with pytest.raises(
        ValueError,
        match="unknown sampler 'ddpm'; expected one of " + re.escape(str(tuple(samplers.SAMPLERS))),
    ):
        samplers.sample(model_fn, small, (4, 3), jax.random.key(0), sampler="ddpm")


def test_ddim_sample_in_bfloat16_ignores_learned_variance_channels():
    small = schedules.schedule_from_name("cosine", 50)
    eps_only = lambda x, t: 0.1 * x
    with_variance = lambda x, t: jnp.concatenate([0.1 * x, jnp.ones_like(x)], -1)
    run = lambda model_fn, var_type: samplers.sample(
        model_fn,
        small,
        (4, 2, 2, 3),
        jax.random.key(0),
        sampler="ddim",
        num_steps=10,
        var_type=var_type,
        dtype=jnp.bfloat16,
    )
    a, b = jax.jit(lambda: (run(eps_only, "fixed_small"), run(with_variance, "learned_range")))()
    assert a.dtype == b.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(a, np.float32)))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _case_p_sample(s, x, t, key):
    output = jnp.concatenate([x, jnp.tanh(x)], -1)
    return samplers.p_sample(
        s, output, x, t, key, prediction="v", var_type="learned_range", clip_x0=True
    )


def _case_ddim_step(s, x, t, key):
    return samplers.ddim_step(s, x, x, t, key, prediction="eps", eta=0.5, clip_x0=True)


@pytest.mark.parametrize("fn", [_case_p_sample, _case_ddim_step])
def test_steps_trace_once_per_dtype_and_keep_the_input_dtype(schedule, fn):
    chex.clear_trace_counter()
    # Two dtypes -> two traces; any retrace on a new t value would exceed 2.
    jitted = jax.jit(chex.assert_max_traces(fn, n=2))
    x = jax.random.normal(jax.random.key(0), (5, 2, 2, 3))
    for dtype in (jnp.float32, jnp.bfloat16):
        for i, t in enumerate(([0, 1, 2, 500, 999], [999, 3, 0, 0, 7])):
            x_prev, pred_x0 = jitted(
                schedule, x.astype(dtype), jnp.asarray(t, jnp.int32), jax.random.key(i)
            )
            assert x_prev.dtype == pred_x0.dtype == dtype
            assert np.all(np.isfinite(np.asarray(x_prev, np.float32)))


# --- timestep spacing, Heun, the registry ---------------------------------------------------------

def _model_timesteps(schedule, spec) -> list[int]:
    """The original timesteps the network is fed, in call order, during one run of `spec`."""
    seen = []

    def model_fn(x_t, t):
        jax.debug.callback(lambda t: seen.append(int(t[0])), t, ordered=True)
        return 0.1 * x_t

    jax.block_until_ready(jax.jit(lambda key: samplers.sample(
        model_fn, schedule, (2, 3), key, spec, clip_x0=False))(jax.random.key(0)))
    jax.effects_barrier()
    return seen


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "heun"])
@pytest.mark.parametrize("spacing", schedules.T_SPACINGS)
def test_t_spaced_samplers_visit_their_spacings_timesteps(sampler, spacing):
    """Each step feeds the network the next timestep of `space_timesteps(T, K, spacing)`, noisiest
    first; "heun" evaluates twice per step (x_i at t_i, then the Euler point x' at t_{i-1}) and
    once on the last, 2K - 1 = spec.model_evaluations(T) calls in all."""
    schedule = schedules.schedule_from_name("cosine", 100)
    spec = samplers.SamplerSpec(sampler=sampler, num_steps=6, spacing=spacing)
    ts = schedules.space_timesteps(100, 6, spacing)[::-1].tolist()
    expected = ts
    if sampler == "heun":  # t_i, t_{i-1} per step; t_0 alone on the last
        expected = [t for pair in zip(ts[:-1], ts[1:], strict=True) for t in pair] + ts[-1:]
    assert _model_timesteps(schedule, spec) == expected
    assert spec.model_evaluations(100) == len(expected) == (11 if sampler == "heun" else 6)


def test_ddim_with_trailing_spacing_is_the_exact_map_on_those_timesteps(schedule, betas):
    """DDIM η = 0 on the 25 "trailing" timesteps (t = 999, 959, ..., 39: t = 0 is not among them, so
    the last step denoises from t = 39): x_0 = gain · x_T + offset, composed in float64."""
    ab = np.cumprod(1 - betas)
    x_T = jax.random.normal(jax.random.key(0), (256, 4))
    spec = samplers.SamplerSpec(sampler="ddim", num_steps=25, spacing="trailing", clip_x0=False)
    x0 = jax.jit(lambda x_T: samplers.sample(oracle.make_eps_model(ab), schedule, x_T.shape,
                                             jax.random.key(1), spec, x_T=x_T))(x_T)
    steps = oracle.ddim_steps(ab[np.arange(39, 1000, 40)], eta=0.0)
    offset = oracle.chain_moments(steps, mean=0.0, var=0.0)[0]
    gain = oracle.chain_moments(steps, mean=1.0, var=0.0)[0] - offset
    np.testing.assert_allclose(x0, gain * np.asarray(x_T, np.float64) + offset, atol=2e-4)


def test_dpm_solver_keeps_its_own_spacing_and_says_so():
    assert samplers.spacing_problem("dpm_solver_pp_2m", "linspace") is None
    assert samplers.spacing_problem("ddim", "trailing") is None
    with pytest.raises(ValueError, match=r"spacing='trailing' does not apply to "
                       r"sampler='dpm_solver_pp_2m'.*'logsnr'.*Fix: leave spacing at its "
                       r"default 'linspace'"):
        samplers.SamplerSpec(sampler="dpm_solver_pp_2m", num_steps=10, spacing="trailing")
    with pytest.raises(ValueError, match=r"unknown spacing 'uniform'"):
        samplers.SamplerSpec(spacing="uniform")


def _map_of_run(schedule, spec) -> tuple[float, float]:
    """(gain, offset) of a deterministic run with the ε-oracle: x_0 = gain · x_T + offset, read off
    the outputs for x_T = 0 and x_T = 1 (the run is affine in x_T)."""
    model_fn = oracle.make_eps_model(np.asarray(schedule.alphas_cumprod, np.float64))
    x_T = jnp.asarray([[0.0], [1.0]])
    out = jax.jit(lambda: samplers.sample(model_fn, schedule, (2, 1), jax.random.key(0), spec,
                                          x_T=x_T))()
    out = np.asarray(out, np.float64)[:, 0]
    return out[1] - out[0], out[0]


def test_heun_with_the_oracle_is_the_exact_deterministic_map(schedule, betas):
    """Heun, 20 steps (39 network evaluations): x_0 = gain · x_T + offset exactly, the map composed
    in float64 from EDM's Algorithm 1 (`oracle.heun_steps`, written in x̃ = x/√ᾱ and σ); the
    65536 output scalars have that map's moments (no sampling error: the run is deterministic)."""
    ab = np.cumprod(1 - betas)
    spec = samplers.SamplerSpec(sampler="heun", num_steps=20, clip_x0=False)
    x_T = jax.random.normal(jax.random.key(0), ORACLE_SHAPE)
    x0 = oracle.fast_jit(lambda x_T: samplers.sample(
        oracle.make_eps_model(ab), schedule, ORACLE_SHAPE, jax.random.key(1), spec, x_T=x_T))(x_T)
    steps = oracle.heun_steps(ab[schedules.space_timesteps(T, 20)])
    offset = oracle.chain_moments(steps, mean=0.0, var=0.0)[0]
    gain = oracle.chain_moments(steps, mean=1.0, var=0.0)[0] - offset
    np.testing.assert_allclose(x0, gain * np.asarray(x_T, np.float64) + offset, atol=2e-4)
    m, v = oracle.chain_moments(steps)
    mean, var, n = _sample_moments(x0)
    mean_se, var_se = _standard_errors(v, n)
    assert abs(mean - m) < 5 * mean_se and abs(var - v) < 5 * var_se


def test_heun_converges_at_second_order_and_beats_ddim_at_equal_evaluations(schedule):
    """Output-variance error of the deterministic map, relative to its K → ∞ limit (the exact
    probability-flow ODE from t = 999 to t = 0, then x̂_0 there; `oracle.probability_flow_limit`),
    for x_T ~ N(0, 1) and Gaussian data N(0.3, 0.5²), linear schedule, T = 1000, "linspace":

        K (Heun steps)  NFE   Heun error   DDIM with K' = NFE steps
              8          15    +31.2 %       -33.5 %
             16          31     +6.4 %       -17.2 %
             32          63     +1.5 %        -8.7 %
             64         127     +0.37 %       -4.4 %

    Heun's error falls ~4x per doubling (order 2.3, 2.1, 2.0), DDIM's ~2x (order 1.0): at equal
    network evaluations Heun is 1.1x, 2.7x, 5.8x, 12x closer. (At K = 4, NFE 7, Heun is worse:
    +329 % against -63 %; its first step, from σ ≈ 157 to σ ≈ 1.4, is too long for the
    trapezoid.) The limit itself is 0.04 % below s², the final x̂_0 at t = 0."""
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    gain_limit, _, _ = oracle.probability_flow_limit(ab[-1], ab[0])

    def error(sampler: str, num_steps: int) -> float:
        spec = samplers.SamplerSpec(sampler=sampler, num_steps=num_steps, clip_x0=False)
        gain, _ = _map_of_run(schedule, spec)
        return gain**2 / gain_limit**2 - 1.0

    ks = (8, 16, 32, 64)
    heun = np.array([error("heun", k) for k in ks])
    ddim = np.array([error("ddim", 2 * k - 1) for k in ks])
    np.testing.assert_allclose(heun, [0.312, 0.0638, 0.0151, 0.00366], rtol=0.02)
    heun_order, ddim_order = np.log2(heun[:-1] / heun[1:]), np.log2(np.abs(ddim[:-1] / ddim[1:]))
    assert np.all((1.9 < heun_order) & (heun_order < 2.4)), heun_order
    assert np.all((0.9 < ddim_order) & (ddim_order < 1.1)), ddim_order
    advantage = np.abs(ddim) / heun
    assert advantage[0] > 1.0 and np.all(advantage[1:] > 2.5), advantage
    assert abs(gain_limit**2 / oracle.S2 - 1.0) < 1e-3


def _toy_step(ctx, state, i, key):
    """A registered-in-the-test sampler: DDIM's step, plus a per-example count of its steps."""
    state = samplers.SAMPLERS["ddim"].step(ctx, state, i, key)
    return state._replace(extra=state.extra + 1)


@pytest.fixture
def toy_sampler():
    samplers.register("toy_counting_ddim", init_extra=lambda x_T: jnp.zeros(x_T.shape[0],
                                                                            jnp.int32))(_toy_step)
    yield "toy_counting_ddim"
    samplers.unregister("toy_counting_ddim")


def test_a_registered_sampler_runs_with_its_own_state(toy_sampler):
    """One `register` call makes a sampler: SAMPLERS lists it, SamplerSpec accepts it, the loop runs
    its step and carries its own state (here a step count), in chunks as in one loop."""
    assert toy_sampler in samplers.SAMPLERS
    schedule = schedules.schedule_from_name("cosine", 50)
    spec = samplers.SamplerSpec(sampler=toy_sampler, num_steps=7, eta=0.5)
    x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
    run = jax.jit(lambda state, start, stop: samplers.sample_steps(
        _toy_model_fn, schedule, state, jax.random.key(1), start, stop, spec))
    state = samplers.init_state(x_T, spec)
    np.testing.assert_array_equal(state.extra, [0, 0, 0, 0])
    for start, stop in ((0, 3), (3, 7)):
        state = run(state, start, stop)
    np.testing.assert_array_equal(state.extra, [7, 7, 7, 7])
    ddim = samplers.sample_steps(_toy_model_fn, schedule, samplers.init_state(x_T),
                                 jax.random.key(1), 0, 7, spec, sampler="ddim")
    np.testing.assert_allclose(state.x, ddim.x, atol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
        samplers.register(toy_sampler)(_toy_step)


def _toy_model_fn(x, t):
    return jnp.tanh(x) + 0.01 * t.astype(jnp.float32).reshape(-1, 1, 1, 1)
