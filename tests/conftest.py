"""Test tiers: unit and host tests run anywhere; ``vm`` tests only inside the uvdma test guest.

``uvdma vm run`` sets UVDMA_IN_VM=1 in the guest; ``tools/test`` runs ``pytest -m vm`` there.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

IN_VM = os.environ.get("UVDMA_IN_VM") == "1"

# DMA-API debugging (call sites, poison, leak reports) is on for the whole suite.
os.environ.setdefault("UVDMA_DMA_DEBUG", "1")

# The guest's root filesystem is read-only: no example database there.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("vm", max_examples=50, deadline=None, database=None)
settings.load_profile(os.environ.get("UVDMA_HYPOTHESIS_PROFILE", "vm" if IN_VM else "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_VM:
        return
    skip = pytest.mark.skip(
        reason="needs the QEMU test guest: run `tools/test` "
        "(or `uvdma vm run --bind -- python -m pytest -m vm`)"
    )
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)
