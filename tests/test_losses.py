"""Losses and the variational bound: closed forms, quadrature, and the Gaussian-data oracle."""

import math

import chex
import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special

from diffusion import gaussian, losses, schedules

T = 1000
SHAPE = (6, 2, 2, 3)  # [B, H, W, C]
T_VALUES = np.array([0, 1, 7, 250, 998, 999], np.int32)
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def schedule():
    return schedules.schedule_from_name("linear", T)


@pytest.fixture(scope="module")
def betas():
    return schedules.get_betas("linear", T)


def _batch(seed=0, channels=3):
    rng = np.random.default_rng(seed)
    shape = SHAPE[:-1] + (channels,)
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    out = rng.standard_normal(shape).astype(np.float32)
    return x0, noise, out


@pytest.mark.parametrize(
    "m1, v1, m2, v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.2, -0.5, 2.0), (1, 3, 0, 0.5)]
)
def test_normal_kl_equals_numerical_integration(m1, v1, m2, v2):
    p = lambda x: math.exp(-((x - m1) ** 2) / (2 * v1)) / math.sqrt(2 * math.pi * v1)
    log_ratio = lambda x: (
        -((x - m1) ** 2) / (2 * v1) + (x - m2) ** 2 / (2 * v2) + 0.5 * math.log(v2 / v1)
    )
    expected, _ = scipy.integrate.quad(lambda x: p(x) * log_ratio(x), -40, 40, limit=200)
    kl = losses.normal_kl(m1, math.log(v1), m2, math.log(v2))
    np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-7)


def test_approx_cdf_is_within_2e4_of_the_exact_normal_cdf():
    x = np.linspace(-8, 8, 10001)
    approx = np.asarray(losses.approx_standard_normal_cdf(jnp.asarray(x, jnp.float32)))
    assert np.max(np.abs(approx - scipy.special.ndtr(x))) < 2e-4


@pytest.mark.parametrize("mean, scale", [(0.0, 0.1), (0.9, 0.01), (-0.5, 2.0), (0.3, 1e-3)])
def test_discretized_likelihood_is_a_distribution_over_the_256_values(mean, scale):
    """Bin edges x ± 1/255 tile [-1, 1] and the edge bins extend to ±∞, so Σ_k P(x_k) = 1."""
    x = jnp.linspace(-1.0, 1.0, 256)
    log_p = losses.discretized_gaussian_log_likelihood(
        x, jnp.full_like(x, mean), jnp.full_like(x, math.log(scale))
    )
    np.testing.assert_allclose(np.sum(np.exp(np.asarray(log_p, np.float64))), 1.0, atol=1e-4)


def test_discretized_likelihood_matches_exact_bin_probabilities():
    """Against log P with the exact Φ (scipy): |ΔP| <= 2 · 1.8e-4 (the approximation error of Φ
    at each edge), so |Δ log P| <= 3.6e-4 / P; checked on bins with P > 0.01."""
    x = np.linspace(-1.0, 1.0, 256)
    for mean, scale in [(0.0, 0.01), (0.95, 0.02), (-1.0, 0.005)]:
        lo = np.where(x < -0.999, -np.inf, (x - 1 / 255 - mean) / scale)
        hi = np.where(x > 0.999, np.inf, (x + 1 / 255 - mean) / scale)
        p_exact = scipy.special.ndtr(hi) - scipy.special.ndtr(lo)
        log_p = np.asarray(
            losses.discretized_gaussian_log_likelihood(
                jnp.asarray(x, jnp.float32), jnp.full(256, mean), jnp.full(256, math.log(scale))
            ),
            np.float64,
        )
        big = p_exact > 0.01
        assert big.sum() >= 2
        assert np.all(np.abs(log_p[big] - np.log(p_exact[big])) <= 3.6e-4 / p_exact[big] + 1e-5)


def test_snr_and_prior_bpd_closed_forms(schedule, betas):
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(
        losses.snr(schedule, jnp.asarray(T_VALUES)), (ab / (1 - ab))[T_VALUES], rtol=1e-5
    )
    x0, _, _ = _batch()
    # A short chain so that L_T is far from zero, and the real one (L_T ≈ 2e-5 bits/dim).
    short = np.linspace(1e-4, 0.02, 100)
    for b, atol in [(short, 0.0), (betas, 1e-6)]:
        ab_last = np.prod(1 - b)
        kl = 0.5 * (-np.log1p(-ab_last) + (1 - ab_last) + ab_last * x0.astype(np.float64) ** 2 - 1)
        expected = kl.reshape(SHAPE[0], -1).mean(1) / LOG2
        np.testing.assert_allclose(
            losses.prior_bpd(schedules.make_schedule(b), x0), expected, rtol=1e-5, atol=atol
        )


@pytest.mark.parametrize("var_type", gaussian.VAR_TYPES)
def test_vlb_terms_against_numpy(schedule, betas, var_type):
    """KL between the Bayes posterior and p_θ for t > 0; discretized decoder NLL at t = 0."""
    x0, noise, out = _batch()
    x0 = np.round((x0 + 1) * 127.5) / 127.5 - 1  # 8-bit data for the decoder
    t = T_VALUES
    ab = np.cumprod(1 - betas)[t].reshape(-1, 1, 1, 1)
    x_t = (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise).astype(np.float32)
    c1, c2, post_var = oracle.posterior_coefs(betas)
    c1, c2 = c1[t].reshape(-1, 1, 1, 1), c2[t].reshape(-1, 1, 1, 1)
    clipped_log = np.log(np.concatenate([[post_var[1]], post_var[1:]]))[t].reshape(-1, 1, 1, 1)
    model_output = out
    if var_type == "fixed_small":
        log_var = clipped_log
    elif var_type == "fixed_large":
        log_var = np.log(np.concatenate([[post_var[1]], betas[1:]]))[t].reshape(-1, 1, 1, 1)
    else:
        frac_v = np.tanh(out)  # any value in [-1, 1]
        model_output = np.concatenate([out, frac_v], -1).astype(np.float32)
        frac = (frac_v + 1) / 2
        log_var = frac * np.log(betas[t]).reshape(-1, 1, 1, 1) + (1 - frac) * clipped_log
    x0_hat = (x_t - np.sqrt(1 - ab) * out) / np.sqrt(ab)
    mean_p = c1 * x0_hat + c2 * x_t
    mean_q = c1 * x0 + c2 * x_t
    kl = 0.5 * (-1 + log_var - clipped_log + np.exp(clipped_log - log_var))
    kl = kl + 0.5 * (mean_q - mean_p) ** 2 * np.exp(-log_var)
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    inv_std = np.exp(-0.5 * log_var)
    prob = cdf(inv_std * (x0 - mean_p + 1 / 255)) - cdf(inv_std * (x0 - mean_p - 1 / 255))
    prob = np.where(x0 > 0.999, 1 - cdf(inv_std * (x0 - mean_p - 1 / 255)), prob)
    prob = np.where(x0 < -0.999, cdf(inv_std * (x0 - mean_p + 1 / 255)), prob)
    nll = -np.log(np.maximum(prob, 1e-12))
    expected = np.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / LOG2
    actual = losses.vlb_terms(
        schedule,
        jnp.asarray(model_output),
        jnp.asarray(x0),
        jnp.asarray(x_t),
        jnp.asarray(t),
        prediction="eps",
        var_type=var_type,
    )
    np.testing.assert_allclose(actual, expected, rtol=2e-4)


@pytest.mark.parametrize("var_type", gaussian.VAR_TYPES)
def test_bound_with_the_gaussian_oracle_equals_entropy_plus_kl_gap(schedule, betas, var_type):
    """Data x_0 ~ N(μ, s²) per dim, model = the exact ε-oracle, all T terms of the bound.

    The data are continuous, so L_0 uses the continuous Gaussian decoder
    -log N(x_0; μ_θ(x_0-index), σ_0²) built from p_mean_variance at t = 0 (vlb_terms' decoder is
    the 8-bit discretized one, checked above): the bound then bounds the differential entropy
    H = ½ log₂(2πe s²). Because q is Gaussian, the bound's expectation is known exactly (chain
    rule for KL over the reverse factorisation q(x_{0:T}) = q(x_T) Π_t q(x_{t-1} | x_t)):

        E[L] = H + KL(q(x_{T-1}) ‖ N(0, 1)) + Σ_t KL(N(m, v_t) ‖ N(m, σ_t²)),

    with v_t the true reverse variance (the means agree because the ε-oracle is exact). The
    last sum is 0 for learned_range fed the optimal v_t (the bound is tight up to the ~1e-5
    bits prior mismatch) and positive for the fixed variances (≈ 0.17 bits/dim fixed_large,
    ≈ 0.82 fixed_small): E[L] >= H always.

    Expectation without sampling error: with the oracle every term is a quadratic polynomial in
    the two standard normals u = (x_0 - μ)/s and ε (x_t = √ᾱ x_0 + √(1-ᾱ) ε is linear, so are
    μ̃, μ_θ and the decoder mean), and the 3-point Gauss-Hermite rule (nodes 0, ±√3, weights
    2/3, 1/6) is exact up to degree 5. So we evaluate vlb_terms / p_mean_variance / prior_bpd on
    the 3 × 3 node grid for every t and take the weighted sum. Tolerance: 1e-4 bits/dim, for
    float32 rounding accumulated over 1000 KL terms (observed ≈ 5e-6; the gaps are 0.17 and 0.82).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)
    weights = weights / weights.sum()
    u, eps = (a.ravel() for a in np.meshgrid(nodes, nodes, indexing="ij"))  # [9]
    w = np.outer(weights, weights).ravel()  # [9]
    ab = np.cumprod(1 - betas)
    optimal_var = oracle.optimal_reverse_variance(betas)
    values = (
        oracle.learned_range_values(betas, optimal_var) if var_type == "learned_range" else None
    )
    model_fn = oracle.make_eps_model(ab, variance_values=values)

    @jax.jit
    def bound_terms(x0, noise):  # x0, noise [9, 1] -> per-node terms
        t = jnp.repeat(jnp.arange(T, dtype=jnp.int32), 9)  # [9 T], node index fastest
        x0_rep, noise_rep = jnp.tile(x0, (T, 1)), jnp.tile(noise, (T, 1))  # [9 T, 1]
        x_t = gaussian.q_sample(schedule, x0_rep, t, noise_rep)
        output = model_fn(x_t, t)
        terms = losses.vlb_terms(
            schedule, output, x0_rep, x_t, t, prediction="eps", var_type=var_type
        )
        p = gaussian.p_mean_variance(
            schedule, output, x_t, t, prediction="eps", var_type=var_type, clip_x0=False
        )
        log_var = p.log_variance  # (for fixed_small p.variance is β̃_0 = 0 at t = 0)
        decoder_nll = 0.5 * (
            jnp.log(2 * jnp.pi) + log_var + (x0_rep - p.mean) ** 2 / jnp.exp(log_var)
        )
        decoder_bpd = decoder_nll[:9, 0] / LOG2  # rows with t = 0
        return terms.reshape(T, 9)[1:], decoder_bpd, losses.prior_bpd(schedule, x0)

    x0 = (oracle.MU + math.sqrt(oracle.S2) * u)[:, None].astype(np.float32)
    kl_terms, decoder_bpd, prior = jax.device_get(bound_terms(x0, eps[:, None].astype(np.float32)))
    bound = w @ (kl_terms.astype(np.float64).sum(0) + decoder_bpd + prior)

    _, _, post_var = oracle.posterior_coefs(betas)
    sigma2 = {
        "learned_range": optimal_var,
        "fixed_large": np.concatenate([[post_var[1]], betas[1:]]),
        "fixed_small": np.concatenate([[post_var[1]], post_var[1:]]),
    }[var_type]
    gap = sum(oracle.gaussian_kl(0, v, 0, s) for v, s in zip(optimal_var, sigma2, strict=True))
    prior_kl = oracle.gaussian_kl(
        math.sqrt(ab[-1]) * oracle.MU, ab[-1] * oracle.S2 + 1 - ab[-1], 0, 1
    )
    entropy = oracle.gaussian_entropy_bits()
    np.testing.assert_allclose(bound, entropy + (prior_kl + gap) / LOG2, atol=1e-4)
    if var_type == "learned_range":
        assert gap < 1e-9 and abs(bound - entropy) < 1e-4  # tight
    else:
        assert gap / LOG2 > 0.15 and bound > entropy + 0.15  # a strict upper bound


def _noised(schedule, seed=0):
    x0, noise, out = _batch(seed)
    t = jnp.asarray(T_VALUES)
    return x0, noise, out, t, gaussian.q_sample(schedule, x0, t, noise)


def _sqrt_ab(betas):
    ab = np.cumprod(1 - betas)[T_VALUES].reshape(-1, 1, 1, 1)
    return np.sqrt(ab), np.sqrt(1 - ab)


@pytest.mark.parametrize("prediction", gaussian.PREDICTIONS)
def test_simple_loss_is_the_mse_on_the_parameterization_target(schedule, betas, prediction):
    x0, noise, out, t, x_t = _noised(schedule)
    a, b = _sqrt_ab(betas)
    target = {"eps": noise, "x0": x0, "v": a * noise - b * x0}[prediction]
    expected = ((target - out) ** 2).mean((1, 2, 3))
    terms = losses.training_losses(
        schedule, out, x0, x_t, t, noise, prediction=prediction, var_type="fixed_large"
    )
    assert set(terms) == {"loss", "mse"}
    np.testing.assert_allclose(terms["mse"], expected, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-5)


def test_min_snr_gives_the_same_loss_for_the_same_x0_error_in_every_parameterization(
    schedule, betas
):
    """Min-SNR-γ is min(SNR_t, γ) ‖x̂_0 - x_0‖²; express one x̂_0 as ε̂, x̂_0 and v̂ outputs."""
    x0, noise, _ = _batch()
    x0_hat = x0 + 0.1 * np.random.default_rng(5).standard_normal(x0.shape)
    a, b = _sqrt_ab(betas)
    x_t = a * x0 + b * noise
    eps_hat = (x_t - a * x0_hat) / b
    outputs = {"eps": eps_hat, "x0": x0_hat, "v": a * eps_hat - b * x0_hat}
    snr = (a / b).ravel() ** 2
    expected = np.minimum(snr, 5.0) * ((x0_hat - x0) ** 2).mean((1, 2, 3))
    assert np.any(snr > 5.0) and np.any(snr < 5.0)  # both branches of the min
    for prediction, out in outputs.items():
        terms = losses.training_losses(
            schedule,
            jnp.asarray(out, jnp.float32),
            x0,
            jnp.asarray(x_t, jnp.float32),
            jnp.asarray(T_VALUES),
            noise,
            prediction=prediction,
            var_type="fixed_small",
            weighting="min_snr",
            min_snr_gamma=5.0,
        )
        np.testing.assert_allclose(terms["loss"], expected, rtol=1e-3, err_msg=prediction)


def test_hybrid_loss_adds_the_scaled_bound_and_trains_only_the_variance_with_it(schedule):
    x0, noise, out, t, x_t = _noised(schedule)
    output = jnp.concatenate([out, jnp.tanh(out[..., ::-1])], -1)  # [B, H, W, 2C]
    kwargs = dict(prediction="eps", var_type="learned_range")
    terms = losses.training_losses(
        schedule, output, x0, x_t, t, noise, loss_type="hybrid", **kwargs
    )
    vlb = losses.vlb_terms(schedule, output, x0, x_t, t, **kwargs)
    np.testing.assert_allclose(terms["vlb"], T * vlb, rtol=1e-6)
    np.testing.assert_allclose(terms["loss"], terms["mse"] + 0.001 * T * vlb, rtol=1e-6)

    def hybrid(o):
        return losses.training_losses(schedule, o, x0, x_t, t, noise, loss_type="hybrid", **kwargs)[
            "loss"
        ].sum()

    def mse(o):
        return losses.mean_flat((noise - o[..., :3]) ** 2).sum()

    def vlb_sum(o):
        return losses.vlb_terms(schedule, o, x0, x_t, t, **kwargs).sum()

    grads = jax.jit(lambda o: [jax.grad(f)(o) for f in (hybrid, mse, vlb_sum)])
    grad, grad_mse, grad_vlb = grads(output)
    np.testing.assert_allclose(grad[..., :3], grad_mse[..., :3], rtol=1e-6)  # stop_gradient
    np.testing.assert_allclose(grad[..., 3:], 0.001 * T * grad_vlb[..., 3:], rtol=1e-5, atol=1e-9)
    assert np.abs(grad[..., 3:]).max() > 0


def test_vlb_loss_is_t_times_the_bound_term_with_gradient_to_the_mean(schedule):
    x0, noise, out, t, x_t = _noised(schedule)
    kwargs = dict(prediction="x0", var_type="fixed_large")
    loss = lambda o: losses.training_losses(
        schedule, o, x0, x_t, t, noise, loss_type="vlb", **kwargs
    )["loss"]
    vlb = lambda o: T * losses.vlb_terms(schedule, o, x0, x_t, t, **kwargs)
    np.testing.assert_allclose(loss(out), vlb(out), rtol=1e-6)
    grad = jax.grad(lambda o: loss(o).sum())(out)
    np.testing.assert_allclose(grad, jax.grad(lambda o: vlb(o).sum())(out), rtol=1e-5, atol=1e-9)
    assert np.abs(grad).max() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="hybrid", var_type="fixed_large"), "needs var_type='learned_range'"),
        (dict(loss_type="simple", var_type="learned_range"), "needs loss_type 'hybrid' or 'vlb'"),
        (dict(loss_type="vlb", weighting="min_snr"), "loss_type='vlb' does not have"),
        (dict(loss_type="l1"), r"unknown loss_type 'l1'.*\('simple', 'hybrid', 'vlb'\)"),
        (dict(weighting="snr"), r"unknown weighting 'snr'.*\('none', 'min_snr'\)"),
        (dict(prediction="score"), r"unknown prediction 'score'"),
        (dict(loss_type="vlb", var_type="learned_range"), "needs model_output with 6 channels"),
    ],
)
def test_training_losses_rejects_bad_options(schedule, kwargs, message):
    x0, noise, out, t, x_t = _noised(schedule)
    kwargs = dict(dict(prediction="eps", var_type="fixed_large"), **kwargs)
    with pytest.raises(ValueError, match=message):
        losses.training_losses(schedule, out, x0, x_t, t, noise, **kwargs)


# Cases for the jit test: fn(schedule, x, t) -> tuple of float32 [B] / elementwise outputs.
def _case_training_hybrid(s, x, t):
    output = jnp.concatenate([x, jnp.tanh(x)], -1)
    terms = losses.training_losses(
        s, output, x, x, t, x, prediction="v", var_type="learned_range", loss_type="hybrid"
    )
    return terms["loss"], terms["mse"], terms["vlb"]


def _case_training_min_snr(s, x, t):
    terms = losses.training_losses(
        s, x, x, x, t, x, prediction="eps", var_type="fixed_small", weighting="min_snr"
    )
    return terms["loss"], terms["mse"]


def _case_vlb_prior_snr(s, x, t):
    vlb = losses.vlb_terms(s, x, jnp.clip(x, -1, 1), x, t, prediction="x0", var_type="fixed_large")
    return vlb, losses.prior_bpd(s, x), losses.snr(s, t)


def _case_elementwise(s, x, t):
    log_scale = jnp.log(gaussian.extract(s.betas, t, x.shape))
    return (
        losses.normal_kl(x, log_scale, 0.5 * x, 0.0),
        losses.discretized_gaussian_log_likelihood(jnp.clip(x, -1, 1), 0.9 * x, log_scale),
    )


@pytest.mark.parametrize(
    "fn", [_case_training_hybrid, _case_training_min_snr, _case_vlb_prior_snr, _case_elementwise]
)
def test_jit_traces_once_per_dtype_and_returns_float32(schedule, fn):
    chex.clear_trace_counter()
    # Two dtypes -> two traces; any retrace on a new t value would exceed 2.
    jitted = jax.jit(chex.assert_max_traces(fn, n=2))
    x = jnp.asarray(_batch()[0])
    for dtype in (jnp.float32, jnp.bfloat16):
        for t in (T_VALUES, T_VALUES[::-1], np.full(SHAPE[0], 500, np.int32)):
            for out in jitted(schedule, x.astype(dtype), jnp.asarray(t)):
                assert out.dtype == jnp.float32
                assert np.all(np.isfinite(out)), fn.__name__


@pytest.mark.parametrize("batch,num_timesteps", [(32, 1000), (7, 1000), (16, 16), (3, 50)])
def test_stratified_timesteps_put_one_t_in_each_stratum_and_are_uniform_marginally(
        batch, num_timesteps):
    keys = jax.random.split(jax.random.key(0), 4000)
    t = np.asarray(jax.vmap(lambda k: losses.sample_timesteps(
        k, batch, num_timesteps, "stratified"))(keys))                     # [4000, B]
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= num_timesteps - 1
    # one u per stratum [k/B, (k+1)/B), so the k-th smallest t = floor(T u) lies in
    # [floor(kT/B), ceil((k+1)T/B) - 1]
    k = np.arange(batch)
    low, high = np.floor(k * num_timesteps / batch), np.ceil((k + 1) * num_timesteps / batch) - 1
    t_sorted = np.sort(t, axis=1)
    assert np.all((low <= t_sorted) & (t_sorted <= high))
    if num_timesteps % batch == 0:  # strata of whole timesteps: exactly one t in each
        np.testing.assert_array_equal(t_sorted // (num_timesteps // batch),
                                      np.broadcast_to(k, t.shape))
    # marginally U{0..T-1}: every example's t over the keys has the uniform mean and variance
    mean, var = (num_timesteps - 1) / 2, (num_timesteps**2 - 1) / 12
    se = np.sqrt(var / len(keys))
    assert np.all(np.abs(t.mean(axis=0) - mean) < 5 * se), t.mean(axis=0)
    assert np.all(np.abs(t.var(axis=0) / var - 1) < 0.1)


def test_uniform_timesteps_are_the_independent_draws():
    key = jax.random.key(3)
    np.testing.assert_array_equal(losses.sample_timesteps(key, 32, 1000),
                                  jax.random.randint(key, (32,), 0, 1000))
    with pytest.raises(ValueError, match="t_sampling .sobol."):
        losses.sample_timesteps(key, 32, 1000, "sobol")
