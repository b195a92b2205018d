"""Which config fields a checkpoint pins, and the check of a command line against them.

Every checkpoint's meta item stores the config it was trained with (checkpointing.config_to_json).
Each field is classified by RULES (first matching pattern wins, fnmatch on the dotted name), so
a field added later (model.text_*, data.caption_*, a new sampler field) is classified by its
section without editing a table:

  pinned   changes what the weights or the train state mean (the architecture, the diffusion
           process, the data's shape and classes, the data order, the optimiser state's
           structure): resuming with another value stops with one line listing each field
           `name: stored -> given` and the fix; sampling and evaluation use the stored value.
  on_off   pinned only as "0 / off" vs "on" (optim.grad_clip: clipping adds no state, but
           switching it changes the optimiser state's tree structure).
  free     may change between runs (steps, logging and checkpoint cadence, lr and warmup,
           Adam's β and ε, sampling, evaluation): allowed, and logged.

A field missing from an older stored config counts as equal when the given value equals
configs/default.py's default; a field the current code no longer has is ignored.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from typing import Any

import ml_collections
from absl import logging

import checkpointing
from configs import default
from errors import UserError

PINNED, ON_OFF, FREE = "pinned", "on_off", "free"

# The diffusion model's workdir. "How it is computed" fields of the model (compute dtype,
# rematerialisation) do not change the weights.
DIFFUSION_RULES: tuple[tuple[str, str], ...] = (
    ("model.dtype", FREE),
    ("model.remat", FREE),
    ("model.*", PINNED),
    ("diffusion.*", PINNED),
    ("data.data_dir", FREE),           # where the same data lives on this machine
    ("data.eval_split", FREE),
    ("data.*", PINNED),                # name, split, shape, flips, captions, ...
    ("optim.grad_clip", ON_OFF),
    ("optim.lr", FREE),
    ("optim.warmup_steps", FREE),
    ("optim.decay_steps", FREE),       # the schedule is a function of the step: no state
    ("optim.end_lr", FREE),
    ("optim.beta*", FREE),
    ("optim.eps", FREE),
    ("optim.*", PINNED),               # a new optimiser field may add state: pinned until known
    ("train.batch_size", PINNED),      # the data position is step * batch_size
    ("train.*", FREE),
    ("seed", PINNED),                  # the data order and every training key
    ("sample.*", FREE),
    ("eval.*", FREE),
    ("classifier.*", FREE),            # the classifier has its own directory (below)
    ("*", PINNED),                     # a new section: pinned until classified
)

# The noise-aware classifier's directory (<workdir>/classifier).
CLASSIFIER_RULES: tuple[tuple[str, str], ...] = (
    ("classifier.num_steps", FREE),
    ("classifier.log_every", FREE),
    ("classifier.checkpoint_every", FREE),
    ("classifier.lr", FREE),
    ("classifier.ema_decay", FREE),
    ("classifier.steps_per_dispatch", FREE),
    ("classifier.*", PINNED),          # architecture, classes, batch size, weight decay
    ("diffusion.*", PINNED),           # the classifier is trained on this process's x_t
    ("data.data_dir", FREE),
    ("data.eval_split", FREE),
    ("data.*", PINNED),
    ("seed", PINNED),
    ("model.*", FREE),
    ("optim.*", FREE),
    ("train.*", FREE),
    ("sample.*", FREE),
    ("eval.*", FREE),
    ("*", PINNED),
)


class ConfigMismatchError(UserError):
    """The given config differs from the stored one in a field the checkpoint pins."""


def kind(field: str, rules: Iterable[tuple[str, str]]) -> str:
    for pattern, rule in rules:
        if fnmatch.fnmatchcase(field, pattern):
            return rule
    return PINNED


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"ch": 8}} -> {"model.ch": 8}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as the checkpoint stores it (tuples become lists), flattened."""
    return flatten(json.loads(checkpointing.config_to_json(config)))


def differences(stored: dict[str, Any], config: ml_collections.ConfigDict,
                rules: Iterable[tuple[str, str]]) -> tuple[list, list]:
    """(pinned, free) differences between a stored (flattened) config and `config`, each a list
    of (field, stored value, given value). A field the stored config lacks has its default."""
    given = _as_json(config)
    defaults = _as_json(default.get_config())
    pinned, free = [], []
    for field, value in given.items():
        old = stored.get(field, defaults.get(field, value))
        if old == value:
            continue
        rule = kind(field, rules)
        if rule == PINNED or (rule == ON_OFF and bool(old) != bool(value)):
            pinned.append((field, old, value))
        else:
            free.append((field, old, value))
    return pinned, free


def _show(value) -> str:
    """A value as a --config flag takes it; a stored list is a tuple, "(1,)" when it has one item
    ("(1)" would parse as the number 1)."""
    if not isinstance(value, list):
        return repr(value)
    return "'(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")'"


def _changes(diffs: list) -> str:
    return ", ".join(f"{field}: {_show(old)} -> {_show(new)}" for field, old, new in diffs)


def check_resume(config: ml_collections.ConfigDict, directory: str,
                 rules: Iterable[tuple[str, str]] = DIFFUSION_RULES) -> None:
    """Before a training resumes in `directory`: raises ConfigMismatchError when the config
    differs from the latest checkpoint's in a pinned field; logs the free differences."""
    stored = checkpointing.stored_config(directory)
    if stored is None:
        return
    step, stored_config = stored[0], flatten(stored[1])
    pinned, free = differences(stored_config, config, rules)
    where = f"checkpoint {step} in {checkpointing.checkpoint_dir(directory)}"
    if pinned:
        flags = " ".join(f"--config.{field}={_show(old)}" for field, old, _ in pinned)
        raise ConfigMismatchError(
            f"The config differs from the one {where} was trained with, in fields that change "
            f"what the checkpoint means: {_changes(pinned)}. Fix: resume with the stored values "
            f"({flags}), or train in a new --workdir.")
    if free:
        logging.info("Resuming %s with changed settings (allowed): %s.", where, _changes(free))


def trained_config(config: ml_collections.ConfigDict, directory: str,
                   rules: Iterable[tuple[str, str]] = DIFFUSION_RULES, *,
                   take: tuple[str, ...] | None = None,
                   must_match: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`config` with the pinned fields of the latest checkpoint in `directory`, for sampling
    and evaluation: the model and diffusion settings are those it was trained with, and what
    the command line asked for differently is logged. No checkpoint: `config` itself.

    take: only the pinned fields of these sections are taken (e.g. ("classifier",) for the
    classifier that guides a model); must_match: field patterns outside them that must equal
    the given config's (else ConfigMismatchError), e.g. the diffusion schedule it was trained on.
    """
    stored = checkpointing.stored_config(directory)
    if stored is None:
        return config
    step, stored_config = stored[0], flatten(stored[1])
    pinned, _ = differences(stored_config, config, rules)
    where = f"checkpoint {step} in {checkpointing.checkpoint_dir(directory)}"
    if take is not None:
        clash = [d for d in pinned
                 if any(fnmatch.fnmatchcase(d[0], pattern) for pattern in must_match)]
        if clash:
            raise ConfigMismatchError(
                f"{where} was trained with other settings than the model it is used with: "
                f"{_changes(clash)} (stored -> the model's). Fix: train it again with the "
                f"model's settings, into a new directory (--config.sample.classifier_workdir).")
        pinned = [d for d in pinned if d[0].split(".")[0] in take]
    if not pinned:
        return config
    logging.warning("Using the settings %s was trained with, not the command line's: %s.",
                    where, ", ".join(f"{field}={_show(old)} (command line: {_show(new)})"
                                     for field, old, new in pinned))
    out = config.copy_and_resolve_references()
    with out.unlocked():
        for field, old, _ in pinned:
            *path, name = field.split(".")
            section = out
            for part in path:
                section = section[part]
            section[name] = tuple(old) if isinstance(section[name], tuple) else old
    return out
