"""VFIO: devices handed to user space, and the IOMMU domains their DMA goes through.

>>> from uvdma.vfio import open_device
>>> with open_device("0000:01:00.0") as dev:          # doctest: +SKIP
...     print(hex(dev.bar(0).read64(0)))               # NVMe CAP
"""

from uvdma.errors import DmaMapError, GroupNotViableError
from uvdma.vfio.device import (
    Bar,
    IrqInfo,
    RegionInfo,
    VfioDevice,
    choose_backend,
    new_domain,
    open_device,
)
from uvdma.vfio.domain import DmaMapping, IommuDomain
from uvdma.vfio.iommufd import IommufdDomain
from uvdma.vfio.type1 import Type1Container, VfioGroup

__all__ = [
    "Bar",
    "DmaMapError",
    "DmaMapping",
    "GroupNotViableError",
    "IommuDomain",
    "IommufdDomain",
    "IrqInfo",
    "RegionInfo",
    "Type1Container",
    "VfioDevice",
    "VfioGroup",
    "choose_backend",
    "new_domain",
    "open_device",
]
