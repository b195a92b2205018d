"""A damaged newest checkpoint: training and sampling fall back to the newest one that restores
and move the damaged one aside (never delete it); what orbax verifies by itself, and what the
per-checkpoint digest adds."""

import json
import logging
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from checkpoint_fixtures import abstract_state, copy_workdir, host, tiny_config, write_checkpoints
from cli_runs import hold_lock_in_another_process

import checkpointing
import train_lib

STEPS = (40, 50, 60)
DAMAGE = ("truncated_array_files", "garbage_in_meta_metadata", "garbage_in_state_METADATA",
          "one_changed_float")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Checkpoints 40, 50, 60 of the tiny config, and their states on the host."""
    workdir = tmp_path_factory.mktemp("pristine")
    config = tiny_config()
    states = write_checkpoints(workdir, config, STEPS)
    return workdir, config, {step: host(state) for step, state in states.items()}


def _change_one_float(step_dir) -> None:
    """One parameter moved by one ulp, written the way orbax writes (tensorstore's zarr over
    OCDBT): what silent corruption of an array chunk looks like to a reader."""
    spec = {"driver": "zarr", "path": "params.conv_in.kernel/",
            "kvstore": {"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}}
    array = ts.open(spec).result()
    value = array.read().result()
    value.flat[7] = np.nextafter(value.flat[7], np.float32(np.inf))
    array.write(value).result()


def damage(step_dir, kind: str) -> None:
    """Damages the checkpoint in `step_dir` in one of the DAMAGE ways."""
    if kind == "garbage_in_meta_metadata":
        (step_dir / "meta" / "metadata").write_text("{not json")
    elif kind == "garbage_in_state_METADATA":
        (step_dir / "state" / "_METADATA").write_text("{not json")
    elif kind == "truncated_array_files":  # each data file cut to half its size
        for path in (step_dir / "state" / "ocdbt.process_0" / "d").glob("*"):
            os.truncate(path, path.stat().st_size // 2)
    else:
        _change_one_float(step_dir)


def test_orbax_restores_changed_array_bytes_silently(pristine, tmp_path):
    """The finding behind the digest: orbax and tensorstore check JSON, the OCDBT index and
    that chunks lie inside their files, not the array values. A changed float restores as the
    changed float, without an error; the digest catches it."""
    source, config, states = pristine
    workdir = copy_workdir(source, tmp_path / "w")
    damage(workdir / "checkpoints" / "60", "one_changed_float")
    manager = ocp.CheckpointManager(workdir / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=("state", "meta"))
    restored = manager.restore(60, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state(config))))["state"]
    manager.close()
    got = host(restored).params["conv_in"]["kernel"]
    want = states[60].params["conv_in"]["kernel"]
    assert np.flatnonzero(got != want).tolist() == [7]  # orbax returned it as it was written
    ckpt = checkpointing.Checkpointer(str(workdir), max_to_keep=3, read_only=True)
    try:
        with pytest.raises(checkpointing.CheckpointDamagedError, match="do not match the SHA-256"):
            ckpt.restore(60, abstract_state(config))
    finally:
        ckpt.close()


@pytest.mark.parametrize("kind", DAMAGE)
def test_training_falls_back_past_a_damaged_checkpoint(pristine, tmp_path, kind, caplog):
    source, config, states = pristine
    workdir = copy_workdir(source, tmp_path / "w")
    damage(workdir / "checkpoints" / "60", kind)
    config.train.num_steps = 50  # resumes at 50: nothing left to train, so nothing compiles
    with caplog.at_level(logging.WARNING):
        state = train_lib.train(config, str(workdir))
    assert int(state.step) == 50
    for got, want in zip(jax.tree.leaves(host(state)), jax.tree.leaves(states[50]), strict=True):
        np.testing.assert_array_equal(got, want)
    # Moved aside, whole, not deleted; orbax no longer sees it.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["40", "50"]
    aside = workdir / "checkpoints_damaged" / "60"
    assert (aside / "state").is_dir() and (aside / "meta").is_dir()
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"Checkpoint 60 in {workdir / 'checkpoints' / '60'} does not restore" in warnings
    assert f"moved it to {aside}" in warnings


def test_sampling_falls_back_and_moves_aside_only_when_no_training_runs(pristine, tmp_path):
    source, config, states = pristine
    workdir = copy_workdir(source, tmp_path / "w")
    damage(workdir / "checkpoints" / "60", "garbage_in_state_METADATA")
    holder = hold_lock_in_another_process(workdir)
    try:  # a training holds the workdir: sample from 50, leave 60 where it is
        _, params, step = train_lib.restore_params(config, str(workdir), use_ema=False)
        assert step == 50
        for got, want in zip(jax.tree.leaves(host(params)), jax.tree.leaves(states[50].params),
                             strict=True):
            np.testing.assert_array_equal(got, want)
        assert sorted(os.listdir(workdir / "checkpoints")) == ["40", "50", "60"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    _, _, step = train_lib.restore_params(config, str(workdir))  # no training: moved aside
    assert step == 50
    assert sorted(os.listdir(workdir / "checkpoints")) == ["40", "50"]
    assert (workdir / "checkpoints_damaged" / "60" / "state").is_dir()


def test_when_no_checkpoint_restores_nothing_is_moved(pristine, tmp_path):
    source, config, states = pristine
    workdir = copy_workdir(source, tmp_path / "w")
    for step in STEPS:
        damage(workdir / "checkpoints" / str(step), "garbage_in_meta_metadata")
    config.train.num_steps = 50
    with pytest.raises(checkpointing.CheckpointDamagedError) as info:
        train_lib.train(config, str(workdir))
    message = str(info.value)
    assert "\n" not in message and "Fix:" in message
    assert all(f"step {step}: JSONDecodeError" in message for step in STEPS)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["40", "50", "60"]
    assert not (workdir / "checkpoints_damaged").exists()


def test_an_unfinished_save_is_never_used_and_is_cleaned_up(pristine, tmp_path):
    """What a SIGKILL during a save leaves: a temporary directory (its digest, in the same
    commit, never finished). The trainer resumes from the newest finished one and removes it."""
    source, config, _ = pristine
    workdir = copy_workdir(source, tmp_path / "w")
    killed = workdir / "checkpoints" / "70.orbax-checkpoint-tmp"
    (killed / "state").mkdir(parents=True)
    (killed / "state" / "_METADATA").write_text("{")  # half written
    config.train.num_steps = 60
    state = train_lib.train(config, str(workdir))
    assert int(state.step) == 60
    assert not killed.exists()


def test_a_checkpoint_without_a_digest_restores_with_a_warning(pristine, tmp_path, caplog):
    """Checkpoints written before digests were saved: restored, and said to be unverified."""
    source, config, states = pristine
    workdir = copy_workdir(source, tmp_path / "w")
    meta_file = workdir / "checkpoints" / "60" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["state_sha256"]
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        _, _, step = train_lib.restore_params(config, str(workdir))
    assert step == 60
    assert "has no digest" in caplog.text


def test_the_digest_covers_every_leaf_and_its_place():
    state = {"a": np.arange(3, dtype=np.float32), "b": np.zeros((2,), np.int32)}
    digest = checkpointing.state_digest(state)
    assert digest == checkpointing.state_digest({k: v.copy() for k, v in state.items()})
    changed = {"a": state["a"].copy(), "b": state["b"]}
    changed["a"][1] = np.nextafter(changed["a"][1], np.float32(2))  # one ulp
    assert checkpointing.state_digest(changed) != digest
    swapped = {"a": state["b"], "b": state["a"]}
    assert checkpointing.state_digest(swapped) != digest
    assert checkpointing.state_digest({"a": state["a"].astype(np.int32), "b": state["b"]}) \
        != digest
