"""Test-wide setup: 8 fake CPU devices and a shared compilation cache, set before anything
imports jax.

Most of the suite's time is XLA compiling small programs, and many tests build the same program
again (the tiny UNet's init, train step and sampler, a fresh `jax.jit` per test or per call).
The persistent compilation cache that the `main.py` subprocesses of tests/cli_runs.py share
serves the in-process tests too, so a program compiles once per test session, whichever test,
worker or subprocess builds it first.
"""

import os

from cli_runs import cache_env

# LLVM's optimisation passes off (unless DDPM_TEST_XLA_OPT=1 or XLA_FLAGS chooses a level): the
# suite compiles hundreds of small programs and runs each for a few steps, so compiling is most
# of its time. The programs are the same HLO, fused the same way, calling the same library
# kernels (YNNPACK, Eigen convolutions) as users' at XLA's default level; only the element-wise
# code XLA emits itself is less optimised. docs/performance.md has the measurement.
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("DDPM_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
    os.environ["DDPM_TEST_UNOPTIMIZED"] = "1"  # gaussian_oracle.fast_jit undoes it per program
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _name, _value in cache_env().items():
    os.environ.setdefault(_name, _value)

import cpu_runtime  # noqa: E402  (after XLA_FLAGS above, before jax)

cpu_runtime.configure()  # the tests run the XLA flags and allocator users get
