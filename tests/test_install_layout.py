"""The test process imports the installed package, never the checkout root.

Our top-level kernels/ and configs/ install as agentinfer_jax.kernels and agentinfer_jax.configs.
If the checkout root were on sys.path (`python -m pytest` puts it there), `import kernels` would find
our folder instead of the PyPI distribution `kernels`, which transformers imports, and every
transformers model would fail to construct.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

import pytest

import hf_fixtures as hf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_checkout_root_is_not_on_sys_path():
    on_path = {pathlib.Path(p or ".").resolve() for p in sys.path}
    assert ROOT not in on_path, "run pytest from its console script (.venv/bin/pytest), not python -m"


def test_pypi_kernels_distribution_wins_over_our_folder():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI `kernels` distribution is not installed (transformers pulls it in)")
    import kernels

    origin = pathlib.Path(kernels.__file__).resolve()
    assert ROOT / "kernels" not in origin.parents
    installed = {pathlib.Path(dist.locate_file(f)).resolve() for f in dist.files or ()}
    assert origin in installed, f"`import kernels` resolved to {origin}, not the distribution"


def test_our_kernels_import_under_the_package_name():
    import agentinfer_jax.kernels as ours

    assert pathlib.Path(ours.__file__).resolve().parent.name == "kernels"
    assert callable(ours.ragged_paged_attention)


@pytest.mark.parametrize("family", hf.FAMILIES)
def test_transformers_model_classes_construct(family):
    model = hf.make_hf_model(family, tie=False, seed=0)
    assert sum(p.numel() for p in model.parameters()) > 0
