"""Forward process, posterior and p_θ parameters against independent float64 computations."""

import chex
import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian, schedules

T = 1000
SHAPE = (6, 2, 2, 3)  # [B, H, W, C]
T_VALUES = np.array([0, 1, 7, 250, 998, 999], np.int32)  # [B], ends included


@pytest.fixture(scope="module")
def schedule():
    return schedules.schedule_from_name("linear", T)


@pytest.fixture(scope="module")
def betas():
    return schedules.get_betas("linear", T)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    return x0, noise


def _bcast(per_t):
    return np.asarray(per_t)[T_VALUES].reshape(-1, 1, 1, 1)


def test_q_sample_has_the_distribution_of_the_iterated_forward_process(schedule, betas):
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε versus N samples of x_t = √(1-β_t) x_{t-1} + √β_t ε_t.

    Both are Gaussian, so equal means and variances mean equal distributions. The difference of
    two independent sample means has standard error √(v₁/N + v₂/N); a sample variance has
    standard error ≈ v √(2/(N-1)). We allow 5 standard errors per statistic (two-sided p ≈ 6e-7,
    over 24 statistics < 2e-5 chance of a false failure with a fixed seed anyway).
    """
    n = 10_000
    x0 = np.array([-1.0, 0.0, 0.5, 1.0])  # [D]
    check_t = (0, 99, 999)
    rng = np.random.default_rng(1)
    x = np.broadcast_to(x0, (n, 4)).copy()
    iterated = {}
    for t in range(T):
        x = np.sqrt(1 - betas[t]) * x + np.sqrt(betas[t]) * rng.standard_normal(x.shape)
        if t in check_t:
            iterated[t] = x.copy()

    sample = jax.jit(gaussian.q_sample)
    for i, t in enumerate(check_t):
        noise = jax.random.normal(jax.random.key(i), (n, 4))
        x0_batch = jnp.broadcast_to(jnp.asarray(x0, jnp.float32), (n, 4))
        closed = np.asarray(sample(schedule, x0_batch, jnp.full((n,), t, jnp.int32), noise))
        it = iterated[t]
        var_it, var_cf = it.var(0, ddof=1), closed.var(0, ddof=1)
        mean_se = np.sqrt((var_it + var_cf) / n)
        np.testing.assert_array_less(np.abs(it.mean(0) - closed.mean(0)), 5 * mean_se)
        var_se = np.sqrt(2 / (n - 1)) * np.sqrt(var_it**2 + var_cf**2)
        np.testing.assert_array_less(np.abs(var_it - var_cf), 5 * var_se)
        # ... and the variance really is 1 - ᾱ_t (catches std β_t instead of √β_t).
        expected_var = 1 - np.prod(1 - betas[: t + 1])
        np.testing.assert_array_less(
            np.abs(var_cf - expected_var), 5 * np.sqrt(2 / (n - 1)) * expected_var
        )


def test_q_mean_variance_closed_form(schedule, betas):
    x0, _ = _data()
    ab = _bcast(np.cumprod(1 - betas))
    mean, var, log_var = gaussian.q_mean_variance(schedule, jnp.asarray(x0), jnp.asarray(T_VALUES))
    np.testing.assert_allclose(mean, np.sqrt(ab) * x0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, np.broadcast_to(1 - ab, SHAPE), rtol=1e-5)
    np.testing.assert_allclose(log_var, np.broadcast_to(np.log(1 - ab), SHAPE), rtol=1e-5)


def test_posterior_is_bayes_rule_for_gaussians(schedule, betas):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; √α_t x_{t-1}, β_t) N(x_{t-1}; √ᾱ_{t-1} x_0, 1-ᾱ_{t-1}):
    precision-weighted combination of the prior and the (x_{t-1}-)likelihood, in float64."""
    x0, noise = _data()
    x_t = np.asarray(gaussian.q_sample(schedule, x0, jnp.asarray(T_VALUES), noise))
    alphas = 1 - betas
    ab_prev = np.concatenate([[1.0], np.cumprod(alphas)[:-1]])
    mean_expected = np.empty(SHAPE)
    var_expected = np.empty(SHAPE[0])
    for i, t in enumerate(T_VALUES):
        if t == 0:  # the prior q(x_{-1}|x_0) is a point mass at x_0
            mean_expected[i], var_expected[i] = x0[i], 0.0
            continue
        prior_prec, prior_mean = 1 / (1 - ab_prev[t]), np.sqrt(ab_prev[t]) * x0[i]
        lik_prec, lik_mean = alphas[t] / betas[t], x_t[i] / np.sqrt(alphas[t])
        var_expected[i] = 1 / (prior_prec + lik_prec)
        mean_expected[i] = var_expected[i] * (prior_prec * prior_mean + lik_prec * lik_mean)
    mean, var, log_var = gaussian.q_posterior_mean_variance(
        schedule, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(T_VALUES)
    )
    np.testing.assert_allclose(mean, mean_expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0, 0, 0], var_expected, rtol=1e-5, atol=0)
    var_clipped = np.where(T_VALUES == 0, var_expected[T_VALUES == 1][0], var_expected)
    np.testing.assert_allclose(log_var[:, 0, 0, 0], np.log(var_clipped), rtol=1e-5)
    assert var.shape == log_var.shape == SHAPE


def test_parameterization_conversions_invert_each_other(schedule, betas):
    x0, eps = _data()
    ab = _bcast(np.cumprod(1 - betas))
    x_t64 = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    v64 = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
    t = jnp.asarray(T_VALUES)
    x_t = jnp.asarray(x_t64, jnp.float32)
    v = gaussian.get_v(schedule, jnp.asarray(x0), jnp.asarray(eps), t)
    np.testing.assert_allclose(v, v64, atol=2e-6)
    np.testing.assert_allclose(gaussian.q_sample(schedule, x0, t, eps), x_t64, atol=2e-6)
    # x_0 from ε divides by √ᾱ (≈ 0.0064 at t = 999): float32 error of x_t grows by 1/√ᾱ.
    atol_x0 = 1e-5 / np.sqrt(ab)
    assert np.all(np.abs(gaussian.predict_x0_from_eps(schedule, x_t, t, eps) - x0) < atol_x0)
    # ε from x_0 divides by √(1-ᾱ) (≈ 0.01 at t = 0).
    atol_eps = 1e-5 / np.sqrt(1 - ab)
    assert np.all(np.abs(gaussian.predict_eps_from_x0(schedule, x_t, t, x0) - eps) < atol_eps)
    np.testing.assert_allclose(gaussian.predict_x0_from_v(schedule, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(gaussian.predict_eps_from_v(schedule, x_t, t, v), eps, atol=1e-5)


@pytest.mark.parametrize("prediction", gaussian.PREDICTIONS)
def test_p_mean_variance_with_the_true_target_recovers_the_posterior(schedule, prediction):
    x0, eps = _data()
    t = jnp.asarray(T_VALUES)
    x_t = gaussian.q_sample(schedule, jnp.asarray(x0), t, jnp.asarray(eps))
    target = {"eps": eps, "x0": x0, "v": gaussian.get_v(schedule, x0, eps, t)}[prediction]
    out = gaussian.p_mean_variance(
        schedule,
        jnp.asarray(target),
        x_t,
        t,
        prediction=prediction,
        var_type="fixed_small",
        clip_x0=False,
    )
    mean, _, _ = gaussian.q_posterior_mean_variance(schedule, jnp.asarray(x0), x_t, t)
    np.testing.assert_allclose(out.pred_x0, x0, atol=2e-3)  # float32 / √ᾱ at t = 999
    np.testing.assert_allclose(out.pred_eps, eps, atol=2e-3)  # float32 / √(1-ᾱ) at t = 0
    np.testing.assert_allclose(out.mean, mean, atol=1e-4)


def test_p_mean_variance_variances(schedule, betas):
    """fixed_small: β̃_t (log clipped at t = 0); fixed_large: β_t with β_0 := β̃_1;
    learned_range: log σ² = f log β_t + (1-f) log β̃_t^clip, f = (v+1)/2."""
    _, _, post_var = oracle.posterior_coefs(betas)
    clipped_log = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    large = np.concatenate([[post_var[1]], betas[1:]])
    x_t = jnp.zeros(SHAPE)
    t = jnp.asarray(T_VALUES)
    kwargs = dict(prediction="eps", clip_x0=False)

    small = gaussian.p_mean_variance(schedule, x_t, x_t, t, var_type="fixed_small", **kwargs)
    np.testing.assert_allclose(small.variance[:, 0, 0, 0], post_var[T_VALUES], rtol=1e-5)
    np.testing.assert_allclose(small.log_variance[:, 0, 0, 0], clipped_log[T_VALUES], rtol=1e-5)
    big = gaussian.p_mean_variance(schedule, x_t, x_t, t, var_type="fixed_large", **kwargs)
    np.testing.assert_allclose(big.variance[:, 0, 0, 0], large[T_VALUES], rtol=1e-5)
    np.testing.assert_allclose(big.log_variance[:, 0, 0, 0], np.log(large[T_VALUES]), rtol=1e-5)

    for v, frac in [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.75)]:
        output = jnp.concatenate([x_t, jnp.full(SHAPE, v)], axis=-1)
        learned = gaussian.p_mean_variance(
            schedule, output, x_t, t, var_type="learned_range", **kwargs
        )
        expected = frac * np.log(betas) + (1 - frac) * clipped_log
        np.testing.assert_allclose(learned.log_variance[:, 0, 0, 0], expected[T_VALUES], rtol=1e-5)
        np.testing.assert_allclose(learned.variance, np.exp(learned.log_variance), rtol=1e-6)
        assert learned.mean.shape == SHAPE and learned.variance.shape == SHAPE


def test_clip_x0_clips_and_keeps_eps_consistent(schedule):
    t = jnp.asarray(T_VALUES)
    x_t = jnp.asarray(_data(1)[1])
    out = gaussian.p_mean_variance(
        schedule, 3.0 * x_t, x_t, t, prediction="x0", var_type="fixed_large", clip_x0=True
    )
    np.testing.assert_allclose(out.pred_x0, np.clip(3.0 * np.asarray(x_t), -1, 1))
    # x_t = √ᾱ x̂_0 + √(1-ᾱ) ε̂ still holds after clipping.
    rebuilt = gaussian.q_sample(schedule, out.pred_x0, t, out.pred_eps)
    np.testing.assert_allclose(rebuilt, x_t, atol=1e-4)


def test_bad_options_raise_with_legal_values(schedule):
    x = jnp.zeros(SHAPE)
    t = jnp.asarray(T_VALUES)
    with pytest.raises(ValueError, match=r"unknown prediction 'epsilon'.*\('eps', 'x0', 'v'\)"):
        gaussian.p_mean_variance(
            schedule, x, x, t, prediction="epsilon", var_type="fixed_small", clip_x0=False
        )
    with pytest.raises(ValueError, match=r"unknown var_type 'learned'.*'learned_range'"):
        gaussian.p_mean_variance(schedule, x, x, t, prediction="eps", var_type="learned", clip_x0=0)
    with pytest.raises(ValueError, match="needs model_output with 6 channels"):
        gaussian.p_mean_variance(
            schedule, x, x, t, prediction="eps", var_type="learned_range", clip_x0=False
        )


# Each case: (fn(schedule, x, t) -> outputs, dtype kind per output: "x" = input dtype, "f32").
def _case_q_sample(s, x, t):
    return gaussian.q_sample(s, x, t, x)


def _case_q_mean_variance(s, x, t):
    return gaussian.q_mean_variance(s, x, t)


def _case_q_posterior(s, x, t):
    return gaussian.q_posterior_mean_variance(s, x, x, t)


def _case_conversions(s, x, t):
    return (
        gaussian.predict_x0_from_eps(s, x, t, x),
        gaussian.predict_eps_from_x0(s, x, t, x),
        gaussian.predict_x0_from_v(s, x, t, x),
        gaussian.predict_eps_from_v(s, x, t, x),
        gaussian.get_v(s, x, x, t),
        gaussian.extract(s.betas, t, x.shape),
    )


def _case_p_mean_variance_learned(s, x, t):
    out = jnp.concatenate([x, x * 0.5], axis=-1)
    return tuple(
        gaussian.p_mean_variance(s, out, x, t, prediction="v", var_type="learned_range", clip_x0=1)
    )


def _case_p_mean_variance_large(s, x, t):
    return tuple(
        gaussian.p_mean_variance(s, x, x, t, prediction="eps", var_type="fixed_large", clip_x0=0)
    )


CASES = {
    "q_sample": (_case_q_sample, ("x",)),
    "q_mean_variance": (_case_q_mean_variance, ("x", "f32", "f32")),
    "q_posterior_mean_variance": (_case_q_posterior, ("x", "f32", "f32")),
    "conversions": (_case_conversions, ("x", "x", "x", "x", "x", "f32")),
    "p_mean_variance_learned": (_case_p_mean_variance_learned, ("x", "f32", "f32", "x", "x")),
    "p_mean_variance_large": (_case_p_mean_variance_large, ("x", "f32", "f32", "x", "x")),
}


@pytest.mark.parametrize("name", CASES)
def test_jit_traces_once_per_dtype_and_accepts_bfloat16(schedule, name):
    fn, kinds = CASES[name]
    chex.clear_trace_counter()
    # Two dtypes -> two traces; any retrace on a new t value would exceed 2.
    jitted = jax.jit(chex.assert_max_traces(fn, n=2))
    x = jnp.asarray(_data()[0])
    for dtype in (jnp.float32, jnp.bfloat16):
        for t in (T_VALUES, T_VALUES[::-1], np.full(SHAPE[0], 500, np.int32)):
            outputs = jitted(schedule, x.astype(dtype), jnp.asarray(t))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            for out, kind in zip(outputs, kinds, strict=True):
                assert out.dtype == (dtype if kind == "x" else jnp.float32), (name, kind)
                assert np.all(np.isfinite(np.asarray(out, np.float32))), name
