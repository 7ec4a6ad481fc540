"""Test-wide setup: CPU only, 8 fake host devices for the sharding tests.

The environment must be set before jax is first imported anywhere, hence module level here.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
