"""Configs: each file builds and validates; each bad value is rejected before any compile."""

import importlib
import math

import jax
import jax.numpy as jnp
import pytest

import config_lib
import train_lib
from configs import cifar, lsun256, mnist_classifier, tiny


@pytest.mark.parametrize("name", ["default", "cifar", "mnist", "tiny", "celeba64", "lsun256"])
def test_every_config_validates(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    config_lib.validate(config, num_devices=1)
    kwargs = config_lib.model_kwargs(config)
    assert kwargs["out_ch"] == config.data.num_channels


def test_cifar_is_the_paper_setting():
    c = cifar.get_config()
    assert (c.diffusion.num_timesteps, c.diffusion.schedule, c.diffusion.prediction,
            c.diffusion.var_type) == (1000, "linear", "eps", "fixed_large")
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert (c.train.batch_size, c.train.num_steps, c.train.ema_decay) == (128, 800_000, 0.9999)
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks,
            tuple(c.model.attn_resolutions), c.model.dropout) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert c.data.random_flip


@pytest.mark.parametrize("warmup", [0, 100])
def test_the_cosine_decay_is_the_closed_form(warmup):
    config = tiny.get_config()
    config.optim.update(lr=2e-3, warmup_steps=warmup, decay_steps=1500, end_lr=1e-4)
    lr = train_lib.learning_rate_fn(config_lib.optim_args(config))
    for step in [0, 50, 100, 101, 700, 1499, 1500, 2000]:
        if step < warmup:
            want = 2e-3 * step / warmup
        else:
            progress = min(step - warmup, 1500 - warmup) / (1500 - warmup)
            want = 1e-4 + (2e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(lr(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step
    config.optim.decay_steps = 0  # the default: DDPM's warmup, then constant
    lr = train_lib.learning_rate_fn(config_lib.optim_args(config))
    assert float(lr(2000)) == pytest.approx(2e-3)


def test_lsun256_is_the_papers_256_model_with_diffusers_parameter_count():
    c = lsun256.get_config()
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks,
            tuple(c.model.attn_resolutions), c.model.dropout) == (128, (1, 1, 2, 2, 4, 4), 2,
                                                                  (16,), 0.0)
    assert (c.data.image_size, c.train.batch_size, c.optim.lr) == (256, 64, 2e-5)
    model = train_lib.create_model(c)
    shapes = jax.eval_shape(lambda: model.init(  # shapes only: 114M parameters never allocated
        jax.random.key(0), jnp.zeros((1, 256, 256, 3)), jnp.zeros((1,), jnp.int32),
        {}, train=False))["params"]
    # diffusers 0.42.1 UNet2DModel (google/ddpm-church-256's architecture: block_out_channels
    # (128, 128, 256, 256, 512, 512), layers_per_block 2, AttnDownBlock2D / AttnUpBlock2D at
    # 16x16, mid-block attention), sum(p.numel() for p in model.parameters()), computed once
    # in a scratch venv with torch 2.13.0; the same script gives 35,746,307 for CIFAR-10.
    # The paper reports 114M.
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(shapes)) == 113_673_219


def test_hyper_sweep_overrides_existing_fields():
    for overrides in cifar.get_hyper():
        config = cifar.get_config()
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            assert field in config[section], dotted
            config[section][field] = value
        config_lib.validate(config, num_devices=1)


BAD = [
    ("diffusion.schedule", "quadratic", "diffusion.schedule='quadratic'"),
    ("diffusion.prediction", "score", "diffusion.prediction='score'"),
    ("diffusion.var_type", "learned", "diffusion.var_type='learned'"),
    ("diffusion.loss_type", "hybrid", "needs diffusion.var_type='learned_range'"),
    ("diffusion.var_type", "learned_range", "only trained by the bound term"),
    ("diffusion.num_timesteps", 10, "diffusion.num_timesteps=10"),
    ("diffusion.t_sampling", "sobol", "diffusion.t_sampling='sobol'"),
    ("optim.lr", -1e-4, "optim.lr=-0.0001 must be positive"),
    ("optim.decay_steps", 2, "optim.decay_steps=2 must be 0 (no decay) or past the warmup's end"),
    ("optim.decay_steps", 4, "train.num_steps=6 runs past optim.decay_steps=4, where the "
     "learning rate has decayed to optim.end_lr=0"),
    ("optim.end_lr", 0.1, "optim.end_lr=0.1 must be in [0, optim.lr=0.001]"),
    ("train.batch_size", 12, "train.batch_size=12 is not a positive multiple of the 8 devices. "
     "Fix: use a multiple of 8, or run on fewer devices (on a CPU: "
     "XLA_FLAGS=--xla_force_host_platform_device_count=1)."),
    ("train.ema_decay", 1.5, "train.ema_decay=1.5"),
    ("train.log_every", 3, "train.log_every=3 must be a non-negative multiple"),
    ("data.name", "", "data.name is empty"),
    ("data.image_size", 32, "data.name='mnist_5k' has 28x28x1 images"),
    ("model.num_groups", 3, "model.num_groups=3 does not divide"),
    ("model.attn_resolutions", (5,), "model.attn_resolutions contains 5"),
    ("model.dtype", "float16", "model.dtype='float16'"),
    ("model.num_classes", 0, "diffusion.p_uncond=0.1 drops class labels"),
    ("sample.sampler", "euler", "sample.sampler='euler'"),
    ("sample.num_steps", 5000, "sample.num_steps=5000"),
    ("train.sample_num_steps", 5000, "train.sample_num_steps=5000"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_rejected_before_compiling(field, value, message, tmp_path, monkeypatch):
    config = tiny.get_config()
    config.train.steps_per_dispatch = 2 if field == "train.log_every" else 1
    config.train.sample_every = 2 if field == "train.sample_num_steps" else 0
    section, name = field.split(".")
    config[section][name] = value
    compiled = []
    monkeypatch.setattr(train_lib.jax, "jit", lambda *a, **k: compiled.append(a))
    with pytest.raises(config_lib.ConfigError) as info:
        train_lib.train(config, str(tmp_path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not compiled, "a bad config reached jax.jit"
    assert not (tmp_path / "checkpoints").exists()


def test_the_classifier_steps_per_dispatch_must_divide_its_intervals():
    config = mnist_classifier.get_config()
    config.classifier.steps_per_dispatch = 2
    config_lib.validate_classifier(config, num_devices=1)  # 2000, 50 and 500 are multiples
    assert config_lib.classifier_train_args(config).steps_per_dispatch == 2
    config.classifier.steps_per_dispatch = 3
    with pytest.raises(config_lib.ConfigError, match=r"classifier.num_steps=2000 must be a "
                       r"non-negative multiple of classifier.steps_per_dispatch=3\. Fix:"):
        config_lib.validate_classifier(config, num_devices=1)
