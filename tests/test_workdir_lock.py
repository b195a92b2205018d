"""One training per workdir (workdir_lock.py), with real processes: the second stops at once
naming the first, a crashed owner's lock is taken over, readers are never blocked, and the
processes of a multi-host run stop together."""

import json
import logging
import os
import signal
import socket
import subprocess
import time

from checkpoint_fixtures import tiny_config, write_checkpoints
from cli_runs import REPO, cli, env, hold_lock_in_another_process, wait_for_checkpoint

import train_lib
import workdir_lock


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_two_trainings_started_together_one_trains_the_other_stops_at_once(tmp_path):
    """The issue's case: seeds 0 and 1 started together on one workdir."""
    workdir = tmp_path / "w"
    logs = [open(tmp_path / f"stderr{i}", "w+") for i in range(2)]
    procs = [subprocess.Popen(cli(workdir, "--config.train.num_steps=400", f"--config.seed={i}"),
                              env=env(8), cwd=REPO, stdout=subprocess.DEVNULL, stderr=logs[i],
                              text=True) for i in range(2)]
    try:
        deadline = time.time() + 180
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        logs[loser].seek(0)
        err = logs[loser].read()
        assert procs[loser].returncode == 1, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            f"error: --workdir={workdir} is in use by another training (pid {winner.pid} on host "
            f"{socket.gethostname()}, started ")
        assert "Traceback" not in err and "Compiling" not in err  # stopped before compiling
        # The winner is untouched: it saves, stops cleanly, and every checkpoint is its own.
        wait_for_checkpoint(workdir, winner, min_step=2)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        for f in logs:
            f.close()
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps
    for step in steps:  # every checkpoint is the winner's (its seed), none the loser's
        meta = json.loads((step / "meta" / "metadata").read_text())
        assert json.loads(meta["config"])["seed"] == 1 - loser
    assert (workdir / workdir_lock.LOCK_FILE).read_text() == ""  # released


def test_a_crashed_owners_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = hold_lock_in_another_process(tmp_path)
    _kill(holder)  # SIGKILL: the kernel drops the flock, the file keeps its content
    path = tmp_path / workdir_lock.LOCK_FILE
    assert json.loads(path.read_text())["pid"] == holder.pid
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert lock.acquire()
    assert f"of pid {holder.pid} on host {socket.gethostname()}" in caplog.text
    assert "that process is gone" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert path.read_text() == ""


def test_a_held_lock_refuses_a_second_owner_in_one_line(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        lock = workdir_lock.WorkdirLock(str(tmp_path))
        assert lock.acquire(blocking_message=False) is False
        try:
            lock.acquire()
            raise AssertionError("a held lock was acquired")
        except workdir_lock.WorkdirBusyError as e:
            assert f"pid {holder.pid}" in str(e) and "\n" not in str(e) and "Fix:" in str(e)
    finally:
        _kill(holder)


def test_reading_a_workdir_while_it_trains_is_not_blocked(tmp_path):
    """sample / eval / figures take no lock: they read the finished checkpoints."""
    write_checkpoints(tmp_path, tiny_config(), [2])
    holder = hold_lock_in_another_process(tmp_path)
    try:
        _, _, step = train_lib.restore_params(tiny_config(), str(tmp_path))
        assert step == 2
    finally:
        _kill(holder)


def test_multihost_processes_all_stop_when_the_workdir_is_busy(tmp_path):
    """Only process 0 locks; all learn the outcome from one broadcast, so none waits on a
    collective that another has left."""
    holder = hold_lock_in_another_process(tmp_path)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        cli(tmp_path, "--multihost", f"--coordinator_address=localhost:{port}",
            "--num_processes=2", f"--process_id={i}"),
        env=env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        _kill(holder)
    assert [p.returncode for p in procs] == [1, 1], outputs[0][-2000:] + outputs[1][-2000:]
    assert f"is in use by another training (pid {holder.pid}" in outputs[0]
    assert "process 0 could not lock" in outputs[1]
    assert all("Traceback" not in out for out in outputs)
