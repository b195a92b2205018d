"""Orbax checkpoints of the train state: periodic async saves, keep-N, resume from the latest.

A checkpoint directory holds two items:
  state/  the TrainState pytree (step, params, ema_params, opt_state) as arrays (no pickles);
  meta/   JSON: the step, the data position (examples consumed) and the config.

Orbax writes each step into a temporary directory and renames it when it is complete, so a job
killed mid-save leaves no directory that `latest_step` would take for a good checkpoint.
"""

import json
import os
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """One CheckpointManager per workdir (`workdir/checkpoints`)."""

    def __init__(self, workdir: str, *, max_to_keep: int, save_interval_steps: int = 1,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=True,
            read_only=read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save; returns whether one was started."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_meta(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def restore_latest(workdir: str, abstract_state: Any, *,
                   missing: Callable[[str], str]) -> tuple[Any, int]:
    """(state, step) of the latest checkpoint of `workdir`, opened read-only, for sampling/eval.

    Raises FileNotFoundError(missing(checkpoint directory)) when there is none: the message says
    what to do about it.
    """
    ckpt = Checkpointer(workdir, max_to_keep=1, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(missing(ckpt.directory))
        state, _ = ckpt.restore(step, abstract_state)
    finally:
        ckpt.close()
    return state, step


def config_to_json(config) -> str:
    """The config as JSON text (tuples become lists), for checkpoints and TensorBoard."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
