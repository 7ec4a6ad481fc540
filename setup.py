"""Discovers the packages and builds the optional compiled drafting walk; the rest is in pyproject.toml.

Packages: every folder with an `__init__.py` under agentinfer_jax/, the data folders under
agentinfer_jax/assets/, plus the top-level kernels/ and configs/, which install as
agentinfer_jax.kernels and agentinfer_jax.configs (pyproject's package-dir). No hand list, so a new subpackage cannot be left out of the wheel.

`optional=True`: without a C compiler the install still succeeds and SAMDrafter uses its Python
walk (the reference the compiled one is tested against).
"""

from setuptools import Extension, find_namespace_packages, find_packages, setup

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


setup(
    packages=_packages(),
    ext_modules=[Extension(
        "agentinfer_jax.speculation._sam_native",
        sources=["agentinfer_jax/speculation/_sam_native.c"],
        # No fused multiply-adds: the compiled walk must round exactly like the Python one.
        extra_compile_args=["-O2", "-ffp-contract=off"],
        optional=True,
    )],
)
