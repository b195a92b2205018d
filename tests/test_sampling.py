"""Sampling from networks: chunked loop == one loop, same seed == same images, 8 devices == 1,
one trace; labels and config checks; the modes train_classifier, sample (with classifier
guidance) and guidance_sweep end to end on the tiny config.
"""

import json
import logging
import os

import chex
import cli_runs
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpointing
import classifier_training
import config_lib
import generate
import sampling_lib
import train_lib
from configs import mnist, mnist_classifier, tiny
from diffusion import samplers, schedules
from models import NoisyClassifier, UNet

# 8 devices vs 1 run the same per-example arithmetic, but XLA picks convolution and reduction
# kernels by the per-device batch (1 vs 8 here), which reorders float32 sums: a few ulps per
# network call, amplified through 7 steps of the guided loop (CFG w = 2 and a classifier
# gradient scaled by 3 each). Measured max |difference| 1.1e-5 on images in [-1, 1]; 1e-4 leaves
# margin, while a wrong key, label or shard changes pixels by O(0.1).
DEVICE_TOLERANCE = 1e-4


# --- the loop in chunks ------------------------------------------------------------------------

def _toy_model(x, t):
    """A cheap network stand-in that depends on x and t nonlinearly."""
    return jnp.tanh(0.5 * x) + 0.01 * jnp.sin(t.astype(jnp.float32)).reshape(-1, 1, 1, 1)


def _toy_cond_fn(x, t):
    return -0.05 * x * (t > 50).astype(jnp.float32).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_chunks_give_the_uninterrupted_loop(sampler):
    """sample_steps over (0, 3), (3, 4), (4, 10) == over (0, 10), bit for bit, with one trace
    (traced bounds), for every sampler: stochastic DDIM (keys by step index), DPM-Solver++'s
    x̂_0 history carried across chunks, classifier guidance on. Against `samplers.sample` (a
    separately compiled loop with a static trip count, which XLA optimises differently) the
    result agrees to float32 rounding (max 4e-7 measured)."""
    schedule = schedules.schedule_from_name("linear", 100)
    shape, key = (8, 4, 4, 2), jax.random.key(0)
    kwargs = dict(sampler=sampler, num_steps=10, eta=0.5, cond_fn=_toy_cond_fn)
    init_key, loop_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape)

    def chunk(state, key, start, stop):
        return samplers.sample_steps(_toy_model, schedule, state, key, start, stop, **kwargs)

    chex.clear_trace_counter()
    chunk = jax.jit(chex.assert_max_traces(chunk, n=1))
    state = samplers.init_state(x_T)
    for start, stop in ((0, 3), (3, 4), (4, 10)):
        state = chunk(state, loop_key, start, stop)
    np.testing.assert_array_equal(state.x, chunk(samplers.init_state(x_T), loop_key, 0, 10).x)

    whole = jax.jit(lambda x_T, key: samplers.sample(_toy_model, schedule, shape, key, x_T=x_T,
                                                     **kwargs))(x_T, key)
    np.testing.assert_allclose(state.x, whole, atol=2e-6, rtol=0)


# --- the Sampler with networks -----------------------------------------------------------------

BATCH, STEPS, SHAPE = 8, 7, (8, 8, 1)


def _random_like(tree, seed: int, scale: float = 0.1):
    """N(0, scale²) numbers in the shapes of `tree`, from numpy: the tests below need weights
    that make every path (labels, classifier gradient) matter, not trained ones, and building
    them costs no compilation (a jitted UNet init takes seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: scale * rng.standard_normal(a.shape, np.float32), tree)


def _params(module, seed: int, *inputs):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, train=False))
    return _random_like(shapes["params"], seed)


@pytest.fixture(scope="module")
def nets():
    """A one-level UNet with a learned-variance channel and a noise-aware classifier, 3 classes."""
    model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4,
                 num_classes=3, out_ch=2)
    classifier = NoisyClassifier(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                                 num_groups=4, num_classes=3)
    x, t, y = jnp.zeros((1, *SHAPE)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
    return model, _params(model, 0, x, t, {"label": y}), classifier, _params(classifier, 1, x, t)


def _sampler(nets, num_devices: int, progress_every: int, guidance_scale: float = 2.0):
    model, _, classifier, _ = nets
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    return sampling_lib.Sampler(
        model, schedules.schedule_from_name("cosine", 50), mesh, image_shape=SHAPE,
        batch_size=BATCH, sampler="ancestral", num_steps=STEPS, eta=0.0, clip_x0=True,
        guidance_scale=guidance_scale, prediction="eps", var_type="learned_range",
        classifier=classifier, classifier_scale=3.0, progress_every=progress_every)


@pytest.fixture(scope="module")
def sampler_8(nets):
    return _sampler(nets, 8, progress_every=3)


def test_sampler_is_deterministic_exact_in_chunks_and_traced_once(nets, sampler_8):
    """CFG (w = 2) and classifier guidance (s = 3), ancestral with a learned variance, 7 steps on
    8 devices:
    same key -> same images; chunks of 3 == one chunk of 7 (bit for bit); other keys, labels or
    classifier weights -> other images; all of it with one trace of the chunk."""
    _, params, _, classifier_params = nets
    labels = np.arange(BATCH) % 3
    run = lambda key, labels=labels, cp=classifier_params: sampler_8(
        params, key, {"label": labels}, classifier_params=cp)
    a = run(jax.random.key(0))
    assert a.shape == (BATCH, *SHAPE) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(run(jax.random.key(0)), a)

    sampler_8.progress_every = STEPS
    try:
        np.testing.assert_array_equal(run(jax.random.key(0)), a)
    finally:
        sampler_8.progress_every = 3
    assert np.max(np.abs(run(jax.random.key(1)) - a)) > 0.1
    assert np.max(np.abs(run(jax.random.key(0), labels=(labels + 1) % 3) - a)) > 1e-3
    # The classifier's gradient reaches the sampler: another classifier, other images.
    other = _random_like(classifier_params, 2)
    assert np.max(np.abs(run(jax.random.key(0), cp=other) - a)) > 1e-3
    # Ahead-of-time compilation for conditions of the same shape reuses the trace.
    sampler_8.compile(params, classifier_params, {"label": labels})
    assert sampler_8.num_traces == 1


def test_one_sampler_serves_every_guidance_scale(nets, sampler_8):
    """w is an input of the program, not a constant in it: the w = 2 sampler asked for w = 5
    draws what a sampler built for w = 5 draws; every w != 0 runs one program, w = 0 another."""
    _, params, _, classifier_params = nets
    labels = np.arange(BATCH) % 3
    run = lambda sampler, w=None: sampler(params, jax.random.key(0), {"label": labels},
                                          classifier_params=classifier_params, guidance_scale=w)
    at_2 = run(sampler_8)
    traces = sampler_8.num_traces
    at_5 = run(sampler_8, 5.0)
    np.testing.assert_allclose(at_5, run(_sampler(nets, 8, progress_every=3, guidance_scale=5.0)),
                               atol=2e-5)
    assert np.max(np.abs(at_5 - at_2)) > 1e-3
    run(sampler_8, 3.0)
    assert sampler_8.num_traces == traces  # w = 2, 5, 3: the same program
    at_0 = run(sampler_8, 0.0)
    assert sampler_8.num_traces == traces + 1 and np.max(np.abs(at_0 - at_2)) > 1e-3


def test_8_devices_equal_1_device(nets, sampler_8):
    _, params, _, classifier_params = nets
    labels = np.arange(BATCH) % 3
    a8 = sampler_8(params, jax.random.key(0), {"label": labels},
                   classifier_params=classifier_params)
    a1 = _sampler(nets, 1, progress_every=0)(params, jax.random.key(0), {"label": labels},
                                             classifier_params=classifier_params)
    np.testing.assert_allclose(a1, a8, atol=DEVICE_TOLERANCE, rtol=0)


class _LabelledStub(nn.Module):
    """A 2-channel stand-in for a conditional UNet with a learned variance: [mean, variance]
    channels that both depend on the label y ∈ {0, .., num_classes} (num_classes = null)."""

    num_classes: int = 3
    cond_fields = ("label",)

    @nn.compact
    def __call__(self, x, t, cond, *, train: bool):
        del train
        w = self.param("w", nn.initializers.normal(1.0), (self.num_classes + 1,))
        w_y = w[cond["label"]].reshape(-1, 1, 1, 1)
        return jnp.concatenate([w_y * x + t.reshape(-1, 1, 1, 1) / 100, w_y + x**2], axis=-1)


def test_guided_model_fn_is_one_batched_cfg_call():
    """ε̃ = (1 + w) ε(x, y) - w ε(x, ∅) on the mean channel, from one call on [x; x] with labels
    [y; ∅]; the learned variance channel is the conditional one."""
    model = _LabelledStub()
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    t, y = jnp.asarray([0, 5, 20, 49]), jnp.asarray([0, 1, 2, 1])
    params = model.init(jax.random.key(1), x, t, {"label": y}, train=False)["params"]
    apply = lambda labels: model.apply({"params": params}, x, t, {"label": labels}, train=False)
    guided = sampling_lib.guided_model_fn(model, params, {"label": y}, 2.0)(x, t)
    cond, uncond = apply(y), apply(jnp.full_like(y, 3))
    np.testing.assert_allclose(guided[..., :1], 3 * cond[..., :1] - 2 * uncond[..., :1],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(guided[..., 1:], cond[..., 1:])
    assert np.max(np.abs(cond - uncond)) > 1e-2
    np.testing.assert_array_equal(
        sampling_lib.guided_model_fn(model, params, {"label": y}, 0.0)(x, t), cond)


# --- labels and config ---------------------------------------------------------------------------

def test_parse_labels():
    np.testing.assert_array_equal(sampling_lib.parse_labels("", 6, 3), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(sampling_lib.parse_labels("7", 3, 10), [7, 7, 7])
    np.testing.assert_array_equal(sampling_lib.parse_labels("1,4,7", 5, 10), [1, 4, 7, 1, 4])
    assert sampling_lib.parse_labels("", 4, 0) is None


BAD_SAMPLE = [
    ({"sample.labels": "10"}, "sample.labels='10' must be"),
    ({"sample.labels": "a,b"}, "sample.labels='a,b' must be"),
    ({"model.num_classes": 0, "diffusion.p_uncond": 0.0, "sample.labels": "3"},
     "the model is unconditional"),
    ({"sample.classifier_scale": -1.0}, "sample.classifier_scale=-1.0 must be >= 0"),
    ({"sample.classifier_scale": 1.0, "classifier.num_classes": 5},
     "model.num_classes=10 != classifier.num_classes=5"),
    ({"sample.progress_every": -1}, "sample.progress_every=-1"),
    ({"sample.sampler": "dpm_solver"}, "sample.sampler='dpm_solver'"),
    ({"sample.spacing": "uniform"}, r"sample.spacing='uniform' is not supported. Fix: use one of "
     r"\('linspace', 'leading', 'trailing'\)"),
    ({"sample.sampler": "dpm_solver_pp_2m", "sample.spacing": "trailing"},
     "sample.spacing='trailing' does not apply to sample.sampler='dpm_solver_pp_2m', which always "
     "uses its own 'logsnr' timesteps. Fix: leave sample.spacing at its default 'linspace'"),
]


@pytest.mark.parametrize("overrides,message", BAD_SAMPLE, ids=[m for _, m in BAD_SAMPLE])
def test_bad_sample_config_is_rejected(overrides, message):
    config = tiny.get_config()
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=8)


def test_classifier_config_checks():
    config = mnist_classifier.get_config()
    config_lib.validate_classifier(config, num_devices=1)
    # The classifier config keeps mnist.py's diffusion model, so one workdir serves both.
    assert config.diffusion == mnist.get_config().diffusion
    assert config.model == mnist.get_config().model
    config = tiny.get_config()
    config_lib.validate_classifier(config, num_devices=8)
    config.classifier.num_groups = 3
    with pytest.raises(config_lib.ConfigError, match="classifier.num_groups=3 does not divide"):
        config_lib.validate_classifier(config, num_devices=8)
    config.classifier.num_groups, config.classifier.batch_size = 4, 12
    with pytest.raises(config_lib.ConfigError, match="classifier.batch_size=12"):
        config_lib.validate_classifier(config, num_devices=8)


# --- the modes end to end ----------------------------------------------------------------------

def _cli(workdir, mode, *overrides):
    """main.py on the tiny config in a 1-device subprocess; returns its log."""
    return cli_runs.run(workdir, *overrides, num_devices=1, mode=mode).stderr


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir with a tiny diffusion checkpoint (random weights) and a classifier trained for 4
    steps by `--mode=train_classifier`, then resumed to 6."""
    workdir = tmp_path_factory.mktemp("models")
    config = tiny.get_config()
    model = train_lib.create_model(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    optimizer = train_lib.create_optimizer(config_lib.optim_args(config))
    shapes = jax.eval_shape(lambda key: train_lib.init_state(
        model, optimizer, key, image_shape), jax.random.key(0))
    # In the state's own dtypes (the step and Adam's count are integers), as restored: the
    # checkpoint's digest is over the arrays as saved.
    state = jax.tree.map(lambda r, a: r.astype(a.dtype), _random_like(shapes, 0), shapes)
    ckpt = checkpointing.Checkpointer(str(workdir), max_to_keep=1)
    ckpt.save(1, state, {"step": 1}, force=True)
    ckpt.wait_until_finished()
    ckpt.close()

    log = _cli(workdir, "train_classifier")
    assert "step 4/4" in log and "acc" in log and "steps/s" in log
    resumed = _cli(workdir, "train_classifier", "--config.classifier.num_steps=6")
    assert "Resumed the classifier from step 4" in resumed and "step 6/6" in resumed
    return workdir


def test_train_classifier_checkpoints_and_evaluates(trained_workdir):
    directory = trained_workdir / "classifier"
    steps = sorted(int(p.name) for p in (directory / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6
    result = json.loads((directory / "eval.json").read_text())
    assert result["step"] == 6 and result["split"] == "test"
    assert set(result["accuracy_by_timestep"]) == {"0", "25", "50", "75"}
    assert all(0.0 <= a <= 1.0 for a in result["accuracy_by_timestep"].values())


def test_sample_mode_with_classifier_guidance_and_labels(trained_workdir, caplog):
    caplog.set_level(logging.INFO)
    config = tiny.get_config()
    config.sample.sampler = "dpm_solver_pp_2m"
    config.sample.classifier_scale = 2.0
    config.sample.labels = "3,7"
    config.sample.progress_every = 2
    paths = generate.generate(config, str(trained_workdir))
    assert paths["png"].endswith("samples_step1_dpm_solver_pp_2m5_w0_s2.png")
    assert os.path.exists(paths["png"])
    data = np.load(paths["npz"])
    assert data["images"].shape == (16, 28, 28, 1) and data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["labels"], np.resize([3, 7], 16))
    # Progress after each chunk of 2 steps: steps 2, 4 and 5 of 5.
    lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    assert [line.split(" | ")[0] for line in lines] == [
        f"sampling: step {k}/5" for k in (2, 4, 5)], lines
    assert all("img/s" in line and "ETA" in line for line in lines)


def _counting_make_sampler(monkeypatch) -> list:
    """Patches sampling_lib.make_sampler to record each call; returns the record."""
    calls, make = [], sampling_lib.make_sampler
    monkeypatch.setattr(sampling_lib, "make_sampler",
                        lambda *a, **k: calls.append(k) or make(*a, **k))
    return calls


def test_guidance_sweep_writes_accuracy_per_scale(trained_workdir, monkeypatch):
    """The code path of the MNIST CFG-accuracy check (here on an untrained model, so the numbers
    mean nothing): samples per class and scale, judged by evaluation.mnist_classifier; one
    sampler serves every scale."""
    config = tiny.get_config()
    config.sample.sweep_scales = (0.0, 3.0)
    config.sample.sweep_per_class = 1
    made = _counting_make_sampler(monkeypatch)
    result = generate.guidance_sweep(config, str(trained_workdir))
    assert len(made) == 1
    written = json.loads((trained_workdir / "guidance_sweep.json").read_text())
    assert written == result
    assert set(result["accuracy"]) == {"0", "3"}
    for scale in ("0", "3"):
        assert 0.0 <= result["accuracy"][scale] <= 1.0
        assert len(result["accuracy_per_class"][scale]) == 10
        np.testing.assert_allclose(np.mean(result["accuracy_per_class"][scale]),
                                   result["accuracy"][scale])


def test_text_eval_of_a_class_conditional_model_judges_every_scale(trained_workdir,
                                                                    monkeypatch):
    """--mode=text_eval's code path on the tiny class-conditional model (random weights, so the
    numbers mean nothing): one row of judged numbers per scale, from one sampler."""
    import text_eval

    config = tiny.get_config()
    config.eval.feature_net = "mnist_classifier"
    config.eval.text_num_prompts = 16
    config.sample.sweep_scales = (0.0, 2.0, 4.0)
    made = _counting_make_sampler(monkeypatch)
    result = text_eval.text_eval(config, str(trained_workdir))
    assert len(made) == 1
    assert result["conditioned_on"] == "label (attributes unused)"
    assert set(result["scales"]) == {"0", "2", "4"}
    rows = list(result["scales"].values())
    assert all(np.isfinite(v) for row in rows for v in row.values())
    assert rows[0] != rows[1]  # another scale, other samples
    assert json.loads((trained_workdir / "text_eval.json").read_text()) == result


def test_restoring_without_a_checkpoint_names_the_fix(tmp_path):
    """Sampling or guiding from a workdir that holds no checkpoint: one error that says what to
    do, and the read-only restore creates no checkpoint directory."""
    config = tiny.get_config()
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*Fix: train first"):
        train_lib.restore_params(config, str(tmp_path))
    config.sample.classifier_scale = 2.0
    with pytest.raises(FileNotFoundError, match=r"No classifier checkpoint in .*"
                       r"classifier_scale=2.0. Fix: train one first"):
        classifier_training.restore_classifier(config, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# --- a sampler registered in one place reaches the CLI -----------------------------------------

def _traced_ddim(record):
    """A sampler step for the test to register: DDIM's, recording each respaced index it runs."""

    def step(ctx, state, i, key):
        jax.debug.callback(lambda i: record.append(int(i)), i)  # once per device: unordered
        return samplers.SAMPLERS["ddim"].step(ctx, state, i, key)

    return step


def test_a_sampler_registered_in_one_place_is_reachable_from_the_cli(trained_workdir):
    """`samplers.register` is the only edit: --config.sample.sampler=<name> then passes validation,
    becomes the spec, and main's --mode=sample dispatch runs its step (5 steps, chunks of 2) and
    writes the images DDIM writes, under the new name."""
    import main  # the CLI's mode table; its flags are defined, not parsed

    name = "test_traced_ddim"
    config = tiny.get_config()
    config.sample.sampler = name
    config.sample.progress_every = 2
    with pytest.raises(config_lib.ConfigError, match=f"sample.sampler='{name}' is not supported"):
        config_lib.validate(config, num_devices=jax.device_count())
    record = []
    samplers.register(name)(_traced_ddim(record))
    try:
        config_lib.validate(config, num_devices=jax.device_count())
        assert config_lib.sampler_spec(config).sampler == name
        paths = main.MODES["sample"](config, str(trained_workdir))
    finally:
        samplers.unregister(name)
    jax.effects_barrier()
    assert paths["png"].endswith(f"samples_step1_{name}5_w0.png") and os.path.exists(paths["png"])
    # One batch of 16, the respaced indices K-1..0, each step run once (on every device).
    assert sorted(set(record)) == [0, 1, 2, 3, 4]
    assert len({record.count(i) for i in range(5)}) == 1
    config.sample.sampler = "ddim"
    ddim = generate.generate(config, str(trained_workdir))
    np.testing.assert_array_equal(np.load(paths["npz"])["images"], np.load(ddim["npz"])["images"])


def test_heun_from_the_cli(trained_workdir):
    """main.py --mode=sample --config.sample.sampler=heun on the tiny config (trailing spacing):
    5 steps, 9 network evaluations."""
    log = _cli(trained_workdir, "sample", "--config.sample.sampler=heun",
               "--config.sample.spacing=trailing")
    assert "heun, 5 steps (9 network evaluations)" in log
    assert (trained_workdir / "samples_step1_heun5_w0.png").exists()
