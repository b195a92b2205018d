"""Tests of the DDPM UNet (models/unet.py) and its layers (models/layers.py, models/blocks.py).

Anything that is compiled uses a tiny configuration; the 35.7M-parameter CIFAR-10 model is only
ever shape-evaluated (`jax.eval_shape`), never allocated.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import UNet
from models.blocks import AttnBlock, Downsample, ResBlock, Upsample
from models.layers import Conv3x3, GroupNorm, UpsampleConv3x3, get_timestep_embedding, swish

CIFAR = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(), num_groups=8)
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=4)
NUM_CLASSES, COND_DIM = 10, 8


def _init_shapes(model: UNet, shape: tuple[int, ...]) -> dict:
    """Parameter ShapeDtypeStructs of `model` for inputs of `shape`, without allocating."""
    x = jnp.zeros(shape, jnp.float32)
    t = jnp.zeros((shape[0],), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]


def _num_params(params: dict) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def _out_shape(model: UNet, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    params = _init_shapes(model, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct((shape[0],), jnp.int32)
    return jax.eval_shape(
        lambda p, x, t: model.apply({"params": p}, x, t, train=False), params, x, t
    )


def _perturb(params: dict, seed: int = 0, scale: float = 0.05) -> dict:
    """Add N(0, scale^2) noise to every parameter so the zero-initialised output convs (and hence
    the output's dependence on labels, cond and dropout) are non-trivial. numpy draws the noise:
    one eager jax.random call per leaf shape would compile ~80 tiny programs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


# ----------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "shape, cfg",
    [
        ((2, 16, 16, 3), TINY),
        ((2, 28, 28, 1), dict(TINY, ch_mult=(1, 2, 2))),  # 28 -> 14 -> 7
        ((2, 28, 28, 1), dict(TINY, ch_mult=(1, 2, 2, 2))),  # 28 -> 14 -> 7 -> 4, crop back to 7
        ((2, 16, 16, 3), dict(TINY, resamp_with_conv=False)),  # avg-pool / plain nearest
    ],
)
@pytest.mark.parametrize("out_mult", [1, 2])
def test_output_shape_tiny(shape, cfg, out_mult):
    out_ch = shape[-1] * out_mult
    out = _out_shape(UNet(out_ch=out_ch, **cfg), shape)
    assert out.shape == shape[:3] + (out_ch,)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("out_ch", [3, 6])
def test_output_shape_cifar(out_ch):
    out = _out_shape(UNet(out_ch=out_ch, **CIFAR), (4, 32, 32, 3))
    assert out.shape == (4, 32, 32, out_ch) and out.dtype == jnp.float32


# ------------------------------------------------------------------------- parameter counts


def test_param_count_cifar_matches_paper_and_diffusers():
    # Ho et al. report 35.7M; diffusers' UNet2DModel (google/ddpm-cifar10-32) has 35,746,307.
    assert _num_params(_init_shapes(UNet(out_ch=3, **CIFAR), (1, 32, 32, 3))) == 35_746_307
    # Learned variance only widens conv_out: 128 * 9 * 3 weights + 3 biases more.
    assert _num_params(_init_shapes(UNet(out_ch=6, **CIFAR), (1, 32, 32, 3))) == 35_749_766


def test_param_count_small_model():
    """The benchmark model: ch 32, ch_mult (1, 2, 2), attention only in the middle block.

    The 1,623,169 quoted for diffusers' "equivalent" is this model *plus* self-attention at one of
    the 64-channel levels (an AttnDownBlock2D / AttnUpBlock2D pair at 14x14 or 7x7): 2 down + 3 up
    attention blocks of 2*64 (GroupNorm) + 4*(64*64 + 64) (q, k, v, out) = 16,768 params each.
    """
    small = _num_params(_init_shapes(UNet(out_ch=1, **SMALL), (1, 28, 28, 1)))
    assert small == 1_539_329
    attn_params = 2 * 64 + 4 * (64 * 64 + 64)
    for res in (14, 7):
        model = UNet(out_ch=1, **dict(SMALL, attn_resolutions=(res,)))
        with_attn = _num_params(_init_shapes(model, (1, 28, 28, 1)))
        assert with_attn == 1_623_169 == small + 5 * attn_params


def test_conditioning_params_only_when_enabled():
    base = _init_shapes(UNet(**TINY), (1, 16, 16, 3))
    cond = _init_shapes(UNet(num_classes=NUM_CLASSES, cond_dim=COND_DIM, **TINY), (1, 16, 16, 3))
    assert "label_emb" not in base and "cond_proj" not in base
    assert cond["label_emb"]["embedding"].shape == (NUM_CLASSES + 1, 4 * TINY["ch"])
    assert cond["cond_proj"]["kernel"].shape == (COND_DIM, 4 * TINY["ch"])


# ----------------------------------------------------------------- layers against DDPM's math


def test_timestep_embedding_matches_ddpm_formula():
    t = np.array([0, 1, 17, 999])
    dim = 10
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    args = t[:, None].astype(np.float64) * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    got = np.asarray(get_timestep_embedding(jnp.asarray(t), dim))
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 args up to 999 rad
    got_float = get_timestep_embedding(jnp.asarray(t, jnp.float32), dim)
    np.testing.assert_array_equal(np.asarray(got_float), got)


@pytest.mark.parametrize("size, pad", [(8, (0, 1)), (7, (1, 1))])
def test_stride2_conv_uses_ddpm_padding(size, pad):
    """DDPM (TF "SAME") pads only bottom/right for even sizes; diffusers pads (0, 1, 0, 1)."""
    x = jax.random.normal(jax.random.key(0), (1, size, size, 4))
    conv = Conv3x3(5, strides=2)
    params = conv.init(jax.random.key(1), x)
    got = conv.apply(params, x)
    p = params["params"]
    expected = jax.lax.conv_general_dilated(
        x, p["kernel"], (2, 2), (pad, pad), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(got, expected + p["bias"], rtol=1e-5, atol=1e-5)
    assert got.shape == (1, (size + 1) // 2, (size + 1) // 2, 5)
    pooled = Downsample(with_conv=False).apply({}, x)
    assert pooled.shape == got.shape[:3] + (4,)
    np.testing.assert_allclose(pooled[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)), rtol=1e-5)


def _np_group_norm(x, num_groups, scale, bias, eps=1e-6):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _np_conv3x3(x, kernel, bias):
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [xp[:, i : i + h, j : j + w] @ kernel[i, j] for i in range(3) for j in range(3)]
    return sum(taps) + bias


def _np_swish(x):
    return x / (1 + np.exp(-x))


def test_blocks_match_float64_numpy_reference():
    """ResBlock and AttnBlock equal DDPM's equations written out in float64 numpy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    temb = rng.standard_normal((2, 12)).astype(np.float32)
    block = ResBlock(out_ch=8, dropout=0.0, num_groups=2)
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, temb, False))["params"]
    p = _perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), scale=0.3)
    got = block.apply({"params": p}, x, temb, False)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    h = _np_swish(_np_group_norm(x.astype(np.float64), 2, **q["norm1"]))
    h = _np_conv3x3(h, **q["conv1"])
    h = h + (_np_swish(temb.astype(np.float64)) @ q["temb_proj"]["kernel"])[:, None, None]
    h = h + q["temb_proj"]["bias"]
    h = _np_conv3x3(_np_swish(_np_group_norm(h, 2, **q["norm2"])), **q["conv2"])
    expected = x @ q["nin_shortcut"]["kernel"] + q["nin_shortcut"]["bias"] + h
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    attn = AttnBlock(num_groups=2)
    shapes = jax.eval_shape(lambda: attn.init(jax.random.key(0), x))["params"]
    p = _perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), scale=0.3)
    got = attn.apply({"params": p}, x)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    h = _np_group_norm(x.astype(np.float64), 2, **q["norm"]).reshape(2, 16, 8)
    qq, kk, vv = (h @ q[n]["kernel"] + q[n]["bias"] for n in ("q", "k", "v"))
    logits = np.einsum("bic,bjc->bij", qq, kk) / np.sqrt(8)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    out = np.einsum("bij,bjc->bic", w, vv) @ q["proj_out"]["kernel"] + q["proj_out"]["bias"]
    np.testing.assert_allclose(got, x + out.reshape(x.shape), rtol=1e-4, atol=1e-4)


def test_upsample_is_nearest_then_crop():
    x = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(1, 2, 2, 3)
    up = Upsample(with_conv=False)
    full = np.asarray(up.apply({}, x, (4, 4)))
    for i in range(4):
        for j in range(4):
            np.testing.assert_array_equal(full[0, i, j], x[0, i // 2, j // 2])
    np.testing.assert_array_equal(up.apply({}, x, (3, 4)), full[:, :3])
    with pytest.raises(ValueError, match="cannot reach"):
        up.apply({}, x, (5, 4))


# --------------------------------------------------- behaviour on a tiny conditional model


@pytest.fixture(scope="module")
def cond_setup():
    """Tiny class- and vector-conditional UNet, perturbed params, inputs and one jitted apply."""
    model = UNet(out_ch=6, num_classes=NUM_CLASSES, cond_dim=COND_DIM, **TINY)
    rng = np.random.default_rng(42)  # numpy: eager jax.random calls would each compile
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 3), np.float32))
    t = jnp.asarray(rng.integers(0, 1000, (4,), np.int32))
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, (4,), np.int32))
    cond = jnp.asarray(rng.standard_normal((4, COND_DIM), np.float32))
    # The "rbg" key compiles init ~3x faster on CPU than threefry (one RngBitGenerator op per
    # parameter instead of an unrolled hash); the initialisers themselves do not depend on it.
    key = jax.random.key(0, impl="rbg")
    init_params = jax.jit(
        lambda: model.init(key, x, t, {"label": y, "pooled": cond}, train=False)
    )()["params"]
    params = _perturb(init_params)
    chex.clear_trace_counter()

    # Every test that uses these also checks they are traced (and compiled) only once.
    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply_train(params, x, t, y, cond, rng):
        return model.apply({"params": params}, x, t, {"label": y, "pooled": cond}, train=True,
                           rngs={"dropout": rng})

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply_eval(params, x, t, y, cond):
        return model.apply({"params": params}, x, t, {"label": y, "pooled": cond}, train=False)

    return dict(
        model=model,
        init_params=init_params,
        params=params,
        x=x,
        t=t,
        y=y,
        cond=cond,
        train=apply_train,
        eval=apply_eval,
    )


def _uniform_limit(shape: tuple[int, ...], scale: float) -> float:
    """Bound of variance_scaling(scale, "fan_avg", "uniform") for a kernel [..., Cin, Cout]."""
    receptive = math.prod(shape[:-2])
    fan_avg = receptive * (shape[-2] + shape[-1]) / 2
    return math.sqrt(3.0 * scale / fan_avg)


def test_ddpm_initialisation(cond_setup):
    params = cond_setup["init_params"]
    # DDPM's "zero" init is variance scale 1e-10, i.e. |w| <= sqrt(3e-10 / fan_avg) ~ 1e-6: the last
    # conv of each ResBlock, the attention proj_out and conv_out.
    for kernel in (
        params["down_0_block_0"]["conv2"]["kernel"],
        params["mid_attn_1"]["proj_out"]["kernel"],
        params["conv_out"]["kernel"],
    ):
        limit = _uniform_limit(kernel.shape, 1e-10)
        assert 0.5 * limit < float(jnp.max(jnp.abs(kernel))) <= limit
    # Everything else: default_init, uniform(+-limit) with variance scale 1.
    for kernel in (
        params["up_0_block_0"]["conv1"]["kernel"],  # [3, 3, 48, 16]
        params["mid_attn_1"]["q"]["kernel"],  # [32, 32]
        params["temb_dense0"]["kernel"],  # [16, 64]
    ):
        limit = _uniform_limit(kernel.shape, 1.0)
        assert float(jnp.max(jnp.abs(kernel))) <= limit
        np.testing.assert_allclose(float(jnp.std(kernel)), limit / math.sqrt(3), rtol=0.1)
    assert float(jnp.max(jnp.abs(params["up_0_block_0"]["conv1"]["bias"]))) == 0.0
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_same_inputs_same_output(cond_setup):
    s = cond_setup
    args = (s["params"], s["x"], s["t"], s["y"], s["cond"])
    out = s["eval"](*args)
    assert out.shape == (4, 16, 16, 6) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-2
    np.testing.assert_array_equal(out, s["eval"](*args))
    key = jax.random.key(7)
    np.testing.assert_array_equal(s["train"](*args, key), s["train"](*args, key))


def test_dropout_only_in_train(cond_setup):
    s = cond_setup
    args = (s["params"], s["x"], s["t"], s["y"], s["cond"])
    train_a = s["train"](*args, jax.random.key(1))
    train_b = s["train"](*args, jax.random.key(2))
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
    # Eval ignores the dropout rng entirely: with and without one, any key, same result.
    model = s["model"]

    @jax.jit
    def eval_with_rng(params, x, t, y, cond, rng):
        return model.apply({"params": params}, x, t, {"label": y, "pooled": cond}, train=False,
                           rngs={"dropout": rng})

    eval_a = eval_with_rng(*args, jax.random.key(1))
    eval_b = eval_with_rng(*args, jax.random.key(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_allclose(eval_a, s["eval"](*args), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3


def test_labels_null_label_and_cond_change_output(cond_setup):
    s = cond_setup
    p, x, t, y, cond = s["params"], s["x"], s["t"], s["y"], s["cond"]
    base = s["eval"](p, x, t, y, cond)
    other_y = (y + 1) % NUM_CLASSES
    assert float(jnp.max(jnp.abs(s["eval"](p, x, t, other_y, cond) - base))) > 1e-3
    null = jnp.full_like(y, NUM_CLASSES)
    out_null = s["eval"](p, x, t, null, cond)
    assert bool(jnp.all(jnp.isfinite(out_null)))
    assert float(jnp.max(jnp.abs(out_null - base))) > 1e-3
    assert float(jnp.max(jnp.abs(s["eval"](p, x, t, y, cond + 1.0) - base))) > 1e-3
    # None means: null label / zero conditioning vector.
    model = s["model"]
    out_none = jax.jit(lambda p: model.apply({"params": p}, x, t, None, train=False))(p)
    expected = s["eval"](p, x, t, null, jnp.zeros_like(cond))
    np.testing.assert_allclose(out_none, expected, rtol=1e-5, atol=1e-5)
    # The output depends on t as well.
    assert float(jnp.max(jnp.abs(s["eval"](p, x, t + 1, y, cond) - base))) > 1e-4


def test_no_retrace_across_batches(cond_setup):
    """New timesteps, labels (null included), images and dropout keys reuse the one trace."""
    s = cond_setup
    rng = np.random.default_rng(3)
    for i in range(3):
        t = jnp.asarray(rng.integers(0, 1000, (4,), np.int32))
        y = jnp.asarray(rng.integers(0, NUM_CLASSES + 1, (4,), np.int32))
        s["train"](s["params"], s["x"] * i, t, y, s["cond"], jax.random.key(i))
        s["eval"](s["params"], s["x"] * i, t, y, s["cond"])


def test_bfloat16_close_to_float32(cond_setup):
    """bfloat16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per op); errors from ~20
    layers add up roughly as a random walk to ~1%, so relative L2 error < 2e-2 is the bound."""
    s = cond_setup
    model_bf16 = s["model"].clone(dtype=jnp.bfloat16)
    args = (s["x"], s["t"], s["y"], s["cond"])
    out32 = s["eval"](s["params"], *args)
    x, t, y, cond = args
    out16 = jax.jit(lambda p: model_bf16.apply(
        {"params": p}, x, t, {"label": y, "pooled": cond}, train=False))(s["params"])
    assert out16.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out16)))
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 2e-2, rel
    assert rel > 0  # the computation really did run in bfloat16


def test_remat_same_maths_and_wired_in():
    """Rematerialisation changes memory, not maths. Checked numerically on one ResBlock wrapped
    as the UNet wraps it (dropout on, so the lifted "dropout" rng is exercised), and structurally
    on the UNet: same parameter tree, and its gradient's jaxpr contains remat regions."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
    temb = jnp.asarray(rng.standard_normal((2, 16), np.float32))
    block = ResBlock(out_ch=8, dropout=0.5, num_groups=2, name="b")
    block_remat = nn.remat(ResBlock, static_argnums=(3,))(8, 0.5, 2, name="b")
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, temb, False))["params"]
    params = _perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), scale=0.3)
    key = jax.random.key(3)

    def loss(module, params):
        out = module.apply({"params": params}, x, temb, True, rngs={"dropout": key})
        return jnp.mean(out**2)

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(block, p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(block_remat, p)))(params)
    assert float(l0) > 0
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)

    def remat_eqns(model: UNet) -> tuple[int, dict]:
        xs, ts = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
        shapes = _init_shapes(model, xs.shape)
        apply = lambda p: model.apply({"params": p}, xs, ts, train=False).sum()
        jaxpr = jax.make_jaxpr(jax.grad(apply))(shapes)
        return sum("remat" in eqn.primitive.name for eqn in jaxpr.jaxpr.eqns), shapes

    micro = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=2)
    n_plain, shapes_plain = remat_eqns(micro)
    n_remat, shapes_remat = remat_eqns(micro.clone(remat=True))
    assert jax.tree.structure(shapes_plain) == jax.tree.structure(shapes_remat)
    assert n_plain == 0 and n_remat > 0


def test_bad_inputs_fail_loudly():
    model = UNet(**TINY)
    x, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(
            lambda: model.init(jax.random.key(0), x, t, {"label": jnp.zeros(2, int)}, train=False)
        )
    with pytest.raises(ValueError, match="t must have shape"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t[:1], train=False))
    cmodel = UNet(cond_dim=COND_DIM, **TINY)
    with pytest.raises(ValueError, match=r"cond\['pooled'\] must have shape"):
        jax.eval_shape(
            lambda: cmodel.init(
                jax.random.key(0), x, t, {"pooled": jnp.zeros((2, 3))}, train=False
            )
        )


@pytest.mark.parametrize("shape,groups", [((2, 6, 6, 8), 2), ((3, 5, 7, 12), 4), ((2, 9, 16), 8)])
def test_group_norm_matches_float64_reference_and_flax(shape, groups):
    """The fast GroupNorm equals GroupNorm in float64 numpy (values and gradients) and flax's."""
    rng = np.random.default_rng(1)
    # A mean of 3 against a spread of 2 exercises the one-pass E[x^2] - E[x]^2 variance.
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    bias = (0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    params = {"scale": scale, "bias": bias}
    cot = rng.standard_normal(shape).astype(np.float32)

    def np_gn(x, scale, bias):
        b, c = x.shape[0], x.shape[-1]
        xg = x.reshape(b, -1, groups, c // groups)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = xg.var(axis=(1, 3), keepdims=True)
        return ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias

    gn = GroupNorm(num_groups=groups)
    got = gn.apply({"params": params}, x)
    np.testing.assert_allclose(got, np_gn(x.astype(np.float64), scale, bias), rtol=1e-5, atol=2e-5)
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6).apply({"params": params}, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)

    # Gradients w.r.t. x and both parameters against central differences of the float64 map.
    grads = jax.grad(lambda p, x: jnp.sum(gn.apply({"params": p}, x) * cot), (0, 1))(params, x)
    x64, c64 = x.astype(np.float64), cot.astype(np.float64)
    loss = lambda x, s, b: float(np.sum(np_gn(x, s, b) * c64))  # noqa: E731
    eps = 1e-5
    for _ in range(6):
        idx = tuple(int(rng.integers(n)) for n in shape)
        dx = np.zeros(shape)
        dx[idx] = eps
        fd = (loss(x64 + dx, scale, bias) - loss(x64 - dx, scale, bias)) / (2 * eps)
        np.testing.assert_allclose(grads[1][idx], fd, rtol=1e-3, atol=1e-3)
    ch = int(rng.integers(shape[-1]))
    ds = np.zeros(shape[-1])
    ds[ch] = eps
    fd = (loss(x64, scale + ds, bias) - loss(x64, scale - ds, bias)) / (2 * eps)
    np.testing.assert_allclose(grads[0]["scale"][ch], fd, rtol=1e-3, atol=1e-3)
    fd = (loss(x64, scale, bias + ds) - loss(x64, scale, bias - ds)) / (2 * eps)
    np.testing.assert_allclose(grads[0]["bias"][ch], fd, rtol=1e-3, atol=1e-3)


def test_swish_and_fused_group_norm_swish_match_float64_and_silu():
    """swish (tanh form) = x sigmoid(x) in float64 to 3e-6 absolute (jax.nn.silu: 1.3e-6), with
    silu's gradient, finite at |x| = 1e4; GroupNorm(swish=True) = silu(GroupNorm(x)), values and
    gradients."""
    x = np.concatenate([np.linspace(-30, 30, 601), [-1e4, -100.0, 100.0, 1e4]]).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 * np.exp(-np.logaddexp(0.0, -x64))  # x * sigmoid(x), overflow-free
    np.testing.assert_allclose(swish(jnp.asarray(x)), expected, rtol=2e-6, atol=3e-6)
    got, ref = (jax.vmap(jax.grad(f))(jnp.asarray(x)) for f in (swish, jax.nn.silu))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)

    rng = np.random.default_rng(2)
    x = (1.0 + 2.0 * rng.standard_normal((2, 5, 6, 8))).astype(np.float32)
    params = GroupNorm(num_groups=4).init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape), params)
    fused = lambda p, x: GroupNorm(num_groups=4, swish=True).apply(p, x)  # noqa: E731
    plain = lambda p, x: jax.nn.silu(GroupNorm(num_groups=4).apply(p, x))  # noqa: E731
    np.testing.assert_allclose(fused(params, x), plain(params, x), rtol=1e-5, atol=1e-5)
    cot = rng.standard_normal(x.shape).astype(np.float32)
    g_fused = jax.grad(lambda p, x: jnp.sum(fused(p, x) * cot), (0, 1))(params, x)
    g_plain = jax.grad(lambda p, x: jnp.sum(plain(p, x) * cot), (0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 g_fused, g_plain)


def test_group_norm_bfloat16_output_and_bad_groups():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    gn = GroupNorm(num_groups=4, dtype=jnp.bfloat16)
    params = gn.init(jax.random.key(1), x)
    assert params["params"]["scale"].dtype == jnp.float32
    out = gn.apply(params, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), GroupNorm(4).apply(params, x), atol=2e-2)
    with pytest.raises(ValueError, match="num_groups=3 does not divide 8"):
        GroupNorm(num_groups=3).init(jax.random.key(1), x)


@pytest.mark.parametrize("out_hw", [(10, 12), (9, 11), (10, 11)])
def test_upsample_conv_equals_nearest_upsample_then_conv(out_hw):
    """The sub-pixel form (even sizes) and the crop route (odd) equal repeat + crop + Conv3x3."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    up = UpsampleConv3x3(features=3)
    params = up.init(jax.random.key(1), x, out_hw)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
    conv = Conv3x3(features=3)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, conv.init(jax.random.key(1), x))  # same parameters as the conv it replaces

    def reference(p, x):
        u = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, : out_hw[0], : out_hw[1]]
        return conv.apply(p, u)

    got = up.apply(params, x, out_hw)
    assert got.shape == (2, *out_hw, 3)
    np.testing.assert_allclose(got, reference(params, x), rtol=1e-5, atol=1e-5)
    cot = jax.random.normal(jax.random.key(3), got.shape)
    g_got = jax.grad(lambda p, x: jnp.sum(up.apply(p, x, out_hw) * cot), (0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(reference(p, x) * cot), (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_custom_vjp_matches_softmax_autodiff(dtype):
    """blocks.attention (normalise after the product; hand-written backward) = plain softmax."""
    from models.blocks import attention

    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kx, (2, 10, 6)) for kx in (kq, kk, kv))
    cot = jax.random.normal(kc, (2, 10, 6))

    def plain(q, k, v):
        w = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k), axis=-1)
        return jnp.einsum("bij,bjc->bic", w, v)

    def loss(fn, *args):
        return jnp.sum(fn(*args).astype(jnp.float32) * cot)

    args = tuple(a.astype(dtype) for a in (q, k, v))
    got = attention(*args)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got.astype(np.float32), plain(q, k, v), rtol=tol, atol=tol)
    g_got = jax.grad(lambda *a: loss(attention, *a), (0, 1, 2))(*args)
    g_ref = jax.grad(lambda *a: loss(plain, *a), (0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_ref, strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a.astype(np.float32), b, rtol=tol, atol=tol * 4)
