"""The VM tier runs once per IOMMU backend; this says which one this guest proves.

``tools/test`` boots three guests: Debian's stock kernel (type1, the whole tier), uvdma's
built kernel with an emulated IOMMU (iommufd + cdev) and the built kernel with no IOMMU
(VFIO's no-IOMMU mode).  The last two run only the tests marked ``backends``: those whose
claim is the same on every backend take the ``backend`` fixture (their ids name it), and
backend-specific ones say which backends they are for: ``@pytest.mark.backends("iommufd")``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BACKENDS = ("type1", "iommufd", "noiommu")


def tier_backend() -> str:
    """The backend this guest is for: ``UVDMA_VM_BACKEND`` if set, else what it offers
    (no IOMMU: noiommu; /dev/iommu: iommufd; else type1)."""
    env = os.environ.get("UVDMA_VM_BACKEND")
    if env:
        return env
    if os.environ.get("UVDMA_VM_IOMMU") == "none":
        return "noiommu"
    return "iommufd" if Path("/dev/iommu").exists() else "type1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names): a VM test of the backends named (none named: every backend); the "
        "iommufd and noiommu tiers run only these",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [tier_backend()], scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = tier_backend()
    for item in items:
        mark = item.get_closest_marker("backends")
        if mark is not None and mark.args and here not in mark.args:
            item.add_marker(
                pytest.mark.skip(reason=f"for the {'/'.join(mark.args)} backend; this is {here}")
            )
