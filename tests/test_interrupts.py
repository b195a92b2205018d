"""SIGINT (Ctrl-C) and SIGTERM sent to a real main.py process (interrupts.py): training saves
at the next step and exits 0, a second Ctrl-C aborts at once, a stop while XLA compiles or
before main() starts is honoured without waiting for anything."""

import pathlib
import signal
import subprocess
import time

import pytest
from cli_runs import REPO, cli, env, wait_for_checkpoint, wait_for_line

import train_lib
from configs import tiny


def _start(workdir, *flags, cache=True, mode="train") -> subprocess.Popen:
    return subprocess.Popen(cli(workdir, *flags, mode=mode), env=env(8, cache=cache), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_saves_at_the_next_step_and_exits_0(tmp_path):
    proc = _start(tmp_path, "--config.train.num_steps=400")
    wait_for_checkpoint(tmp_path, proc, min_step=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT received: saving a checkpoint at the next step boundary" in err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    saved = int(err.split("Preempted: saved step ")[1].split(";")[0])
    assert "exiting cleanly (SIGINT)" in err
    config = tiny.get_config()
    config.train.num_steps = 400
    _, _, step = train_lib.restore_params(config, str(tmp_path))
    assert step == saved < 400


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    proc = _start(tmp_path, "--config.train.num_steps=400")
    wait_for_checkpoint(tmp_path, proc, min_step=2)
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc.stderr, "SIGINT received")  # the first one was handled: now the second
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130
    assert "error: second Ctrl-C (SIGINT): aborting at once, nothing saved." in rest
    assert "Preempted" not in rest and "Traceback" not in rest


def test_sigterm_while_the_train_step_compiles_stops_at_once(tmp_path):
    """No compilation cache, so the compilation takes its ~20 s: the stop does not wait for it
    (the state is the restored or initial one: nothing to save)."""
    proc = _start(tmp_path, "--config.train.num_steps=400", cache=False)
    wait_for_line(proc.stderr, "Compiling the train step")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 0, rest[-3000:]
    assert "SIGTERM received: stopped before this run's first step: nothing new to save." in rest
    assert "step 2/400" not in rest and "Traceback" not in rest  # before the first step
    assert not [p for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]


def _signals_caught(pid: int) -> int:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))
               .split()[1], 16)


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("mode, code", [("train", 0), ("sample", 128 + signal.SIGTERM)])
def test_sigterm_right_after_start_is_handled(tmp_path, mode, code):
    """The handler is installed before the imports: a SIGTERM then is not a bare -15 death but
    a clean stop (training: exit 0; other modes: 143), with one line and no traceback."""
    proc = _start(tmp_path, mode=mode)
    deadline = time.time() + 60
    while not _signals_caught(proc.pid) & (1 << (signal.SIGTERM - 1)):  # handler installed
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("SIGTERM received: stopped")
    assert "Traceback" not in err
