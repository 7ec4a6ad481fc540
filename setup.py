"""Builds the optional compiled drafting walk; everything else is configured in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and SAMDrafter uses its Python
walk (the reference the compiled one is tested against).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "agentinfer_jax.speculation._sam_native",
    sources=["agentinfer_jax/speculation/_sam_native.c"],
    # No fused multiply-adds: the compiled walk must round exactly like the Python one.
    extra_compile_args=["-O2", "-ffp-contract=off"],
    optional=True,
)])
