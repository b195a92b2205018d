"""Schedules against independent float64 numpy formulas; validation; respacing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import schedules

T = 1000


def reference_betas(name: str, num_timesteps: int) -> np.ndarray:
    """The published formulas, written out per timestep (scalar math, not vectorised)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        lo, hi = scale * 1e-4, scale * 0.02
        return np.array([lo + (hi - lo) * i / (num_timesteps - 1) for i in range(num_timesteps)])
    if name == "cosine":

        def alpha_bar(i):  # Nichol & Dhariwal eq. 17, normalised by f(0)
            f = lambda u: math.cos((u / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
            return f(i) / f(0)
    else:

        def alpha_bar(i):  # Chen 2023 sigmoid schedule, start -3, end 3, tau 1
            sig = lambda z: 1 / (1 + math.exp(-z))
            g = lambda u: (sig(3.0) - sig(6.0 * u / num_timesteps - 3.0)) / (sig(3.0) - sig(-3.0))
            return g(i) / g(0)

    return np.array([min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(num_timesteps)])


def reference_quantities(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every Schedule field, posterior terms via Bayes' rule (precision form), float64."""
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = np.zeros_like(betas)
    post_var[1:] = 1 / (1 / (1 - ab_prev[1:]) + alphas[1:] / betas[1:])
    coef1 = np.ones_like(betas)
    coef1[1:] = post_var[1:] * np.sqrt(ab_prev[1:]) / (1 - ab_prev[1:])
    coef2 = np.zeros_like(betas)
    coef2[1:] = post_var[1:] * np.sqrt(alphas[1:]) / betas[1:]
    log_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=ab,
        alphas_cumprod_prev=ab_prev,
        sqrt_alphas_cumprod=ab**0.5,
        sqrt_one_minus_alphas_cumprod=(1 - ab) ** 0.5,
        log_one_minus_alphas_cumprod=np.log1p(-ab),
        sqrt_recip_alphas_cumprod=ab**-0.5,
        sqrt_recipm1_alphas_cumprod=((1 - ab) / ab) ** 0.5,
        posterior_variance=post_var,
        posterior_log_variance_clipped=log_clipped,
        posterior_mean_coef1=coef1,
        posterior_mean_coef2=coef2,
    )


@pytest.mark.parametrize("num_timesteps", [T, 250])
@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_betas_match_published_formulas(name, num_timesteps):
    betas = schedules.get_betas(name, num_timesteps)
    assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
    np.testing.assert_allclose(betas, reference_betas(name, num_timesteps), rtol=1e-12)


def test_linear_endpoints_scale_with_num_timesteps():
    np.testing.assert_allclose(schedules.get_betas("linear", 1000)[[0, -1]], [1e-4, 0.02])
    np.testing.assert_allclose(schedules.get_betas("linear", 250)[[0, -1]], [4e-4, 0.08])


@pytest.mark.parametrize("name", ["cosine", "sigmoid"])
def test_alpha_bar_schedules_clip_beta_at_0999(name):
    betas = schedules.get_betas(name, T)
    # ᾱ(T) = 0 makes the unclipped last beta exactly 1; every other beta is below the clip.
    assert betas[-1] == 0.999
    assert np.all(betas[:-1] < 0.999)
    assert betas.max() <= 0.999


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_schedule_quantities_match_float64_reference(name):
    schedule = schedules.schedule_from_name(name, T)
    reference = reference_quantities(reference_betas(name, T))
    assert schedule.num_timesteps == T
    for field, expected in reference.items():
        actual = np.asarray(getattr(schedule, field))
        assert actual.dtype == np.float32, field
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0, err_msg=field)


def test_make_schedule_casts_down_after_float64_math():
    betas = schedules.get_betas("linear", T)
    # ᾱ accumulated in float32 drifts by ~1e-5 relative near t = T-1; cast-down is exact to 6e-8.
    exact = np.cumprod(1 - betas)
    schedule = schedules.make_schedule(betas, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), exact, rtol=1e-7)
    bf16 = schedules.make_schedule(betas, dtype=jnp.bfloat16)
    assert bf16.betas.dtype == jnp.bfloat16


def test_unknown_schedule_name_lists_legal_values():
    with pytest.raises(ValueError, match="'quadratic'") as info:
        schedules.get_betas("quadratic", T)
    for legal in schedules.SCHEDULES:
        assert legal in str(info.value)


@pytest.mark.parametrize(
    "betas, message",
    [
        ([0.1, 0.0, 0.2], r"0 < beta < 1; betas\[1\] = 0.0"),
        ([0.1, 1.0], r"betas\[1\] = 1.0"),
        ([-0.1, 0.2], r"betas\[0\] = -0.1"),
        ([0.1, float("nan")], r"betas\[1\] = nan"),
        ([[0.1, 0.2]], "1-D"),
        ([0.1], "at least 2 timesteps"),
        ([0.5, 1e-20, 0.5], "strictly decreasing; it is not at t = 1"),
    ],
)
def test_make_schedule_rejects_invalid_betas(betas, message):
    with pytest.raises(ValueError, match=message):
        schedules.make_schedule(np.array(betas))


def test_linear_schedule_with_too_few_steps_is_rejected():
    # β_end = 20 / T >= 1 for T <= 20.
    with pytest.raises(ValueError, match="num_timesteps must be > 20"):
        schedules.schedule_from_name("linear", 20)
    with pytest.raises(ValueError, match="integer >= 2"):
        schedules.get_betas("cosine", 1)


@pytest.mark.parametrize("num_timesteps, num_steps", [(1000, 50), (1000, 1000), (10, 3), (7, 2)])
def test_space_timesteps_is_even_sorted_and_keeps_both_ends(num_timesteps, num_steps):
    ts = schedules.space_timesteps(num_timesteps, num_steps)
    assert ts.shape == (num_steps,)
    assert ts[0] == 0 and ts[-1] == num_timesteps - 1
    assert np.all(np.diff(ts) > 0)
    # Evenly spaced: gaps differ by at most one.
    assert np.ptp(np.diff(ts)) <= 1
    if num_steps == num_timesteps:
        np.testing.assert_array_equal(ts, np.arange(num_timesteps))


@pytest.mark.parametrize("num_steps", [1, 0, 11])
def test_space_timesteps_rejects_bad_counts(num_steps):
    with pytest.raises(ValueError, match=r"num_steps must be in \[2, num_timesteps=10\]"):
        schedules.space_timesteps(10, num_steps)


def test_respaced_betas_keep_the_marginals():
    betas = schedules.get_betas("cosine", T)
    use = schedules.space_timesteps(T, 50)
    new_betas, timestep_map = schedules.respace_betas(betas, use)
    assert timestep_map.dtype == np.int32
    np.testing.assert_array_equal(timestep_map, use)
    # ᾱ of the sub-chain equals ᾱ of the original chain on the kept steps.
    np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[use], rtol=1e-10)
    # The identity respacing reproduces the original betas.
    same, _ = schedules.respace_betas(betas, np.arange(T))
    np.testing.assert_allclose(same, betas, rtol=1e-9)


def test_respace_betas_rejects_unsorted_timesteps():
    with pytest.raises(ValueError, match="strictly increasing"):
        schedules.respace_betas(schedules.get_betas("linear", 100), [0, 50, 20])
    with pytest.raises(ValueError, match="strictly increasing"):
        schedules.respace_betas(schedules.get_betas("linear", 100), [0, 100])


def test_respace_schedule_of_float32_schedule_matches_float64_respacing():
    betas = schedules.get_betas("linear", T)
    respaced, timestep_map = schedules.respace_schedule(schedules.make_schedule(betas), 25)
    expected, expected_map = schedules.respace_betas(betas, schedules.space_timesteps(T, 25))
    np.testing.assert_array_equal(timestep_map, expected_map)
    np.testing.assert_allclose(np.asarray(respaced.betas), expected, rtol=1e-5)
    assert respaced.num_timesteps == 25 and respaced.betas.dtype == jnp.float32


def test_respace_schedule_of_traced_schedule_says_how_to_fix():
    schedule = schedules.schedule_from_name("linear", 100)
    with pytest.raises(ValueError, match="Close over the schedule"):
        jax.jit(lambda s: schedules.respace_schedule(s, 10)[0].betas)(schedule)


def test_schedule_is_a_pytree_usable_under_jit():
    schedule = schedules.schedule_from_name("cosine", 100)
    leaves = jax.tree_util.tree_leaves(schedule)
    assert len(leaves) == 13 and all(leaf.shape == (100,) for leaf in leaves)
    total = jax.jit(lambda s: s.betas.sum() + s.num_timesteps)(schedule)
    np.testing.assert_allclose(total, np.sum(np.asarray(schedule.betas)) + 100, rtol=1e-6)


# diffusers' DDIMScheduler.set_timesteps (src/diffusers/schedulers/scheduling_ddim.py, commit
# 58eb52c of huggingface/diffusers, steps_offset = 0), listed descending there and here:
#   linspace: np.linspace(0, T - 1, K).round()[::-1]
#   leading:  (np.arange(0, K) * (T // K)).round()[::-1]
#   trailing: np.round(np.arange(T, 0, -T / K)) - 1
# Values worked out from those expressions. T = 1000, K = 10 is Lin et al. 2023 ("Common diffusion
# noise schedules and sample steps are flawed"), Table 2, 0-based. T = 10, K = 4 has exact ties
# (7.5 -> 8, 2.5 -> 2: round half to even); T = 50, K = 12 a tie that diffusers' float arange
# breaks upwards (50 - 9 · 50/12 comes out as 12.500000000000021 -> 13 -> 12, not 11); for T = 50,
# K = 29 diffusers' arange has 30 points, the last timestep -1, which space_timesteps drops.
DIFFUSERS_TIMESTEPS = {
    (1000, 10, "linspace"): [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    (1000, 10, "leading"): [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    (1000, 10, "trailing"): [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    (10, 4, "linspace"): [9, 6, 3, 0],
    (10, 4, "leading"): [6, 4, 2, 0],
    (10, 4, "trailing"): [9, 7, 4, 1],
    (50, 12, "trailing"): [49, 45, 41, 37, 32, 28, 24, 20, 16, 12, 7, 3],
    (50, 29, "trailing"): [49, 47, 46, 44, 42, 40, 39, 37, 35, 33, 32, 30, 28, 27, 25, 23, 21, 20,
                           18, 16, 15, 13, 11, 9, 8, 6, 4, 2, 1],
}


@pytest.mark.parametrize("key", list(DIFFUSERS_TIMESTEPS), ids=str)
def test_space_timesteps_matches_diffusers(key):
    num_timesteps, num_steps, spacing = key
    ts = schedules.space_timesteps(num_timesteps, num_steps, spacing)
    assert ts.dtype == np.int64
    assert ts[::-1].tolist() == DIFFUSERS_TIMESTEPS[key]


@pytest.mark.parametrize("num_timesteps", [7, 50, 100, 1000])
@pytest.mark.parametrize("spacing", schedules.T_SPACINGS)
def test_space_timesteps_properties_for_every_step_count(num_timesteps, spacing):
    """For every K in [2, T]: K distinct sorted timesteps in [0, T-1]; linspace keeps both ends,
    leading keeps 0 with stride ⌊T/K⌋, trailing keeps T-1 with gaps ⌊T/K⌋ or ⌈T/K⌉ and lowest
    round(T/K) - 1 (to within a tie); K = T gives every timestep."""
    T = num_timesteps
    for k in range(2, T + 1):
        ts = schedules.space_timesteps(T, k, spacing)
        assert ts.shape == (k,) and np.all(np.diff(ts) > 0) and 0 <= ts[0] and ts[-1] <= T - 1
        if spacing == "linspace":
            assert ts[0] == 0 and ts[-1] == T - 1
        elif spacing == "leading":
            assert ts[0] == 0 and np.all(np.diff(ts) == T // k)
        else:
            assert ts[-1] == T - 1 and abs(ts[0] + 1 - T / k) <= 0.5 + 1e-9
            assert set(np.diff(ts).tolist()) <= {T // k, -(-T // k)}
    np.testing.assert_array_equal(schedules.space_timesteps(T, T, spacing), np.arange(T))


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_respace_schedule_uses_the_named_spacing(spacing):
    betas = schedules.get_betas("cosine", 100)
    respaced, timestep_map = schedules.respace_schedule(schedules.make_schedule(betas), 10, spacing)
    use = (schedules.space_timesteps_logsnr(np.cumprod(1 - betas), 10) if spacing == "logsnr"
           else schedules.space_timesteps(100, 10, spacing))
    expected, expected_map = schedules.respace_betas(betas, use)
    np.testing.assert_array_equal(timestep_map, expected_map)
    np.testing.assert_allclose(np.asarray(respaced.betas), expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"unknown spacing 'uniform'.*'linspace'"):
        schedules.respace_schedule(schedules.make_schedule(betas), 10, "uniform")
