"""One training per workdir: an exclusive lock file, `<workdir>/training.lock`.

The trainer (`--mode=train`, and `--mode=train_classifier` on its classifier directory) holds
an `fcntl.flock` on the open lock file for as long as it runs; the kernel releases it when the
process ends in any way (exit, crash, SIGKILL), so a lock is never left behind by a dead
process. The file holds the owner's host, pid and start time, for the message a second run
prints:

  error: --workdir=W is in use by another training (pid 4711 on host gpu3, started
  2026-12-01 21:40:11 UTC; lock file W/training.lock). Fix: wait for it or stop it, or use
  another --workdir.

A file whose content names an owner that no longer holds the lock (the owner was killed, or its
host went away) is stale: it is taken over with a warning that names the old owner. The file is
never deleted (only emptied on release), so a second process cannot lock a fresh file while a
first still holds the old one.

Read-only modes (sample, eval, guidance_sweep, figures) take no lock: they may read the
checkpoints of a running training (orbax only lists finished checkpoints). Where they would
change the workdir (moving a damaged checkpoint aside) they do it only if `try_lock` succeeds.

Multi-host runs: only process 0 locks; every process learns the outcome from one broadcast, so
that all stop together when the workdir is busy (no process waits on a collective that another
left).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging

from errors import UserError

LOCK_FILE = "training.lock"


class WorkdirBusyError(UserError):
    """Another training holds the workdir."""


class WorkdirNotWritableError(UserError):
    """The workdir cannot be created or written (read-only, under a file, no permission)."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
            f"{owner.get('started', '?')}")


def _read_owner(fd: int) -> dict | None:
    """The owner recorded in the lock file, None when it is empty (released) or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "started": f"? (unreadable content {text[:60]!r})"}
    return owner if isinstance(owner, dict) else None


def _process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # exists but is not ours (or unreadable pid): assume alive
    return True


def not_writable(workdir: str, error: OSError) -> WorkdirNotWritableError:
    """The one-line error for a workdir that cannot be created or written."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    where = f" ({error.filename})" if error.filename else ""
    fixes = {errno.ENOTDIR: "a part of that path is a file: choose a directory path",
             errno.EEXIST: "that path is a file: choose a directory path",
             errno.EROFS: "the file system is read-only: use a writable --workdir",
             errno.ENOSPC: "the disk is full: free space, or use a --workdir on another disk"}
    fix = fixes.get(error.errno, "use a --workdir you can write to (check its permissions)")
    return WorkdirNotWritableError(
        f"--workdir={workdir} cannot be written: {reason}{where}. Fix: {fix}.")


def _open(workdir: str) -> int:
    try:
        os.makedirs(workdir, exist_ok=True)
        return os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only, under a file, no permission, full disk
        raise not_writable(workdir, e) from e


class WorkdirLock:
    """The lock of one workdir, held by this process between `acquire` and `release`."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self, *, blocking_message: bool = True) -> bool:
        """Takes the lock; returns False if another process holds it (then raises
        WorkdirBusyError instead when blocking_message)."""
        fd = _open(self.workdir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd) or {}
            os.close(fd)
            if not blocking_message:
                return False
            raise WorkdirBusyError(
                f"--workdir={self.workdir} is in use by another training ({_describe(owner)}; "
                f"lock file {self.path}). Fix: wait for it to finish or stop it, or use another "
                f"--workdir.") from None
        stale = _read_owner(fd)
        if stale is not None:
            here = stale.get("host") == socket.gethostname()
            gone = ("that process is gone" if here and not _process_alive(stale.get("pid"))
                    else "it no longer holds the lock (killed, or its host went away)")
            logging.warning("Taking over the stale lock %s of %s: %s.", self.path,
                            _describe(stale), gone)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_owner()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty = released; the file stays (see module doc)
        except OSError as e:
            logging.warning("Could not empty the lock file %s: %s", self.path, e)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _all_processes_agree(ok: bool) -> bool:
    """Process 0's `ok`, broadcast to every process of a multi-process run."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[WorkdirLock | None]:
    """The workdir locked for one training (process 0 of a multi-process run locks for all)."""
    lock = WorkdirLock(workdir)
    failed: UserError | None = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UserError as e:  # busy or not writable: every process must stop, not only 0
            failed = e
    if not _all_processes_agree(failed is None):
        raise failed or WorkdirBusyError(
            f"--workdir={workdir}: process 0 could not lock {lock.path} (its message says why: "
            f"another training, or a workdir it cannot write). Fix: see process 0's error.")
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def try_lock(workdir: str) -> Iterator[bool]:
    """For read-only modes: whether the workdir could be locked (no training runs there); held
    while inside. Never creates the workdir."""
    lock = WorkdirLock(workdir)
    locked = os.path.isdir(workdir)
    if locked:
        try:
            locked = lock.acquire(blocking_message=False)
        except WorkdirNotWritableError:
            locked = False
    try:
        yield locked
    finally:
        lock.release()
