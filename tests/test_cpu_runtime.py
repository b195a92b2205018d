"""cpu_runtime: the XLA-CPU flags, device count and allocator settings that main.py applies."""

import ctypes
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import cpu_runtime

ROOT = Path(__file__).resolve().parents[1]


def _env(overrides: dict[str, str | None] | None) -> dict[str, str]:
    """os.environ with `overrides` applied (None removes the variable)."""
    env = dict(os.environ)
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _python(code: str, *args: str, env: dict[str, str | None] | None = None) -> str:
    """stdout of `python -c code args` in the repo root, environment `_env(env)`."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=True, cwd=ROOT, env=_env(env)).stdout


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_large_blocks():
    """A 64 MB block comes from the heap (below the program break), not from a fresh mmap."""
    code = (
        "import ctypes, sys, cpu_runtime\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p\n"
        "libc.sbrk.argtypes = (ctypes.c_long,)\n"
        "applied = cpu_runtime.keep_freed_memory() if sys.argv[1] == '1' else None\n"
        "p = libc.malloc(64 << 20)\n"
        "print(applied, p < libc.sbrk(0))\n"
    )

    assert _python(code, "1").split() == ["True", "True"]  # applied; the block is in the heap
    assert _python(code, "0").split() == ["None", "False"]  # glibc maps a 64 MB block on its own


def test_keep_freed_memory_is_a_no_op_without_mallopt(monkeypatch):
    def no_libc(*args, **kwargs):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert cpu_runtime.keep_freed_memory() is False


_CONV_HLO = (
    "import sys, cpu_runtime\n"
    "print(cpu_runtime.add_xla_cpu_flags())\n"
    "import jax, jax.numpy as jnp\n"
    "x = jnp.ones((8, 16, 16, 32)); w = jnp.ones((3, 3, 32, 32))\n"
    "conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',\n"
    "    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
    "hlo = jax.jit(conv).lower(x, w).compile().as_text()\n"
    "print('ynn_fusion' not in hlo)\n"
)


def _run_conv_probe(xla_flags: str) -> list[str]:
    return _python(_CONV_HLO, env={"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}).split()


@pytest.mark.skipif(importlib.metadata.version("jaxlib") not in cpu_runtime.TESTED_JAXLIB,
                    reason="the flag is only added for the jaxlib versions it was measured on")
def test_xla_flags_take_convolutions_out_of_ynnpack():
    """With the flag XLA keeps the 3x3 conv as a plain convolution (its Eigen path)."""
    added, plain_conv = _run_conv_probe("")
    assert added == "True" and plain_conv == "True"
    # A user's own choice of YNN fusion types is left alone: jaxlib's default fuses the conv.
    stock = "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    added, plain_conv = _run_conv_probe(stock)
    assert added == "False" and plain_conv == "False"


def test_xla_flags_skipped_for_untested_jaxlib(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    assert cpu_runtime.add_xla_cpu_flags() is False
    assert "XLA_FLAGS" not in os.environ


def test_inference_compiler_options(monkeypatch):
    """Forward-only programs get YNN's element-wise fusion too, unless the user chose YNN types,
    the jaxlib is untested or the backend is not the CPU; XLA accepts the option."""
    import jax

    jax.devices()  # jax's CPU client starts with the suite's XLA_FLAGS, not the ones patched below
    monkeypatch.setenv("XLA_FLAGS", " ".join(cpu_runtime.XLA_CPU_FLAGS))
    options = cpu_runtime.inference_compiler_options()
    if importlib.metadata.version("jaxlib") in cpu_runtime.TESTED_JAXLIB:
        assert options == {"xla_cpu_experimental_ynn_fusion_type":
                           cpu_runtime.INFERENCE_YNN_FUSION_TYPES}
        fn = jax.jit(lambda x: jax.nn.relu(x) * 2, compiler_options=options)
        np_out = jax.device_get(fn(jax.numpy.arange(-2.0, 2.0)))
        assert list(np_out) == [0.0, 0.0, 0.0, 2.0]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+"
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
    assert cpu_runtime.inference_compiler_options() == {}
    monkeypatch.setenv("XLA_FLAGS", " ".join(cpu_runtime.XLA_CPU_FLAGS))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cpu_runtime.inference_compiler_options() == {}
    monkeypatch.undo()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    assert cpu_runtime.inference_compiler_options() == {}


def test_split_cpu_into_devices(monkeypatch):
    """Two devices where there are two cores; the user's own count, and one core, left alone."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setattr(cpu_runtime, "usable_cores", lambda: 16)
    assert cpu_runtime.split_cpu_into_devices() == cpu_runtime.CPU_DEVICES == 2
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert cpu_runtime.split_cpu_into_devices() == 0  # once only
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"

    users = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=1"
    monkeypatch.setenv("XLA_FLAGS", users)
    assert cpu_runtime.split_cpu_into_devices() == 0
    assert os.environ["XLA_FLAGS"] == users
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert cpu_runtime.split_cpu_into_devices() == 2
    assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x "
                                       "--xla_force_host_platform_device_count=2")

    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "3")
    assert cpu_runtime.split_cpu_into_devices() == 0
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES")
    monkeypatch.setattr(cpu_runtime, "usable_cores", lambda: 1)
    assert cpu_runtime.split_cpu_into_devices() == 0
    assert "XLA_FLAGS" not in os.environ


# A user's environment: no CPU device count of their own (the tests run with 8).
_AS_USERS_START = {"XLA_FLAGS": None, "JAX_NUM_CPU_DEVICES": None, "JAX_PLATFORMS": "cpu"}


def test_configure_gives_jax_the_devices():
    """In a fresh process jax sees min(2, cores) CPU devices after configure(), one with
    configure(split_cpu=False) (main.py --multihost)."""
    code = ("import sys, cpu_runtime; cpu_runtime.configure(split_cpu=sys.argv[1] == '1')\n"
            "import jax; print(jax.device_count())")
    expected = min(cpu_runtime.CPU_DEVICES, cpu_runtime.usable_cores())
    assert int(_python(code, "1", env=_AS_USERS_START)) == expected
    assert int(_python(code, "0", env=_AS_USERS_START)) == 1


_RESTART = (
    "import os, cpu_runtime\n"
    "restarted = cpu_runtime.restart_with_huge_page_malloc()\n"
    "print(restarted, os.environ.get('GLIBC_TUNABLES'))\n"
)


def _run_restart_probe(tunables: str | None) -> str:
    return _python(_RESTART, env={"GLIBC_TUNABLES": tunables})


def test_restart_with_huge_page_malloc_adds_the_tunable_once(monkeypatch):
    """The program runs once more with the tunable added to the user's; never twice; opt-out."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)  # as in the probe without tunables
    if not cpu_runtime.huge_page_malloc_would_help():
        assert _run_restart_probe(None) == "False None\n"
        return
    assert _run_restart_probe(None) == "False glibc.malloc.hugetlb=1\n"
    assert (_run_restart_probe("glibc.malloc.tcache_count=7")
            == "False glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1\n")
    assert _run_restart_probe("glibc.malloc.hugetlb=0") == "False glibc.malloc.hugetlb=0\n"


_THREAD_ALLOC = (
    "import ctypes, threading\n"
    "libc = ctypes.CDLL('libc.so.6')\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "def work():\n"
    "    p = libc.malloc(96 << 20)\n"
    "    ctypes.memset(p, 1, 96 << 20)\n"
    "    print([l.split()[1] for l in open('/proc/self/smaps_rollup') if 'AnonHuge' in l][0])\n"
    "threading.Thread(target=work).start()\n"
)


@pytest.mark.skipif(not os.path.exists(cpu_runtime.THP_MODE_FILE)
                    or "[madvise]" not in open(cpu_runtime.THP_MODE_FILE).read(),
                    reason="the tunable acts in THP mode 'madvise' only")
def test_huge_page_tunable_backs_a_threads_large_buffer():
    """What the restart is for: a 96 MB buffer of a non-main thread gets huge pages with the
    tunable, none without (glibc mmaps it afresh on every allocation)."""
    def anon_huge_kb(tunables):
        return int(_python(_THREAD_ALLOC, env={"GLIBC_TUNABLES": tunables}))

    assert anon_huge_kb("glibc.malloc.hugetlb=0") == 0
    assert anon_huge_kb(cpu_runtime.MALLOC_TUNABLE) > 0


def test_main_runs_on_the_split_cpu(tmp_path):
    """main.py as a user starts it (no device count in XLA_FLAGS) sees min(2, cores) devices; here
    it stops at once, naming the missing checkpoint."""
    env = _env(_AS_USERS_START)
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--mode=sample"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    expected = min(cpu_runtime.CPU_DEVICES, cpu_runtime.usable_cores())
    assert proc.returncode == 1
    assert f"process 0/1, {expected} devices (cpu)." in proc.stderr
    assert "No checkpoint in" in proc.stderr
