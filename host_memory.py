"""Keep freed host buffers in the process so XLA-CPU does not page-fault them in again.

glibc hands every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) a fresh
`mmap`, and gives it back to the kernel on free. XLA-CPU allocates each intermediate activation
anew on every step, so every step touched megabytes of new, zeroed pages: a 25 MB copy took
7.9 ms instead of 1.1 ms, and the small UNet's forward pass at batch 256 spent ~12% of its time
in page faults. `keep_freed_memory()` turns off mmap for allocations and trimming of the heap,
so the buffers of one step are reused by the next. Peak memory is unchanged; the process simply
does not return its high-water mark to the kernel until it exits.

Call it once, before the first large allocation (main.py and the benchmarks do). It is a no-op
on other C libraries (macOS, musl).
"""

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Disable glibc's mmap allocations and heap trimming. Returns True when applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # 2**31 - 1 bytes is the largest value the int argument takes; trimming then never happens
    # in practice because the heap top is rarely that much free memory.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
