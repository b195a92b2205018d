"""The config a checkpoint was trained with against the command line's: pinned fields stop a
resume with one line before anything is built, free ones are logged; sampling, evaluation and
the guidance sweep use the stored model and diffusion settings."""

import json
import logging

import pytest
from checkpoint_fixtures import tiny_config, write_checkpoints

import checkpointing
import classifier_training
import config_compat
import config_lib
import generate
import train_lib
from config_compat import CLASSIFIER_RULES, DIFFUSION_RULES, FREE, ON_OFF, PINNED


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir whose checkpoint 2 was saved with configs/tiny.py's values."""
    workdir = tmp_path_factory.mktemp("trained")
    write_checkpoints(workdir, tiny_config(), [2])
    return workdir


@pytest.mark.parametrize("field, rules, expected", [
    ("model.ch", DIFFUSION_RULES, PINNED),
    ("model.text_encoder", DIFFUSION_RULES, PINNED),      # a field added later: by its section
    ("model.remat", DIFFUSION_RULES, FREE),
    ("diffusion.some_new_schedule_knob", DIFFUSION_RULES, PINNED),
    ("data.caption_key", DIFFUSION_RULES, PINNED),
    ("data.data_dir", DIFFUSION_RULES, FREE),
    ("optim.grad_clip", DIFFUSION_RULES, ON_OFF),
    ("optim.lr", DIFFUSION_RULES, FREE),
    ("optim.weight_decay", DIFFUSION_RULES, PINNED),     # unknown optimiser field: may add state
    ("train.batch_size", DIFFUSION_RULES, PINNED),
    ("train.num_steps", DIFFUSION_RULES, FREE),
    ("seed", DIFFUSION_RULES, PINNED),
    ("sample.new_sampler_order", DIFFUSION_RULES, FREE),
    ("eval.fid_num_samples", DIFFUSION_RULES, FREE),
    ("text.encoder", DIFFUSION_RULES, PINNED),           # a new section
    ("classifier.ch", CLASSIFIER_RULES, PINNED),
    ("classifier.num_steps", CLASSIFIER_RULES, FREE),
    ("model.ch", CLASSIFIER_RULES, FREE),
    ("diffusion.num_timesteps", CLASSIFIER_RULES, PINNED),
])
def test_fields_are_classified_by_rule(field, rules, expected):
    assert config_compat.kind(field, rules) == expected


PINNED_CHANGES = [
    ("model.ch", 16, "model.ch: 8 -> 16"),
    ("diffusion.num_timesteps", 50, "diffusion.num_timesteps: 100 -> 50"),
    ("optim.grad_clip", 0.0, "optim.grad_clip: 1.0 -> 0.0"),
    ("data.random_flip", True, "data.random_flip: False -> True"),
    ("train.batch_size", 32, "train.batch_size: 16 -> 32"),
    ("model.ch_mult", (1, 2, 2), "model.ch_mult: '(1,)' -> '(1, 2, 2)'"),
]


@pytest.mark.parametrize("field, value, change", PINNED_CHANGES, ids=[c[0] for c in PINNED_CHANGES])
def test_resume_with_a_pinned_change_stops_before_anything_is_built(trained, field, value, change,
                                                                      monkeypatch):
    config = tiny_config(**{field: value})
    compiled = []
    monkeypatch.setattr(train_lib.jax, "jit", lambda *a, **k: compiled.append(a))
    with pytest.raises(config_compat.ConfigMismatchError) as info:
        train_lib.train(config, str(trained))
    message = str(info.value)
    assert change in message and "\n" not in message
    assert f"checkpoint 2 in {trained / 'checkpoints'}" in message
    assert "Fix: resume with the stored values (--config." in message
    assert "or train in a new --workdir" in message
    assert not compiled


def test_a_changed_seed_is_refused_too(trained):
    config = tiny_config()
    config.seed = 1
    with pytest.raises(config_compat.ConfigMismatchError, match="seed: 0 -> 1"):
        config_compat.check_resume(config, str(trained))


def test_free_changes_are_allowed_and_logged(trained, caplog):
    config = tiny_config(**{"train.num_steps": 400, "optim.lr": 1e-4, "sample.num_steps": 7,
                            "optim.grad_clip": 0.5, "model.remat": True})  # clipping stays on
    with caplog.at_level(logging.INFO):
        config_compat.check_resume(config, str(trained))
    for change in ("train.num_steps: 6 -> 400", "optim.lr: 0.001 -> 0.0001",
                   "sample.num_steps: 5 -> 7", "optim.grad_clip: 1.0 -> 0.5",
                   "model.remat: False -> True"):
        assert change in caplog.text


def test_a_field_missing_from_an_old_checkpoint_counts_as_its_default():
    stored = config_compat.flatten(json.loads(checkpointing.config_to_json(tiny_config())))
    del stored["model.num_heads"]  # as if saved before the field existed (default 4)
    assert config_compat.differences(stored, tiny_config(), DIFFUSION_RULES) == ([], [])
    pinned, _ = config_compat.differences(stored, tiny_config(**{"model.num_heads": 2}),
                                          DIFFUSION_RULES)
    assert pinned == [("model.num_heads", 4, 2)]


def test_sampling_uses_the_stored_model_and_diffusion_settings(trained, caplog):
    config = tiny_config(**{"model.ch": 16, "diffusion.num_timesteps": 50})
    with caplog.at_level(logging.WARNING):
        model, _, step = train_lib.restore_params(config, str(trained))
        used = config_compat.trained_config(config, str(trained))
    assert (model.ch, step) == (8, 2)
    assert (used.model.ch, used.diffusion.num_timesteps) == (8, 100)
    assert "model.ch=8 (command line: 16)" in caplog.text
    assert "diffusion.num_timesteps=100 (command line: 50)" in caplog.text
    config_lib.validate(used, num_devices=8)  # a copy that is still a valid config


def test_guidance_sweep_refuses_a_model_trained_without_the_null_label(tmp_path):
    write_checkpoints(tmp_path, tiny_config(**{"diffusion.p_uncond": 0.0}), [2])
    with pytest.raises(config_lib.ConfigError) as info:
        generate.guidance_sweep(tiny_config(), str(tmp_path))  # the command line says 0.1
    assert f"the model in {tmp_path} was trained with model.num_classes=10, " \
           f"diffusion.p_uncond=0.0" in str(info.value)
    assert not (tmp_path / "guidance_sweep.json").exists()


def test_classifier_resume_and_use_are_checked(tmp_path, monkeypatch):
    directory = tmp_path / "classifier"
    write_checkpoints(directory, tiny_config(), [2])  # only its config matters here
    monkeypatch.setattr(train_lib.jax, "jit", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(config_compat.ConfigMismatchError, match="classifier.ch: 8 -> 16"):
        classifier_training.train_classifier(tiny_config(**{"classifier.ch": 16}),
                                             str(tmp_path))
    # Guiding a model with another number of timesteps than the classifier was trained on.
    config = tiny_config(**{"diffusion.num_timesteps": 50, "sample.classifier_scale": 1.0})
    with pytest.raises(config_compat.ConfigMismatchError,
                       match=r"diffusion.num_timesteps: 100 -> 50 \(stored -> the model's\)"):
        classifier_training.restore_classifier(config, str(tmp_path))
