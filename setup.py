"""Discovers the packages; the rest is in pyproject.toml.

Packages: every folder with an `__init__.py` under agentinfer_jax/, the data folders under
agentinfer_jax/assets/, plus the top-level kernels/ and configs/, which install as
agentinfer_jax.kernels and agentinfer_jax.configs (pyproject's package-dir). No hand list, so a new subpackage cannot be left out of the wheel.

No extension modules: AgentSAM's hot paths are numba kernels (a registry wheel), so a fresh
machine needs no C toolchain.
"""

from setuptools import find_namespace_packages, find_packages, setup

# Top-level folders that install under agentinfer_jax.<name>.
_REMAPPED = ("kernels", "configs")


def _packages() -> list[str]:
    packages = find_packages(include=["agentinfer_jax", "agentinfer_jax.*"])
    # Data folders (no __init__.py) are namespace packages, so their files count as package data.
    packages += find_namespace_packages(include=["agentinfer_jax.assets", "agentinfer_jax.assets.*"])
    for root in _REMAPPED:
        packages.append(f"agentinfer_jax.{root}")
        packages += [f"agentinfer_jax.{root}.{sub}" for sub in find_packages(where=root)]
    return sorted(packages)


setup(packages=_packages())
