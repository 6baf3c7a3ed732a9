"""A tour of what uvdma does today, run by ``tools/demo`` inside the QEMU test VM.

1. Find the NVMe controllers and show who owns them.
2. Take them from the kernel's nvme driver: bind them to vfio-pci.
3. Show their IOMMU groups and the VFIO group devices that binding created.
4. Open one through VFIO and read its registers.
5. Ask the DMA API for memory under 24-, 32- and 64-bit masks, as a driver would.
6. Put genalloc to work on real memory.

Run it as root on any machine with an IOMMU (``modprobe vfio-pci`` first):
``python examples/tour.py [--device BDF ...]``.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import sys

from uvdma import pci
from uvdma.dma import (
    DMA_BIT_MASK,
    GFP_ATOMIC,
    GFP_KERNEL,
    DmaDevice,
    dma_alloc_coherent,
    dma_free_coherent,
    dma_pool_create,
    dma_set_mask_and_coherent,
)
from uvdma.errors import GenPoolError, UvdmaError
from uvdma.genalloc import GenPool, best_fit, first_fit_order_align
from uvdma.vfio import open_device

KiB = 1024
MiB = 1024 * KiB


def show_controllers(devices: list[pci.PciDevice]) -> None:
    print(f"Found {len(devices)} NVMe controller(s):")
    for dev in devices:
        print(
            f"  {dev.address}  vendor {dev.vendor:04x} device {dev.device:04x}  "
            f"driver {dev.driver or '-'}  IOMMU group {dev.iommu_group}"
        )


def take_from_kernel(devices: list[pci.PciDevice]) -> None:
    print("\nBinding them to vfio-pci (driver_override + drivers_probe):")
    for dev in devices:
        was = pci.bind(dev.address)
        print(f"  {dev.address}: {was or 'no driver'} -> {dev.driver}")


def show_groups(devices: list[pci.PciDevice]) -> None:
    print("\nIOMMU groups (a group is the unit VFIO hands to user space):")
    for dev in devices:
        group = dev.iommu_group
        if group is None:
            print(f"  {dev.address}: no IOMMU group")
            continue
        members = ", ".join(str(d.address) for d in pci.group_devices(group))
        node = pci.vfio_group_path(group)
        viable = "viable" if not pci.group_blockers(group) else "NOT viable"
        print(f"  group {group}: {members}  ({viable}; {node} exists: {node.exists()})")


def registers_and_dma(address: pci.PciAddress) -> None:
    print(f"\nOpening {address} through VFIO:")
    with open_device(address) as vdev:
        bar = vdev.bar(0)
        cap, vs = bar.read64(0x00), bar.read32(0x08)  # NVMe CAP and VS, one load each
        print(f"  backend {vdev.backend}; BAR0 {bar.size // KiB} KiB mmap'd")
        print(
            f"  CAP {cap:#018x}: up to {(cap & 0xFFFF) + 1} entries a queue, "
            f"ready within {((cap >> 24) & 0xFF) * 500} ms; NVMe {vs >> 16}.{(vs >> 8) & 0xFF}"
        )
        ranges = ", ".join(f"{a:#x}-{b:#x}" for a, b in vdev.domain.iova_ranges())
        print(f"  usable IOVA ranges: {ranges} (the MSI window is the hole)")

        print("\nThe DMA API, as a driver uses it (every address + size - 1 <= the mask):")
        dev = DmaDevice(vdev)
        for bits in (24, 32, 64):
            dma_set_mask_and_coherent(dev, DMA_BIT_MASK(bits))
            queue = dma_alloc_coherent(dev, 64 * KiB, GFP_KERNEL)  # may map memory
            atomic = dma_alloc_coherent(dev, 4 * KiB, GFP_ATOMIC)  # never a system call
            print(
                f"  {bits}-bit mask: a 64 KiB queue at dma {queue[1]:#x}, "
                f"4 KiB from the atomic pools at dma {atomic[1]:#x}"
            )
            dma_free_coherent(dev, 4 * KiB, *atomic)
            dma_free_coherent(dev, 64 * KiB, *queue)
        prp = dma_pool_create("prp-lists", dev, 4096, 4096, 0)
        block = prp.alloc()
        print(f"  a PRP list page from a dma_pool at dma {block[1]:#x}")
        prp.free(*block)
        prp.destroy()
        stats = ", ".join(f"{k} {v // KiB} KiB" for k, v in dev.dma_domain.pools.stats().items())
        print(f"  atomic pools (debugfs dma_pools/): {stats}")
        leaks = dev.close()
        print(f"  DMA-API check at close: {len(leaks)} leaks")


def genalloc_at_work() -> None:
    print("\ngenalloc at work: a gen_pool over 2 MiB of real memory.")
    # Stand-in for a hugepage mapped into the IOMMU: this IOVA is what the device
    # would see. (Mapping it for real is the next step of the project.)
    iova = 0x1_0000_0000
    # gen_pool aligns virtual addresses, as the kernel's does: give it a range whose
    # virtual and DMA addresses agree modulo 2 MiB, and aligned virt means aligned dma.
    with mmap.mmap(-1, 4 * MiB) as mem:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        virt = (base + 2 * MiB - 1) & ~(2 * MiB - 1)
        pool = GenPool(12)  # 4 KiB granules, like the kernel's atomic pools
        pool.add_virt(virt, iova, 2 * MiB)
        print(f"  pool: {pool.size() // KiB} KiB at virt {virt:#x}, dma {iova:#x}")

        queue = pool.dma_zalloc_align(64 * KiB, 64 * KiB)  # an NVMe queue's worth
        prp = pool.dma_alloc(4 * KiB)
        odd = pool.alloc_algo(12 * KiB, first_fit_order_align)
        if queue is None or prp is None:
            raise GenPoolError("a fresh 2 MiB pool could not give 68 KiB")
        print(f"  64 KiB zeroed, 64 KiB aligned: virt {queue[0]:#x} -> dma {queue[1]:#x}")
        print(f"  4 KiB:                         virt {prp[0]:#x} -> dma {prp[1]:#x}")
        print(f"  12 KiB, order-aligned (16 KiB): dma {pool.virt_to_phys(odd):#x}")
        print(f"  available: {pool.avail() // KiB} KiB of {pool.size() // KiB} KiB")

        pool.free(prp[0], 4 * KiB)
        try:
            pool.free(prp[0], 4 * KiB)
        except GenPoolError as e:
            print(f"  a double free is refused, pool unchanged: {e}")

        pool.set_algo(best_fit)
        hole = pool.alloc(4 * KiB)
        print(f"  best fit puts 4 KiB in the smallest hole: dma {pool.virt_to_phys(hole):#x}")
        for addr, size in ((queue[0], 64 * KiB), (odd, 12 * KiB), (hole, 4 * KiB)):
            pool.free(addr, size)
        pool.destroy()
        print("  everything freed; pool destroyed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="append", help="BDF (default: every NVMe)")
    args = parser.parse_args()
    try:
        if args.device:
            devices = [pci.device(bdf) for bdf in args.device]
        else:
            devices = pci.nvme_controllers()
        if not devices:
            print("no NVMe controller found; pass --device BDF", file=sys.stderr)
            return 1
        show_controllers(devices)
        take_from_kernel(devices)
        show_groups(devices)
        registers_and_dma(devices[0].address)
        genalloc_at_work()
    except UvdmaError as e:
        print(f"tour: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tour: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
