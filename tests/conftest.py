"""Test-wide setup: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import cpu_runtime  # noqa: E402  (after XLA_FLAGS above, before jax)

cpu_runtime.configure()  # the tests run the XLA flags and allocator users get
