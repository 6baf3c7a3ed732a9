"""``include/uapi/linux/iommufd.h`` (Linux 6.6) as ctypes: the IOAS subset uvdma uses.

Sizes and offsets are pinned by ``tests/host/test_uapi.py``.
"""

from __future__ import annotations

import ctypes
import enum

from uvdma._uapi import _IO

IOMMUFD_TYPE = ";"
IOMMUFD_CMD_BASE = 0x80

IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 0)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 1)
IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 2)
IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 3)
IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 4)
IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 5)
IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 6)
IOMMU_OPTION = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 7)
IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 8)


class iommu_destroy(ctypes.Structure):  # noqa: N801
    _fields_ = [("size", ctypes.c_uint32), ("id", ctypes.c_uint32)]


class iommu_ioas_alloc(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("out_ioas_id", ctypes.c_uint32),
    ]


class iommu_iova_range(ctypes.Structure):  # noqa: N801
    _fields_ = [("start", ctypes.c_uint64), ("last", ctypes.c_uint64)]  # last is inclusive


class iommu_ioas_iova_ranges(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("num_iovas", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("allowed_iovas", ctypes.c_uint64),  # user pointer to iommu_iova_range[]
        ("out_iova_alignment", ctypes.c_uint64),
    ]


class IoasMapFlags(enum.IntFlag):
    IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
    IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
    IOMMU_IOAS_MAP_READABLE = 1 << 2


class iommu_ioas_map(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("user_va", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
    ]


class iommu_ioas_unmap(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
    ]


IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1


class iommu_option(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("option_id", ctypes.c_uint32),
        ("op", ctypes.c_uint16),
        ("__reserved", ctypes.c_uint16),
        ("object_id", ctypes.c_uint32),
        ("val64", ctypes.c_uint64),
    ]
