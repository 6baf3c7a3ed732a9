"""The kernel ABI, transliterated: linux/vfio.h and linux/iommufd.h as ctypes.

Kernel names, explicit padding, every struct's size and field offsets pinned by
``tests/host/test_uapi.py``.  Nothing outside ``uvdma/vfio`` spells a raw struct.

Followed: ``include/uapi/linux/vfio.h`` of Linux 6.1 (checked by compiling a probe
against linux-libc-dev 6.1's header), plus the vfio cdev ioctls of 6.6
(``VFIO_DEVICE_BIND_IOMMUFD``, ``VFIO_DEVICE_[AT|DE]TACH_IOMMUFD_PT``); and
``include/uapi/linux/iommufd.h`` of Linux 6.6.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

IOC_NONE = 0
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30


def _IO(type_: str, nr: int) -> int:  # noqa: N802 - the kernel's macro name
    """``_IO(type, nr)``: an ioctl number with no size or direction (all of VFIO's)."""
    return (IOC_NONE << _IOC_DIRSHIFT) | (ord(type_) << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


class vfio_info_cap_header(ctypes.Structure):  # noqa: N801 - kernel name
    """``struct vfio_info_cap_header``: the head of every capability in a chain."""

    _fields_ = [
        ("id", ctypes.c_uint16),
        ("version", ctypes.c_uint16),
        ("next", ctypes.c_uint32),  # offset from the start of the info buffer; 0 ends
    ]


def walk_caps(buf: ctypes.Array[ctypes.c_char], first: int) -> Iterator[tuple[int, int, int]]:
    """Walk a VFIO capability chain: yields (id, version, offset) for each capability.

    ``first`` is the info struct's ``cap_offset``.  Offsets are from the start of
    ``buf``; a chain that points outside the buffer or loops is cut short.
    """
    seen: set[int] = set()
    offset = first
    size = ctypes.sizeof(buf)
    hdr = ctypes.sizeof(vfio_info_cap_header)
    while offset and offset not in seen and offset + hdr <= size:
        seen.add(offset)
        cap = vfio_info_cap_header.from_buffer(buf, offset)
        yield cap.id, cap.version, offset
        offset = cap.next
