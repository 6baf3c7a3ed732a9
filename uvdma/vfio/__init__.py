"""VFIO: devices handed to user space, and the IOMMU domains their DMA goes through.

>>> from uvdma.vfio import open_device
>>> with open_device("0000:01:00.0") as dev:          # doctest: +SKIP
...     print(hex(dev.bar(0).read64(0)))               # NVMe CAP
"""

from uvdma.errors import DmaMapError, GroupNotViableError, NoIommuWarning
from uvdma.vfio.device import (
    BackendChoice,
    Bar,
    IrqInfo,
    RegionInfo,
    VfioDevice,
    backend_choice,
    choose_backend,
    new_domain,
    open_device,
)
from uvdma.vfio.domain import DmaMapping, IommuDomain
from uvdma.vfio.iommufd import IommufdDomain
from uvdma.vfio.noiommu import NoIommuContainer
from uvdma.vfio.type1 import Type1Container, VfioGroup

__all__ = [
    "BackendChoice",
    "Bar",
    "DmaMapError",
    "DmaMapping",
    "GroupNotViableError",
    "IommuDomain",
    "IommufdDomain",
    "IrqInfo",
    "NoIommuContainer",
    "NoIommuWarning",
    "RegionInfo",
    "Type1Container",
    "VfioDevice",
    "VfioGroup",
    "backend_choice",
    "choose_backend",
    "new_domain",
    "open_device",
]
