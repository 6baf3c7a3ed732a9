"""Every struct of uvdma._uapi pinned to the header's size and offsets.

VFIO and iommufd ioctls are _IO(): the kernel does not see the struct size in the
number, so a wrong layout is silently accepted. The numbers below were taken from the
headers: vfio.h by compiling a probe (sizeof/offsetof) against linux-libc-dev 6.1,
the 6.6 cdev structs and iommufd.h from the 6.6 header text.
"""

from __future__ import annotations

import ctypes

import pytest

from uvdma._uapi import iommufd as I  # noqa: N812
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma._uapi import vfio_info_cap_header, walk_caps

LAYOUTS: list[tuple[type[ctypes.Structure], int, dict[str, int]]] = [
    (vfio_info_cap_header, 8, {"id": 0, "version": 2, "next": 4}),
    (V.vfio_group_status, 8, {"argsz": 0, "flags": 4}),
    (
        V.vfio_device_info,
        20,
        {"flags": 4, "num_regions": 8, "num_irqs": 12, "cap_offset": 16},
    ),
    (
        V.vfio_region_info,
        32,
        {"flags": 4, "index": 8, "cap_offset": 12, "size": 16, "offset": 24},
    ),
    (V.vfio_region_sparse_mmap_area, 16, {"offset": 0, "size": 8}),
    (V.vfio_region_info_cap_sparse_mmap, 16, {"header": 0, "nr_areas": 8}),
    (V.vfio_region_info_cap_type, 16, {"type": 8, "subtype": 12}),
    (V.vfio_irq_info, 16, {"flags": 4, "index": 8, "count": 12}),
    (V.vfio_irq_set, 20, {"flags": 4, "index": 8, "start": 12, "count": 16}),
    (V.vfio_iommu_type1_info, 24, {"flags": 4, "iova_pgsizes": 8, "cap_offset": 16}),
    (V.vfio_iova_range, 16, {"start": 0, "end": 8}),
    (V.vfio_iommu_type1_info_cap_iova_range, 16, {"nr_iovas": 8}),
    (
        V.vfio_iommu_type1_info_cap_migration,
        32,
        {"flags": 8, "pgsize_bitmap": 16, "max_dirty_bitmap_size": 24},
    ),
    (V.vfio_iommu_type1_info_dma_avail, 12, {"avail": 8}),
    (V.vfio_iommu_type1_dma_map, 32, {"flags": 4, "vaddr": 8, "iova": 16, "size": 24}),
    (V.vfio_iommu_type1_dma_unmap, 24, {"flags": 4, "iova": 8, "size": 16}),
    (V.vfio_device_bind_iommufd, 16, {"flags": 4, "iommufd": 8, "out_devid": 12}),
    (V.vfio_device_attach_iommufd_pt, 12, {"flags": 4, "pt_id": 8}),
    (V.vfio_device_detach_iommufd_pt, 8, {"flags": 4}),
    (I.iommu_destroy, 8, {"size": 0, "id": 4}),
    (I.iommu_ioas_alloc, 12, {"flags": 4, "out_ioas_id": 8}),
    (I.iommu_iova_range, 16, {"start": 0, "last": 8}),
    (
        I.iommu_ioas_iova_ranges,
        32,
        {"ioas_id": 4, "num_iovas": 8, "allowed_iovas": 16, "out_iova_alignment": 24},
    ),
    (
        I.iommu_ioas_map,
        40,
        {"flags": 4, "ioas_id": 8, "user_va": 16, "length": 24, "iova": 32},
    ),
    (I.iommu_ioas_unmap, 24, {"ioas_id": 4, "iova": 8, "length": 16}),
    (I.iommu_option, 24, {"option_id": 4, "op": 8, "object_id": 12, "val64": 16}),
]


@pytest.mark.parametrize(
    ("struct", "size", "offsets"), LAYOUTS, ids=lambda x: getattr(x, "__name__", "")
)
def test_struct_layout_matches_the_header(
    struct: type[ctypes.Structure], size: int, offsets: dict[str, int]
) -> None:
    assert ctypes.sizeof(struct) == size
    for field, offset in offsets.items():
        assert getattr(struct, field).offset == offset, field


def test_ioctl_numbers_match_the_header() -> None:
    # From the compiled probe: VFIO_GET_API_VERSION=0x3b64 ... VFIO_IOMMU_GET_INFO=0x3b70
    assert V.VFIO_GET_API_VERSION == 0x3B64
    assert V.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert V.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert V.VFIO_IOMMU_GET_INFO == 0x3B70
    assert V.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert V.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert V.VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3B77
    assert I.IOMMU_DESTROY == 0x3B80
    assert I.IOMMU_IOAS_MAP == 0x3B85
    assert I.IOMMU_IOAS_UNMAP == 0x3B86


def test_constants_match_the_header() -> None:
    assert int(V.IommuType.VFIO_TYPE1v2_IOMMU) == 3
    assert int(V.IommuType.VFIO_NOIOMMU_IOMMU) == 8
    assert V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL == 3
    assert int(V.PciRegion.VFIO_PCI_CONFIG_REGION_INDEX) == 7
    assert int(V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX) == 2
    assert int(V.IrqSetFlags.VFIO_IRQ_SET_DATA_EVENTFD) == 0x4
    assert int(V.IrqSetFlags.VFIO_IRQ_SET_ACTION_TRIGGER) == 0x20
    assert int(V.DeviceFlags.VFIO_DEVICE_FLAGS_CAPS) == 0x80
    assert int(I.IoasMapFlags.IOMMU_IOAS_MAP_READABLE) == 4


def test_capability_chain_walk_follows_next_and_stops_on_loops() -> None:
    buf = ctypes.create_string_buffer(64)
    a = vfio_info_cap_header.from_buffer(buf, 24)
    a.id, a.version, a.next = 3, 1, 40
    b = vfio_info_cap_header.from_buffer(buf, 40)
    b.id, b.version, b.next = 1, 1, 24  # loops back
    assert list(walk_caps(buf, 24)) == [(3, 1, 24), (1, 1, 40)]
    b.next = 60  # header would run past the buffer
    assert list(walk_caps(buf, 24)) == [(3, 1, 24), (1, 1, 40)]
    assert list(walk_caps(buf, 0)) == []
