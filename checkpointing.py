"""Orbax checkpoints of the train state: periodic async saves, keep-N, resume from the newest
checkpoint that restores.

A checkpoint directory `<workdir>/checkpoints/<step>` holds two items:
  state/  the TrainState pytree (step, params, ema_params, opt_state) as arrays (no pickles);
  meta/   JSON: the step, the data position (examples consumed), the config, and the SHA-256
          of the state's arrays (`state_sha256`, see `state_digest`).

What orbax (0.12) and tensorstore verify, and what they do not (tested on this project's
checkpoints, tests/test_checkpoint_damage.py):
* A save is written into `<step>.orbax-checkpoint-tmp` and renamed when every item is
  complete, so a job killed mid-save leaves no directory that is taken for a checkpoint.
* JSON files (meta/metadata, state/_METADATA) must parse; tensorstore's OCDBT manifest and
  b-tree nodes carry checksums; an array chunk must lie inside its data file, so a truncation
  that cuts into referenced data fails to read.
* The array data itself is NOT checksummed: bytes changed inside a data file restore silently
  as other numbers, and a truncation of a data file's unreferenced tail restores bit-identical.
  Hence the digest: computed from the arrays handed to orbax (before the asynchronous write, so
  it describes what is written), saved in the same atomic checkpoint (a save killed before it
  finished has no digest and is never listed), and compared with the restored arrays.

A checkpoint that does not restore (unreadable, or arrays that do not match their digest) is
skipped for the newest one that does, with a warning, and moved aside to
`<workdir>/checkpoints_damaged/` (never deleted) so orbax no longer sees it. A checkpoint is
only called damaged when an older one restores with the same code; if none does, nothing is
moved and the error names them all. A save that fails for lack of space (or a read-only disk)
removes its incomplete temporary directory and stops the run with one line naming the path.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging as pylogging
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import workdir_lock
from errors import MissingFileError, UserError

# orbax splits the save of every replicated array into one slice per replica (a device-to-host
# copy and a chunk write each): 3,655 slices for the tiny config's 463 arrays on 8 devices, ~4 s
# per save on a CPU against ~0.9 s whole (measured, Intel Xeon 2-core VM). Only arrays whose
# slices would hold >= 4 MiB are split; larger states keep the parallel write.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
    from orbax.checkpoint._src.metadata import array_metadata_store  # as orbax's default
    absl_logger = pylogging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(pylogging.ERROR)  # orbax warns that it replaces its default handler
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                array_metadata_store=array_metadata_store.Store(),
                min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()

DAMAGED_DIR = "checkpoints_damaged"
_TMP_GLOB = "*.orbax-checkpoint-tmp*"
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


class NoCheckpointError(MissingFileError):
    """The workdir holds no checkpoint; the message says how to make one."""


class CheckpointDamagedError(UserError):
    """No checkpoint of the workdir restores."""


class CheckpointWriteError(UserError):
    """A save failed because the disk is full or not writable."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _addressable_copy(leaf):
    """One full copy of a (replicated) leaf that this process holds, also on a multi-process run."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise ValueError("state_digest needs replicated arrays on multi-process runs")
        return leaf.addressable_data(0)
    return leaf


def state_digest(state: Any) -> str:
    """SHA-256 over every leaf of `state`: its key path, dtype, shape and bytes, in tree order."""
    flat = jax.tree_util.tree_leaves_with_path(state)
    # one transfer for all the leaves: device_get starts every copy before waiting on any
    host = jax.device_get([_addressable_copy(leaf) for _, leaf in flat])
    digest = hashlib.sha256()
    for (path, _), a in zip(flat, host, strict=True):
        a = np.ascontiguousarray(a)
        digest.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape};".encode())
        digest.update(a.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _os_error_code(error: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or the one tensorstore puts in its
    message ("... No space left on device [os_error_code='28']"), along the exception chain."""
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return error.errno
        found = re.search(r"os_error_code='(\d+)'", str(error))
        if found:
            return int(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def _summary(error: BaseException) -> str:
    """The first line of an error, shortened: orbax's messages embed whole tensorstore specs."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"


class Checkpointer:
    """One CheckpointManager per workdir (`workdir/checkpoints`)."""

    def __init__(self, workdir: str, *, max_to_keep: int, save_interval_steps: int = 1,
                 read_only: bool = False):
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            # Read-only: what orbax would otherwise override, with a warning each.
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else save_interval_steps,
            enable_async_checkpointing=True,
            read_only=read_only,
            create=not read_only,
            # Saves killed mid-way leave <step>.orbax-checkpoint-tmp directories; the trainer
            # holds the workdir lock, so no other process is writing them.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))
        self._saving: int | None = None  # the step of the last save started

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save; returns whether one was started. The digest of the
        arrays is computed here, from the arrays orbax is handed, before they are written."""
        self.wait_until_finished()  # (orbax waits for it too) so that the disk's room is known
        self._check_room(step, state)
        meta = {**meta, "state_sha256": state_digest(state)}
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave(meta)),
                force=force)
        except (OSError, ValueError) as e:  # also a previous async save's (tensorstore: ValueError)
            self._raise_write_error(e, self._saving or step)
            raise
        self._saving = step
        return started

    def _check_room(self, step: int, state: Any) -> None:
        """A save that cannot fit stops before anything is written: the arrays' bytes (this
        process's share) plus ~1 KiB of metadata per array are a lower bound of what orbax
        writes, so this never refuses a save that would have fitted. A disk that fills during
        the write is handled by `_raise_write_error`."""
        leaves = jax.tree.leaves(state)
        needed = (sum(getattr(a, "nbytes", 0) for a in leaves) // jax.process_count()
                  + 1024 * len(leaves))
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:  # not a local path (e.g. gs://): no check
            return
        if free < needed:
            self._raise_write_error(
                OSError(errno.ENOSPC, f"{needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} "
                                      f"MiB free"), step)

    def _raise_write_error(self, error: Exception, step: int) -> None:
        """A full or read-only disk: remove the incomplete save, raise one line. Other errors
        return (the caller re-raises them with their traceback)."""
        code = _os_error_code(error)
        if code not in _WRITE_ERRNOS:
            return
        removed = self._remove_incomplete() if jax.process_index() == 0 else []
        fix = ("free space on that disk (df -h {d}) or move the workdir to a disk with room, "
               "then resume" if code in (errno.ENOSPC, errno.EDQUOT)
               else "make {d} writable, or resume with a --workdir you can write to")
        latest = [s for s in self.all_steps() if s != step]
        detail = f" ({error.strerror})" if isinstance(error, OSError) and error.strerror != \
            os.strerror(code) else ""
        raise CheckpointWriteError(
            f"Saving checkpoint {step} in {self.directory} failed: {os.strerror(code)}{detail}. "
            f"Removed the incomplete save ({', '.join(removed) or 'none left'}); the "
            f"checkpoints before it are intact (latest: {latest[-1] if latest else 'none'}). "
            f"Fix: {fix.format(d=self.directory)}.") from error

    def _remove_incomplete(self, settle_s: float = 0.2, timeout_s: float = 30.0) -> list[str]:
        """Removes the `*.orbax-checkpoint-tmp` directories; returns their names. The first
        failed write is reported while orbax's other writer threads may still be writing into
        the same directory (and recreate it), so this repeats until none has reappeared for
        `settle_s`."""
        if self.read_only:
            return []
        removed: set[str] = set()
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while time.monotonic() < deadline:
            paths = glob.glob(os.path.join(self.directory, _TMP_GLOB))
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
                removed.add(os.path.basename(path))
            now = time.monotonic()
            quiet_since = None if paths else quiet_since or now
            if quiet_since is not None and now - quiet_since >= settle_s:
                break
            time.sleep(0.05)
        return sorted(removed)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` and checks
        the arrays against the digest saved with them."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], dict(restored["meta"])
        want = meta.get("state_sha256")
        if want is None:
            logging.warning("Checkpoint %d in %s has no digest (written before digests were "
                            "saved): its arrays cannot be verified.", step, self.directory)
        elif state_digest(state) != want:
            raise CheckpointDamagedError(
                f"checkpoint {step}: its arrays do not match the SHA-256 saved with them")
        return state, meta

    def restore_meta(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_newest_intact(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest checkpoint that restores, None when there is none;
        the newer ones that do not restore are moved aside (module docstring)."""
        failed: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            # Damage shows as JSON, tensorstore or digest errors, and tensorstore raises a plain
            # Exception for unreadable chunks. Nothing is hidden: a checkpoint is only moved
            # aside when an older one restores with the same code, else all errors are raised.
            except Exception as e:
                logging.warning("Checkpoint %d in %s does not restore (%s); trying the one "
                                "before it.", step, self._step_path(step), _summary(e))
                failed.append((step, e))
                continue
            for bad_step, _ in failed:
                self._set_aside(bad_step)
            return state, meta, step
        if failed:
            errors = "; ".join(f"step {s}: {_summary(e)}" for s, e in failed)
            raise CheckpointDamagedError(
                f"No checkpoint in {self.directory} restores ({errors}). Fix: if these files "
                f"were damaged, move that directory aside to start afresh, or point --workdir "
                f"at another run.") from failed[0][1]
        return None

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _set_aside(self, step: int) -> None:
        """Moves a damaged checkpoint to <workdir>/checkpoints_damaged/ (process 0; a read-only
        user only while no training holds the workdir)."""
        source = self._step_path(step)
        if jax.process_index() != 0 or not os.path.isdir(source):
            return
        if self.read_only:
            with workdir_lock.try_lock(self.workdir) as unlocked:
                if not unlocked:
                    logging.warning("Checkpoint %d in %s is damaged; left in place, since a "
                                    "training holds the workdir.", step, source)
                    return
                self._move(step, source)
        else:
            self._move(step, source)
        self._manager.reload()

    def _move(self, step: int, source: str) -> None:
        aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        os.makedirs(aside, exist_ok=True)
        target, n = os.path.join(aside, str(step)), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(aside, f"{step}-{n}")
        os.rename(source, target)
        logging.warning("Checkpoint %d in %s is damaged: moved it to %s (kept, not deleted); "
                        "using an older checkpoint.", step, source, target)

    def wait_until_finished(self) -> None:
        try:
            self._manager.wait_until_finished()
        except (OSError, ValueError) as e:  # the async save's error: see _raise_write_error
            if self._saving is not None:
                self._raise_write_error(e, self._saving)
            raise

    def close(self) -> None:
        self._manager.close()


def stored_config(workdir: str) -> tuple[int, dict] | None:
    """(step, config as a nested dict) of the newest checkpoint whose meta item reads, or None
    when the workdir has no checkpoint. Reads JSON only: cheap, before anything is built."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    ckpt = Checkpointer(workdir, max_to_keep=1, read_only=True)
    try:
        for step in reversed(ckpt.all_steps()):
            try:
                meta = ckpt.restore_meta(step)
            except (ValueError, OSError) as e:  # garbage or missing: damaged (see above)
                logging.warning("Checkpoint %d in %s: its meta item does not read (%s).", step,
                                ckpt.directory, _summary(e))
                continue
            return (step, json.loads(meta["config"])) if "config" in meta else None
    finally:
        ckpt.close()
    return None


def restore_latest(workdir: str, abstract_state: Any, *,
                   missing: Callable[[str], str]) -> tuple[Any, int]:
    """(state, step) of the newest checkpoint of `workdir` that restores, opened read-only, for
    sampling/eval. Raises NoCheckpointError(missing(checkpoint directory)) when there is none:
    the message says what to do about it."""
    ckpt = Checkpointer(workdir, max_to_keep=1, read_only=True)
    try:
        restored = ckpt.restore_newest_intact(abstract_state)
    finally:
        ckpt.close()
    if restored is None:
        raise NoCheckpointError(missing(ckpt.directory))
    state, _, step = restored
    return state, step


def config_to_json(config) -> str:
    """The config as JSON text (tuples become lists), for checkpoints and TensorBoard."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
