"""CPU runtime settings that make the UNet beat PyTorch on a laptop CPU (measured: README).

Three settings applied by `configure()` before jax creates its CPU client (main.py, the benchmarks
and the tests call it first thing: sections 1, 2 and 4), and one that needs a fresh process
(section 3):

1. XLA flags (`XLA_CPU_FLAGS`). jaxlib 0.10's CPU backend hands convolutions, dots, reductions
   and some fused element-wise work to its YNNPACK library by default. We keep YNNPACK for dots
   and reductions only (an exact list, which replaces the default): XLA's other convolution path
   (Eigen) is much faster for the DDPM UNet's 3x3 convolutions, above all for the weight
   gradient, and the rest of the default set slowed the small UNet's forward pass. Measured on
   2 cores (AMD EPYC, AVX-512), small UNet at batch 64: training step 1026 -> 704 ms, forward
   244 -> 142 ms; CIFAR-10 model at batch 16: training step 2376 -> ~1900 ms, forward ~500 ms
   either way (7% slower than with only convolutions taken out of YNNPACK, the one place this
   choice costs). It is an *experimental* XLA flag, and XLA aborts on flags it does not know, so
   it is only added for the jaxlib versions it was measured on (`TESTED_JAXLIB`), and never when
   XLA_FLAGS already chooses YNN fusion types; to get jaxlib's own default back, run with
   XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION
   (adding what the default already has). GPUs and TPUs ignore the flag.

   Programs without gradients (sampling, likelihood evaluation) are compiled with one more YNN
   fusion type, element-wise work (`inference_compiler_options()`, passed to `jax.jit`): the
   3x3 convolutions then run inside YNNPACK fusions together with the GroupNorm + swish before
   them and the bias / residual adds after them (a 3x3 conv + bias at the small UNet's shapes:
   ~390 GFLOP/s against Eigen's ~300; the small UNet's forward pass at batch 64: 129 -> 117 ms).
   Training keeps the global list: the same option made the gradient step 10% slower.

2. Keep freed host buffers in the process so XLA-CPU does not page-fault them in again.

glibc hands every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) a fresh
`mmap`, and gives it back to the kernel on free. XLA-CPU allocates each intermediate activation
anew on every step, so every step touched megabytes of new, zeroed pages: a 25 MB copy took
7.9 ms instead of 1.1 ms, and the small UNet's forward pass at batch 256 spent ~12% of its time
in page faults. `keep_freed_memory()` turns off mmap for allocations and trimming of the heap,
so the buffers of one step are reused by the next. Peak memory is unchanged; the process simply
does not return its high-water mark to the kernel until it exits.

`keep_freed_memory()` is a no-op on other C libraries (macOS, musl).

3. Transparent huge pages for malloc (`restart_with_huge_page_malloc()`).

glibc gives a thread other than the main one its own arena, and an arena serves a request above
64 MiB with a fresh `mmap` whatever `keep_freed_memory()` says. XLA-CPU's temporary buffer for one
training step of the small UNet at batch 64 is such a request (~940 MB, allocated by the thread
that runs the program), so every step page-faulted ~230,000 fresh 4 KiB pages. One arena for all
threads (M_ARENA_MAX=1) ends the faults but serialises the threads on its lock (slower still).
glibc's tunable `glibc.malloc.hugetlb=1` backs malloc's memory with 2 MiB transparent huge pages
where the kernel's THP mode is "madvise" (the usual default): the same buffer then faults ~500
times. Small UNet training step 703 -> 540 ms (91 -> 118 img/s), forward at batch 256 ~7%
faster; the CIFAR-10 model's training step at batch 16 was the exception on one device, 1934 ->
2106 ms (not understood), but not on the two devices of section 4 (1918 -> 1868 ms). Tunables
are read when a process starts, so the entry points (main.py, the benchmarks) call
`restart_with_huge_page_malloc()` before anything else: it re-executes the same command line
with the tunable added to GLIBC_TUNABLES, once. It does nothing when GLIBC_TUNABLES already
mentions glibc.malloc.hugetlb (set glibc.malloc.hugetlb=0 to opt out), off Linux / glibc < 2.35,
or when THP is "always" (already on) or "never". Library code never restarts anything.

4. Two XLA devices on a CPU with two or more cores (`split_cpu_into_devices()`).

XLA-CPU runs one program per device and splits each operation of it over the cores. Two programs
side by side, each on half the batch, run the UNet faster than one (likely because its ~150
operations per forward pass are small at these image sizes, and each split over the cores pays for
the hand-off). The trainer, the samplers and the evaluators already shard the batch over a
data-parallel mesh of all devices, so `--xla_force_host_platform_device_count=2` is all it takes.
Measured on 2 cores (each row the same command with one and with two devices): small UNet forward at
batch 64 129 -> 107 ms, at batch 256 520 -> 474 ms; 50-step DDIM of 64 images 6.53 -> 5.52 s;
CIFAR-10 model training step at batch 16 2122 -> 1884 ms (and with two devices the huge pages of
section 3 no longer slow it), forward at batch 64 2118 -> 2042 ms; the small UNet's training step at
batch 64 is unchanged on average (531 / 533 ms; bimodal with two devices on our VM, see the README).
Four devices on the same 2 cores were slower than two (DDIM 5.77 s); machines with more cores were
not measured, so the count stays at `CPU_DEVICES` = 2. What it costs: batch sizes must be even
(config_lib.validate says so before any work), and each device holds its own copy of the replicated
training state (the CIFAR-10 model: ~0.6 GB more). Nothing is added for main.py --multihost
(`configure(split_cpu=False)`), or when XLA_FLAGS already sets a device count or JAX_NUM_CPU_DEVICES
is set: XLA_FLAGS=--xla_force_host_platform_device_count=1 gives the single device back. GPUs and
TPUs are unaffected (the flag only shapes the host platform).
"""

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys

TESTED_JAXLIB = ("0.10.2",)
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
INFERENCE_YNN_FUSION_TYPES = YNN_FUSION_TYPES + ",LIBRARY_FUSION_TYPE_ELTWISE"
XLA_CPU_FLAGS = (f"--xla_cpu_experimental_ynn_fusion_type={YNN_FUSION_TYPES}",)
CPU_DEVICES = 2
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

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


def add_xla_cpu_flags() -> bool:
    """Append `XLA_CPU_FLAGS` to XLA_FLAGS (see the module doc). Returns True when added.

    Must run before jax creates its CPU client (the first computation or device query); after
    that XLA has already read XLA_FLAGS.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or not _tested_jaxlib():
        return False
    os.environ["XLA_FLAGS"] = " ".join([flags, *XLA_CPU_FLAGS]).strip()
    return True


def inference_compiler_options() -> dict[str, str]:
    """`jax.jit(..., compiler_options=...)` for CPU programs that take no gradient (module doc).

    Empty (XLA's settings apply unchanged) off the CPU, on untested jaxlib versions, and when
    XLA_FLAGS chooses YNN fusion types other than ours.
    """
    import jax  # here: configure() must be able to run before anything imports jax

    flags = os.environ.get("XLA_FLAGS", "")
    ours = "ynn_fusion_type" not in flags or all(f in flags.split() for f in XLA_CPU_FLAGS)
    if not ours or not _tested_jaxlib() or jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": INFERENCE_YNN_FUSION_TYPES}


def _tested_jaxlib() -> bool:
    try:
        return importlib.metadata.version("jaxlib") in TESTED_JAXLIB
    except importlib.metadata.PackageNotFoundError:
        return False


def restart_with_huge_page_malloc() -> bool:
    """Re-execute this program with `MALLOC_TUNABLE` in GLIBC_TUNABLES (module doc, section 3).

    Call it first thing in a program's entry point, before other imports: output printed before
    it would be printed twice. Returns False when nothing needs doing; otherwise it does not
    return (the process image is replaced; the PID, arguments and environment stay).
    """
    if not huge_page_malloc_would_help():
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, MALLOC_TUNABLE]))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def huge_page_malloc_would_help() -> bool:
    """glibc >= 2.35 on Linux, THP mode "madvise", and GLIBC_TUNABLES silent on hugetlb."""
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        glibc = tuple(int(v) for v in version.split(".")[:2])
        with open(THP_MODE_FILE) as f:
            mode = f.read()
    except (AttributeError, ValueError, OSError):  # not glibc, or no THP in this kernel
        return False
    return sys.platform == "linux" and name == "glibc" and glibc >= (2, 35) and "[madvise]" in mode


def split_cpu_into_devices() -> int:
    """Give XLA `CPU_DEVICES` CPU devices, at most one per usable core (module doc, section 4).

    Returns the device count added to XLA_FLAGS, 0 when nothing was added. Like
    `add_xla_cpu_flags`, it must run before jax creates its CPU client. A count given inside an
    XLA --flagfile is not seen (set it in XLA_FLAGS or JAX_NUM_CPU_DEVICES instead).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags or "JAX_NUM_CPU_DEVICES" in os.environ:
        return 0
    count = min(CPU_DEVICES, usable_cores())
    if count < 2:
        return 0
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
    return count


def usable_cores() -> int:
    """The cores this process may run on by its affinity mask (os.cpu_count() where the OS has
    none). A cgroup CPU quota is not read: a container limited to one core of a larger machine
    still gets two devices."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure(split_cpu: bool = True) -> None:
    """Sections 1, 2 and 4 of this module; call before jax's first computation.

    split_cpu=False leaves the CPU device count alone (main.py's --multihost: several processes on
    one machine would each take two devices, and hosts with different core counts would disagree).
    """
    add_xla_cpu_flags()
    keep_freed_memory()
    if split_cpu:
        split_cpu_into_devices()
