"""Tests of the noise-aware classifier p_phi(y | x_t, t) and its guidance gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import NoisyClassifier, UNet, classifier_log_prob_grad

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=4)
K = 5


def _perturb(params: dict, seed: int = 0, scale: float = 0.05) -> dict:
    """Add N(0, scale^2) noise to every parameter: the head is zero-initialised (logits 0 and
    a vanishing input gradient at init), so tests of the gradient need non-trivial weights."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


@pytest.fixture(scope="module")
def setup():
    model = NoisyClassifier(num_classes=K, dropout=0.1, **TINY)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 16, 16, 3), np.float32))
    t = jnp.asarray([0, 400, 999])
    y = jnp.asarray([0, 3, 4])
    key = jax.random.key(0, impl="rbg")  # compiles faster than threefry; init doesn't care
    init_params = jax.jit(lambda: model.init(key, x, t, train=False))()["params"]
    logits_fn = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    grad_fn = jax.jit(lambda p, x, t, y: classifier_log_prob_grad(model.apply, p, x, t, y))
    return dict(
        model=model,
        init_params=init_params,
        params=_perturb(init_params),
        x=x,
        t=t,
        y=y,
        logits=logits_fn,
        grad=grad_fn,
    )


def test_logits_shape_and_uniform_at_init(setup):
    s = setup
    logits = s["logits"](s["init_params"], s["x"], s["t"])
    assert logits.shape == (3, K) and logits.dtype == jnp.float32
    # Zero-initialised head (guided-diffusion's zero_module): p(y | x_t, t) starts uniform.
    np.testing.assert_allclose(jax.nn.log_softmax(logits), -math.log(K), atol=1e-5)
    perturbed = s["logits"](s["params"], s["x"], s["t"])
    assert float(jnp.std(perturbed)) > 1e-2
    # The classifier is timestep-aware: the same images at other t give other logits.
    assert float(jnp.max(jnp.abs(s["logits"](s["params"], s["x"], s["t"] + 50) - perturbed))) > 1e-4


@pytest.mark.parametrize(
    "shape, ch_mult", [((2, 28, 28, 1), (1, 2, 2)), ((2, 32, 32, 3), (1, 2, 2, 2))]
)
def test_logits_shape_other_sizes(shape, ch_mult):
    model = NoisyClassifier(num_classes=10, **dict(TINY, ch_mult=ch_mult))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    out = jax.eval_shape(
        lambda x, t: model.init_with_output(jax.random.key(0), x, t, train=False), x, t
    )
    assert out[0].shape == (2, 10) and out[0].dtype == jnp.float32


def test_encoder_is_the_unets_downsampling_half():
    """Every classifier parameter outside the head (norm_out, head) has the same name and shape
    in the UNet: the encoder is the UNet's down path + middle block (and can be warm-started)."""
    x, t = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
    clf = jax.eval_shape(
        lambda: NoisyClassifier(num_classes=K, **TINY).init(jax.random.key(0), x, t, train=False)
    )["params"]
    unet = jax.eval_shape(lambda: UNet(**TINY).init(jax.random.key(0), x, t, train=False))["params"]
    assert clf["head"]["kernel"].shape == (2 * TINY["ch"], K)
    assert clf["norm_out"]["scale"].shape == (2 * TINY["ch"],)  # the UNet's is after the up path
    for name, sub in clf.items():
        if name in ("head", "norm_out"):
            continue
        assert jax.tree.map(lambda a: a.shape, sub) == jax.tree.map(lambda a: a.shape, unet[name])
    assert not any(name.startswith("up_") for name in clf)


def test_log_prob_grad_finite_nonzero_and_correct(setup):
    s = setup
    p, x, t, y = s["params"], s["x"], s["t"], s["y"]
    g = s["grad"](p, x, t, y)
    assert g.shape == x.shape and g.dtype == x.dtype
    assert bool(jnp.all(jnp.isfinite(g)))
    per_sample_norm = jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3)))
    assert bool(jnp.all(per_sample_norm > 1e-6)), per_sample_norm

    def log_prob(x):  # [B] float64 on the host, for an independent finite-difference check
        logits = np.asarray(s["logits"](p, x, t), np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return log_probs[np.arange(len(y)), np.asarray(y)]

    # Directional derivative along a random direction matches the central difference.
    d = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape, np.float32))
    eps = 1e-2
    fd = (log_prob(x + eps * d) - log_prob(x - eps * d)) / (2 * eps)  # [B]
    analytic = np.asarray(jnp.sum(g * d, axis=(1, 2, 3)), np.float64)
    np.testing.assert_allclose(analytic, fd, rtol=5e-2, atol=1e-4)
    # Per-sample: a step along the gradient raises every sample's log p(y | x_t, t).
    step = 1e-2 / per_sample_norm[:, None, None, None]
    assert np.all(log_prob(x + step * g) > log_prob(x))
    # The gradient is for the requested class, not another one.
    g_other = s["grad"](p, x, t, (y + 1) % K)
    assert float(jnp.max(jnp.abs(g_other - g))) > 1e-6


def test_dropout_only_in_train(setup):
    s = setup
    model, p, x, t = s["model"], s["params"], s["x"], s["t"]

    @jax.jit
    def apply(p, rng):
        train = model.apply({"params": p}, x, t, train=True, rngs={"dropout": rng})
        evaluation = model.apply({"params": p}, x, t, train=False, rngs={"dropout": rng})
        return train, evaluation

    train_a, eval_a = apply(p, jax.random.key(1))
    train_b, eval_b = apply(p, jax.random.key(2))
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-4
    np.testing.assert_array_equal(eval_a, eval_b)
