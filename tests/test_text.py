"""Text to image: text guidance against a closed form, captions per (seed, step), the trainer
and sampler with text on (8 devices == 1, SIGKILL + resume bit-identical, one trace), prompts,
and bad input failing before anything compiles.

The closed-form check uses no encoder: "captions" are token states that name a class, the
empty caption names none, and the model is the exact ε of Gaussian data per caption class.
The CLI runs use the real MiniLM encoder on configs/tiny.py with text switched on.
"""

import logging
import shutil
import signal
import subprocess

import flax.linen as nn
import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_guidance import S2, M, T, _affine_chain, _se
from test_train import (
    DEVICE_TOLERANCE,
    REPO,
    _assert_trees_equal,
    _cli,
    _env,
    _max_abs_diff,
    _run,
    _wait_for_checkpoint,
)

import config_lib
import input_pipeline
import sampling_lib
import text_conditioning
import train_lib
from configs import tiny
from diffusion import schedules
from errors import UserError
from models import UNet, conditioning
from text import captions, digit_captions

D = M.size
N = 4096

# --- text CFG on Gaussian data per caption: the closed form ------------------------------------

# Token states [L=3, 4]: start, word, end. Caption "class c" has the word e_c; the empty caption
# (∅) is start + end only, its word position masked out.
_START, _END = np.array([1.0, 0, 0, 0]), np.array([0, 0, 0, 1.0])
_WORD = {0: np.array([0, 1.0, 0, 0]), 1: np.array([0, 0, 1.0, 0])}


def _caption(c: int | None) -> dict[str, np.ndarray]:
    word = _WORD[c] if c is not None else np.zeros(4)
    return {"tokens": np.stack([_START, word, _END]).astype(np.float32),
            "mask": np.array([True, c is not None, True]),
            "pooled": (np.stack([_START, word, _END]).mean(0)).astype(np.float32)}


class _CaptionOracle(nn.Module):
    """The exact ε of Gaussian data per caption, reading the caption as a cross-attention UNet
    does: from the masked token states. "class 0" -> N(+m, s²), "class 1" -> N(-m, s²), and ∅
    (no word token) -> N(0, s² + m²) per dimension, the mixture's moment-matched Gaussian (the
    unconditional model of test_guidance's closed-form CFG test)."""

    num_classes = 0
    cond_fields = ("tokens", "mask", "pooled")
    gain_c: jax.Array = None    # [T]
    gain_u: jax.Array = None    # [T, D]
    offset_c: jax.Array = None  # [T, D], for +m

    @nn.compact
    def __call__(self, x, t, cond, *, train: bool):
        del train
        words = jnp.sum(cond["tokens"] * cond["mask"][..., None], axis=1)  # [B, 4]
        sign = words[:, 1] - words[:, 2]                                   # +1, -1, or 0 for ∅
        flat = x.reshape(x.shape[0], -1)
        eps_c = self.gain_c[t][:, None] * flat + sign[:, None] * self.offset_c[t]
        eps_u = self.gain_u[t] * flat
        eps = jnp.where((sign == 0)[:, None], eps_u, eps_c)
        return eps.reshape(x.shape)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_text_cfg_equals_the_closed_form(sampler):
    """Text guidance ε̃ = (1 + w) ε(x, c) − w ε(x, ∅) through the real path (the cond pytree,
    sampling_lib.guided_model_fn, ∅ = the empty caption's encoding, the sharded Sampler) on the
    exact per-caption model: the output is N(m_w, v_w) per dimension in closed form
    (test_guidance._affine_chain, float64). The sample mean and variance per dimension match it
    to 5 standard errors for w = 0, 1, 3, and guidance moves the samples beyond μ_c."""
    betas = schedules.get_betas("linear", T)
    schedule = schedules.schedule_from_name("linear", T)
    ab = oracle.alphas_cumprod(betas)
    a, b = np.sqrt(ab), np.sqrt(1.0 - ab)
    v_c = ab * S2 + 1.0 - ab
    v_u = ab[:, None] * (S2 + M**2) + (1.0 - ab)[:, None]
    f32 = lambda z: jnp.asarray(z, jnp.float32)
    model = _CaptionOracle(gain_c=f32(b / v_c), gain_u=f32(b[:, None] / v_u),
                           offset_c=f32(-(b * a / v_c)[:, None] * M))
    null = _caption(None)
    cond = conditioning.take({k: v[None] for k, v in _caption(0).items()}, np.zeros(N, int))
    num_steps = {"ancestral": 0, "ddim": 50}[sampler]
    with oracle.fast_inference():  # one sampler: the scale is an input of its programs
        run = sampling_lib.Sampler(
            model, schedule, train_lib.make_mesh(), image_shape=(2, 2, 1), batch_size=N,
            guidance_scale=0.0, sampler=sampler, num_steps=num_steps, eta=0.0, clip_x0=False,
            prediction="eps", var_type="fixed_large", null=null, progress_every=0)
    means = []
    for w in (0.0, 1.0, 3.0):
        x = run({}, jax.random.key(4), cond, guidance_scale=w).reshape(N, D).astype(np.float64)
        for i in range(D):
            g = (1 + w) * b / v_c - w * b / v_u[:, i]
            c = -(1 + w) * b * a * M[i] / v_c
            m, v = _affine_chain(betas, sampler, g, c)
            mean_se, var_se = _se(v, N)
            assert abs(x[:, i].mean() - m) < 5 * mean_se, (w, i, x[:, i].mean(), m)
            assert abs(x[:, i].var(ddof=1) - v) < 5 * var_se, (w, i, x[:, i].var(), v)
        means.append(x.mean(0) @ M / np.linalg.norm(M))
    assert means[0] < means[1] < means[2] and means[2] > np.linalg.norm(M)


# --- captions of a batch -----------------------------------------------------------------------

class _FakeEncoder:
    """A deterministic stand-in for a frozen encoder: token states from the characters."""

    name, width, pooled_width, max_length, cache_key = "fake", 3, 2, 6, "fake-L6"

    def __init__(self):
        self.calls = 0


def _fake_encode(encoder, texts, *, batch_size=256, log=None):
    del batch_size, log
    encoder.calls += 1
    n, length = len(texts), encoder.max_length
    codes = np.zeros((n, length), np.float32)
    mask = np.zeros((n, length), bool)
    for i, text in enumerate(texts):
        chars = [ord(ch) for ch in text[:length - 2]]
        codes[i, 1:1 + len(chars)] = chars
        mask[i, :len(chars) + 2] = True
    tokens = np.stack([codes, codes / 2, mask.astype(np.float32)], -1)
    return {"tokens": tokens, "mask": mask, "pooled": tokens.mean(1)[:, :2]}


@pytest.fixture
def fake_encoder(monkeypatch):
    from text import encoders

    monkeypatch.setattr(encoders, "encode_texts", _fake_encode)
    return _FakeEncoder()


@pytest.fixture(scope="module")
def digits():
    return input_pipeline.load_mnist_5k("train")


def test_text_batcher_is_a_function_of_seed_and_step_and_caches(digits, fake_encoder, tmp_path):
    """The captions of step s depend on (seed, s) alone, process shards reassemble the global
    batch, row 0 (∅) is the empty caption's encoding, and a second batcher reads the cache."""
    source = captions.DigitCaptionSource(digits.images, digits.labels)
    batcher = captions.TextBatcher(source, fake_encoder, ("tokens", "mask", "pooled"),
                                   cache_dir=str(tmp_path))
    assert fake_encoder.calls == 1
    indices = input_pipeline.global_batch_indices(0, 5, 16, len(digits.labels))
    whole = batcher(indices, seed=0, step=5)
    again = batcher(indices, seed=0, step=5)
    for name in whole:
        np.testing.assert_array_equal(whole[name], again[name])
        parts = [batcher(indices, seed=0, step=5, rows=input_pipeline.process_rows(16, p, 4))
                 for p in range(4)]
        np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]))
    other_step = batcher(indices, seed=0, step=6)
    assert not np.array_equal(other_step["tokens"], whole["tokens"])
    # Each caption names the digit's own label.
    meaning = digit_captions.caption_meaning("train")
    chosen = source.choose(indices, seed=0, step=5, rows=slice(None))
    np.testing.assert_array_equal(meaning["label"][chosen], digits.labels[indices])
    # ∅ is the encoding of "".
    empty = _fake_encode(_FakeEncoder(), [""])
    for name, value in batcher.null.items():
        np.testing.assert_array_equal(value, empty[name][0])
    cached = captions.TextBatcher(source, fake_encoder, ("tokens", "mask"),
                                  cache_dir=str(tmp_path))
    assert fake_encoder.calls == 1  # read from the cache, not encoded again
    np.testing.assert_array_equal(cached(indices, seed=0, step=5)["tokens"], whole["tokens"])


def test_text_unet_traces_once_and_reads_tokens_and_mask():
    """A cross-attention UNet with the pooled path too: new captions (and ∅) reuse the one trace
    of the sampler chunk; the output depends on the tokens and ignores masked-out ones."""
    model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4,
                 out_ch=1, context_dim=6, cond_dim=5, cross_attn_resolutions=(8,), num_heads=2)
    rng = np.random.default_rng(0)
    cond = {"tokens": rng.standard_normal((8, 4, 6)).astype(np.float32),
            "mask": np.array([[1, 1, 1, 0]] * 8, bool),
            "pooled": rng.standard_normal((8, 5)).astype(np.float32)}
    x, t = jnp.zeros((8, 16, 16, 1)), jnp.zeros((8,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond, train=False))
    params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32),
                          shapes)["params"]
    assert {"mid_cross_attn_1", "down_1_cross_attn_0", "cond_proj"} <= set(params)
    apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, train=False))
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 1)), jnp.float32)
    base = apply(params, x, t, cond)
    padded = dict(cond, tokens=cond["tokens"].copy())
    padded["tokens"][:, 3] += 5.0  # a masked-out token: no effect
    np.testing.assert_allclose(apply(params, x, t, padded), base, atol=1e-6)
    changed = dict(cond, tokens=cond["tokens"] + 0.5)
    assert float(jnp.max(jnp.abs(apply(params, x, t, changed) - base))) > 1e-3

    null = {name: value[0] for name, value in cond.items()}
    sampler = sampling_lib.Sampler(
        model, schedules.schedule_from_name("cosine", 20), train_lib.make_mesh(),
        image_shape=(16, 16, 1), batch_size=8, guidance_scale=2.0, sampler="ddim", num_steps=4,
        eta=0.0, clip_x0=True, prediction="eps", var_type="fixed_large", null=null,
        progress_every=2)
    first = sampler(params, jax.random.key(0), cond)
    second = sampler(params, jax.random.key(0), changed)
    assert sampler.num_traces == 1
    assert np.max(np.abs(first - second)) > 1e-4


# --- the trainer and the CLI with text on ---------------------------------------------------

TEXT_STEPS = 6
TEXT = ["--config.data.captions=digits", "--config.model.text_encoder=minilm",
        "--config.model.num_classes=0", "--config.model.cross_attn_resolutions=(28,)",
        f"--config.train.num_steps={TEXT_STEPS}"]


def _text_config():
    config = tiny.get_config()
    config.data.captions = "digits"
    config.model.text_encoder = "minilm"
    config.model.num_classes = 0
    config.model.cross_attn_resolutions = (28,)
    config.train.num_steps = TEXT_STEPS
    return config


def _params(workdir, use_ema=False):
    _, params, step = train_lib.restore_params(_text_config(), str(workdir), use_ema=use_ema)
    return step, jax.tree.map(np.asarray, jax.device_get(params))


def _with_cache(reference, workdir):
    """A workdir that starts with the reference run's caption embeddings (the digits'
    vocabulary is encoded once per test session, not once per run)."""
    shutil.copytree(reference / "text_cache", workdir / "text_cache")
    return workdir


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """An uninterrupted 8-device run of tiny + text, TEXT_STEPS steps."""
    workdir = tmp_path_factory.mktemp("text_reference")
    train = _run(workdir, *TEXT)
    assert "distinct captions" in train.stderr
    return workdir


@pytest.mark.slow
def test_text_training_samples_prompts_and_unconditional(text_run):
    workdir = text_run
    _run(workdir, *TEXT, "--config.sample.prompt=a thin seven", mode="sample")
    data = np.load(next(workdir.glob("samples_*_w0.npz")))
    assert data["images"].shape == (16, 28, 28, 1)
    assert list(data["prompts"]) == ["a thin seven"] * 16
    assert list(workdir.glob("samples_*_w0.png"))
    _run(workdir, *TEXT, "--config.sample.unconditional=True", "--config.sample.guidance_scale=1",
         mode="sample")
    data = np.load(next(workdir.glob("samples_*_uncond.npz")))
    assert list(data["prompts"]) == [""] * 16


@pytest.mark.slow
def test_text_8_devices_equal_1_device(text_run, tmp_path):
    _, params_8 = _params(text_run)
    _run(_with_cache(text_run, tmp_path), *TEXT, num_devices=1)
    _, params_1 = _params(tmp_path)
    assert _max_abs_diff(params_8, params_1) < DEVICE_TOLERANCE


@pytest.mark.slow
def test_text_sigkill_then_resume_is_bit_identical(text_run, tmp_path):
    workdir = _with_cache(text_run, tmp_path)
    proc = subprocess.Popen(_cli(workdir, *TEXT), env=_env(8), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_after = _wait_for_checkpoint(workdir, proc, min_step=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_after < TEXT_STEPS
    resumed = _run(workdir, *TEXT)
    assert "Resumed from step" in resumed.stderr
    for use_ema in (False, True):
        step, params = _params(workdir, use_ema)
        _, ref = _params(text_run, use_ema)
        assert step == TEXT_STEPS
        _assert_trees_equal(params, ref)


# --- prompts and bad input ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from text import encoders

    return encoders.load_encoder("minilm", max_length=24)


def test_empty_prompt_is_the_null_condition_and_long_prompts_are_cut(minilm, caplog):
    caplog.set_level(logging.WARNING)
    long = "a thick seven " * 20
    cond, null = captions.prompt_cond(minilm, ["", "a seven", long], ("tokens", "mask", "pooled"))
    for name, value in null.items():
        np.testing.assert_array_equal(cond[name][0], value)
    assert cond["mask"][1].sum() < cond["mask"][2].sum() == 24
    assert "trunc" in caplog.text.lower()


def test_text_config_without_captions_fails_before_compiling(tmp_path, monkeypatch):
    config = _text_config()
    config.data.captions = ""
    compiled = []
    monkeypatch.setattr(train_lib.jax, "jit", lambda *a, **k: compiled.append(a))
    with pytest.raises(config_lib.ConfigError, match="needs captions.*Fix"):
        train_lib.train(config, str(tmp_path))
    assert not compiled


def test_missing_encoder_weights_fail_before_compiling(tmp_path, monkeypatch):
    config = _text_config()
    config.model.text_weights = str(tmp_path / "no_such_dir")
    compiled = []
    monkeypatch.setattr(train_lib.jax, "jit", lambda *a, **k: compiled.append(a))
    with pytest.raises(UserError, match="Fix"):
        train_lib.train(config, str(tmp_path / "workdir"))
    assert not compiled


def test_prompts_need_a_text_model():
    config = tiny.get_config()
    config.sample.prompt = "a seven"
    with pytest.raises(config_lib.ConfigError, match="text-conditional model"):
        config_lib.validate(config, num_devices=jax.device_count())
    config = _text_config()
    config.data.random_flip = True
    with pytest.raises(config_lib.ConfigError, match="random_flip=False"):
        config_lib.validate(config, num_devices=jax.device_count())
    assert text_conditioning.text_fields(train_lib.create_model(_text_config())) == (
        "tokens", "mask")


@pytest.mark.slow
def test_precomputed_embeddings_train_and_sample(tmp_path):
    """model.text_encoder='precomputed': embeddings made elsewhere (here: the fake encoder) for
    every caption, prompt and "" train and sample like any encoder; a prompt missing from the
    file stops with the fix, before sampling."""
    import generate

    texts = ["", *digit_captions.caption_vocabulary("train"), "a seven"]
    arrays = _fake_encode(_FakeEncoder(), texts)
    path = tmp_path / "embeddings.npz"
    np.savez(path, texts=np.asarray(texts), **arrays)
    config = _text_config()
    config.model.text_encoder = "precomputed"
    config.model.text_weights = str(path)
    config.model.text_max_length = _FakeEncoder.max_length
    config.model.text_conditioning = "both"
    config.train.num_steps = 2
    state = train_lib.train(config, str(tmp_path / "w"))
    assert int(state.step) == 2
    assert {"cond_proj", "mid_cross_attn_1"} <= set(state.params)
    config.sample.prompt = "a seven"
    paths = generate.generate(config, str(tmp_path / "w"))
    assert list(np.load(paths["npz"])["prompts"]) == ["a seven"] * 16
    config.sample.prompt = "a prompt nobody embedded"
    with pytest.raises(UserError, match="not in .*embeddings.npz.*Fix"):
        generate.generate(config, str(tmp_path / "w"))


def test_text_eval_json_keeps_earlier_scales_of_the_same_evaluation_only():
    import text_eval

    def result(step, scales, sampler="ancestral"):
        return {"step": step, "conditioned_on": "text", "prompts": "heldout", "num_prompts": 450,
                "sampler": sampler, "num_steps": 100, "seed": 0,
                "scales": {k: {"accuracy": v} for k, v in scales.items()}}

    first = result(2400, {"2": 0.99, "3": 0.98})
    merged = text_eval.merge_scales(first, result(2400, {"0": 0.87, "2": 0.5}))
    assert list(merged["scales"]) == ["0", "2", "3"]  # numeric order, the new value of w = 2 wins
    assert [merged["scales"][k]["accuracy"] for k in ("0", "2", "3")] == [0.87, 0.5, 0.98]
    for other in (result(2700, {"0": 0.9}), result(2400, {"0": 0.9}, sampler="ddim")):
        assert text_eval.merge_scales(first, other) == other  # another checkpoint or sampler
    assert text_eval.merge_scales(None, first) == first
