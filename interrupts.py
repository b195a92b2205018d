"""SIGTERM and Ctrl-C (SIGINT): stop cleanly, keeping what there is to keep.

One process-wide `STOP` (signals are process-wide), installed by main.py before anything else:

* Inside the training loop (after `STOP.defer()`), the first SIGTERM or SIGINT is only recorded; the
  loop saves a checkpoint at the next step boundary and returns, and the process exits 0.
* Anywhere else there is nothing to save (the state equals the latest checkpoint, or sampling
  and evaluation write nothing partial), so the signal raises `Stopped` at once, and main.py
  prints one line and exits. While the train step compiles (20-30 s on a CPU) that is honoured
  too: `run_interruptibly` compiles in a worker thread and the main thread waits, so the
  handler runs at once instead of when XLA returns.
* Until main() has parsed its flags, a signal is recorded and raised there (`raising()`), so
  that the exit code can follow the mode.
* A second SIGINT aborts at once (exit 130, nothing saved); further SIGTERMs are ignored, so a
  save in progress finishes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging


class Stopped(BaseException):
    """SIGTERM/SIGINT where there is nothing to save: unwind (finally blocks run) and exit.

    A BaseException, like KeyboardInterrupt, so that library code catching Exception does not
    swallow it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"{self.signal_name} received")


class StopRequest:
    """The stop requested by SIGTERM or SIGINT, if any (see the module docstring)."""

    def __init__(self):
        self.signum: int | None = None   # the first stop signal received
        self._raise = False              # False: record only (before main(), in the loop)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> bool:
        """Handles SIGTERM and SIGINT from now on; returns False if already installed (or when
        not called from the main thread, where Python cannot install handlers)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return False
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        self.signum = None
        self._raise = False

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.signum is not None:
            if signum == signal.SIGINT:
                os.write(2, b"error: second Ctrl-C (SIGINT): aborting at once, nothing saved.\n")
                os._exit(128 + signal.SIGINT)
            return  # a repeated SIGTERM: the stop is already under way
        self.signum = signum
        if self._raise:
            raise Stopped(signum)
        logging.warning("%s received: saving a checkpoint at the next step boundary, then "
                        "exiting (Ctrl-C again aborts at once, without saving).",
                        self.signal_name)

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise Stopped(self.signum)

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Inside: a stop raises `Stopped` at once (also one that came before)."""
        previous, self._raise = self._raise, True
        try:
            self.raise_if_requested()
            yield
        finally:
            self._raise = previous

    def defer(self) -> None:
        """From here until the enclosing `raising()` block ends (the training loop), a stop is
        only recorded: the loop saves at its next step boundary and returns."""
        self._raise = False

    def any_process(self) -> bool:
        """Whether any process of a multi-process run received a stop (a collective)."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))


STOP = StopRequest()


@contextlib.contextmanager
def handled() -> Iterator[StopRequest]:
    """STOP installed (unless main.py already did) and raising, for one mode's run."""
    installed_here = STOP.install()
    try:
        with STOP.raising():
            yield STOP
    finally:
        if installed_here:
            STOP.uninstall()


def run_interruptibly(fn: Callable[[], Any]) -> Any:
    """fn() in a worker thread while the main thread waits, so that a stop signal is handled
    (and `Stopped` raised) at once rather than when fn returns: Python runs signal handlers only
    in the main thread, between bytecodes, and XLA's compiler holds it for tens of seconds.

    After `Stopped`, the worker may still be compiling: the process must then leave with
    os._exit (main.py does), since interpreter shutdown under a running XLA thread aborts.
    """
    result: dict[str, Any] = {}

    def work():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the main thread below
            result["error"] = e

    worker = threading.Thread(target=work, name="interruptible", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)  # the handler runs (and may raise Stopped) between these waits
    if "error" in result:
        raise result["error"]
    return result["value"]
