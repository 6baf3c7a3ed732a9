"""``include/uapi/linux/vfio.h`` (Linux 6.1; the cdev ioctls from 6.6) as ctypes.

Every VFIO ioctl is ``_IO(';', 100 + n)``: the struct size is not part of the
number, so a wrong layout would be silently accepted.  ``tests/host/test_uapi.py`` pins
each struct's size and offsets to the header's.
"""

from __future__ import annotations

import ctypes
import enum

from uvdma._uapi import _IO, vfio_info_cap_header

VFIO_API_VERSION = 0
VFIO_TYPE = ";"
VFIO_BASE = 100


class IommuType(enum.IntEnum):
    """Extensions for VFIO_CHECK_EXTENSION and IOMMU types for VFIO_SET_IOMMU."""

    VFIO_TYPE1_IOMMU = 1
    VFIO_SPAPR_TCE_IOMMU = 2
    VFIO_TYPE1v2_IOMMU = 3
    VFIO_DMA_CC_IOMMU = 4
    VFIO_EEH = 5
    VFIO_TYPE1_NESTING_IOMMU = 6
    VFIO_SPAPR_TCE_v2_IOMMU = 7
    VFIO_NOIOMMU_IOMMU = 8
    VFIO_UNMAP_ALL = 9
    VFIO_UPDATE_VADDR = 10


# -- ioctls ----------------------------------------------------------------------------
VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)  # 6.6
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)  # 6.6
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)  # 6.6


# -- groups -----------------------------------------------------------------------------
class GroupFlags(enum.IntFlag):
    VFIO_GROUP_FLAGS_VIABLE = 1 << 0
    VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1


class vfio_group_status(ctypes.Structure):  # noqa: N801
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


# -- devices ----------------------------------------------------------------------------
class DeviceFlags(enum.IntFlag):
    VFIO_DEVICE_FLAGS_RESET = 1 << 0
    VFIO_DEVICE_FLAGS_PCI = 1 << 1
    VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
    VFIO_DEVICE_FLAGS_AMBA = 1 << 3
    VFIO_DEVICE_FLAGS_CCW = 1 << 4
    VFIO_DEVICE_FLAGS_AP = 1 << 5
    VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
    VFIO_DEVICE_FLAGS_CAPS = 1 << 7


class vfio_device_info(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
    ]


class RegionFlags(enum.IntFlag):
    VFIO_REGION_INFO_FLAG_READ = 1 << 0
    VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
    VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
    VFIO_REGION_INFO_FLAG_CAPS = 1 << 3


class vfio_region_info(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3


class vfio_region_sparse_mmap_area(ctypes.Structure):  # noqa: N801
    _fields_ = [("offset", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_areas", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        # followed by nr_areas x vfio_region_sparse_mmap_area
    ]


class vfio_region_info_cap_type(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("type", ctypes.c_uint32),
        ("subtype", ctypes.c_uint32),
    ]


class PciRegion(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``."""

    VFIO_PCI_BAR0_REGION_INDEX = 0
    VFIO_PCI_BAR1_REGION_INDEX = 1
    VFIO_PCI_BAR2_REGION_INDEX = 2
    VFIO_PCI_BAR3_REGION_INDEX = 3
    VFIO_PCI_BAR4_REGION_INDEX = 4
    VFIO_PCI_BAR5_REGION_INDEX = 5
    VFIO_PCI_ROM_REGION_INDEX = 6
    VFIO_PCI_CONFIG_REGION_INDEX = 7
    VFIO_PCI_VGA_REGION_INDEX = 8
    VFIO_PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``."""

    VFIO_PCI_INTX_IRQ_INDEX = 0
    VFIO_PCI_MSI_IRQ_INDEX = 1
    VFIO_PCI_MSIX_IRQ_INDEX = 2
    VFIO_PCI_ERR_IRQ_INDEX = 3
    VFIO_PCI_REQ_IRQ_INDEX = 4
    VFIO_PCI_NUM_IRQS = 5


class IrqInfoFlags(enum.IntFlag):
    VFIO_IRQ_INFO_EVENTFD = 1 << 0
    VFIO_IRQ_INFO_MASKABLE = 1 << 1
    VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
    VFIO_IRQ_INFO_NORESIZE = 1 << 3


class vfio_irq_info(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class IrqSetFlags(enum.IntFlag):
    VFIO_IRQ_SET_DATA_NONE = 1 << 0
    VFIO_IRQ_SET_DATA_BOOL = 1 << 1
    VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
    VFIO_IRQ_SET_ACTION_MASK = 1 << 3
    VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
    VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5


class vfio_irq_set(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        # followed by __u8 data[]: here count x __s32 eventfds
    ]


# -- type1 IOMMU ------------------------------------------------------------------------
class IommuInfoFlags(enum.IntFlag):
    VFIO_IOMMU_INFO_PGSIZES = 1 << 0
    VFIO_IOMMU_INFO_CAPS = 1 << 1


class vfio_iommu_type1_info(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class vfio_iova_range(ctypes.Structure):  # noqa: N801
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]  # end is inclusive


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_iovas", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        # followed by nr_iovas x vfio_iova_range
    ]


class vfio_iommu_type1_info_cap_migration(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", ctypes.c_uint32),
        ("pgsize_bitmap", ctypes.c_uint64),
        ("max_dirty_bitmap_size", ctypes.c_uint64),
    ]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):  # noqa: N801
    _fields_ = [("header", vfio_info_cap_header), ("avail", ctypes.c_uint32)]


class DmaMapFlags(enum.IntFlag):
    VFIO_DMA_MAP_FLAG_READ = 1 << 0
    VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
    VFIO_DMA_MAP_FLAG_VADDR = 1 << 2


class vfio_iommu_type1_dma_map(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class DmaUnmapFlags(enum.IntFlag):
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
    VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
    VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2


class vfio_iommu_type1_dma_unmap(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        # followed by __u8 data[] (dirty bitmap), unused here
    ]


# -- vfio cdev + iommufd (6.6) ------------------------------------------------------------
class vfio_device_bind_iommufd(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iommufd", ctypes.c_int32),
        ("out_devid", ctypes.c_uint32),
    ]


class vfio_device_attach_iommufd_pt(ctypes.Structure):  # noqa: N801
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pt_id", ctypes.c_uint32)]


class vfio_device_detach_iommufd_pt(ctypes.Structure):  # noqa: N801
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]
