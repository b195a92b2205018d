"""host_memory.keep_freed_memory: glibc keeps freed buffers, so big buffers are not re-faulted."""

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import host_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_large_blocks():
    """A freed 64 MB block comes back at the same address instead of a fresh mmap."""
    code = (
        "import ctypes, host_memory\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = (ctypes.c_void_p,)\n"
        "import sys; applied = host_memory.keep_freed_memory() if sys.argv[1] == '1' else None\n"
        "mm = open('/proc/self/maps').read().count('\\n')\n"
        "p = libc.malloc(64 << 20); maps = open('/proc/self/maps').read().count('\\n')\n"
        "libc.free(p); q = libc.malloc(64 << 20)\n"
        "print(applied, p == q, maps - mm)\n"
    )
    tuned = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True,
                           check=True, cwd=ROOT).stdout.split()
    assert tuned[0] == "True"
    assert tuned[1] == "True"  # the block is reused
    assert int(tuned[2]) == 0  # and it came from the heap, not a new mapping
    plain = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True,
                           check=True, cwd=ROOT).stdout.split()
    assert int(plain[2]) >= 1  # without the call, glibc maps the 64 MB block on its own


def test_keep_freed_memory_is_a_no_op_without_mallopt(monkeypatch):
    def no_libc(*args, **kwargs):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert host_memory.keep_freed_memory() is False
