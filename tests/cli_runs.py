"""main.py as a user runs it, in a subprocess: the command line, its environment, a run.

The runs compile the same tiny train step many times; a persistent compilation cache shared by
the subprocesses of one session compiles it once per device count (`cache=False` for a test
that needs the compilation to take its time).
"""

import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("DDPM_TEST_CACHE", "/tmp/ddpm_jax_test_compile_cache"))


def cache_env() -> dict:
    """The persistent compilation cache every test process shares, caching every program."""
    return {"JAX_COMPILATION_CACHE_DIR": str(CACHE),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def env(num_devices: int = 8, *, cache: bool = True, **extra: str) -> dict:
    out = dict(os.environ)
    if cache:
        out.update(cache_env())
    else:
        out.pop("JAX_COMPILATION_CACHE_DIR", None)
    # The suite's own XLA flags (e.g. --xla_cpu_max_isa=AVX2 to time it as on an older CPU)
    # reach main.py; only the device count is the run's.
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    out["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={num_devices}"])
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONUNBUFFERED"] = "1"
    out.update(extra)
    return out


def cli(workdir, *overrides, mode="train", config="configs/tiny.py") -> list[str]:
    return [sys.executable, str(REPO / "main.py"), f"--config={REPO / config}",
            f"--workdir={workdir}", f"--mode={mode}", *overrides]


def run(workdir, *overrides, num_devices=8, mode="train", timeout=240, check=True,
        environment: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(workdir, *overrides, mode=mode),
                          env=environment or env(num_devices), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wait_for_checkpoint(workdir, proc, min_step: int, timeout: float = 240.0) -> int:
    """Polls until a finished checkpoint >= min_step exists; returns its step."""
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()]
        done = [s for s in steps if s >= min_step]
        if done:
            return max(done)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.01)
    raise TimeoutError("no checkpoint appeared")


def wait_for_line(stream, needle: str, timeout: float = 240.0) -> list[str]:
    """Reads `stream` (a text pipe) until a line contains `needle`; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    for line in stream:
        lines.append(line)
        if needle in line:
            return lines
        if time.time() > deadline:
            break
    raise AssertionError(f"{needle!r} never appeared:\n" + "".join(lines[-30:]))


def hold_lock_in_another_process(workdir) -> subprocess.Popen:
    """Another process holding the workdir's training lock, as a running training does; it
    holds it until killed."""
    code = ("import sys, time, workdir_lock\n"
            "workdir_lock.WorkdirLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc
