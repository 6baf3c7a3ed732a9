"""A minimal userspace NVMe driver on uvdma.

Its queues come from ``dma_alloc_coherent`` and its PRP lists from a ``dma_pool``, as in
Linux's nvme driver; data lives in the caller's numpy arrays (``dma_map_single``) or in
``DmaBuffer``s.  References are to the NVM Express Base Specification 2.0 ("NVMe 2.0").

    with Controller.open("0000:01:00.0") as ctrl:
        ns = ctrl.namespace(1)
        q = ctrl.create_io_queues(1)[0]
        data = np.zeros(ns.lba_size * 8, dtype=np.uint8)
        q.read(ns, lba=0, buf=data)
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uvdma.dma import (
    DMA_BIT_MASK,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    GFP_KERNEL,
    DmaBuffer,
    DmaDevice,
    dma_alloc_coherent,
    dma_free_coherent,
    dma_map_single,
    dma_pool_create,
    dma_set_mask_and_coherent,
    dma_unmap_single,
)
from uvdma.errors import UvdmaError
from uvdma.vfio import Bar, VfioDevice, open_device
from uvdma.vfio.faults import IommuFault, IommuFaultLog

PAGE = 4096  # CC.MPS = 0: memory pages of 4 KiB

# NVMe 2.0, 3.1.4: controller registers
CAP, VS, INTMS, INTMC, CC, CSTS, AQA, ASQ, ACQ = (
    0x00,
    0x08,
    0x0C,
    0x10,
    0x14,
    0x1C,
    0x24,
    0x28,
    0x30,
)
DOORBELLS = 0x1000

# NVMe 2.0, 5: admin opcodes; NVM command set 1.0, 3: I/O opcodes
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG, ADMIN_DELETE_CQ = 0x00, 0x01, 0x02, 0x04
ADMIN_CREATE_CQ, ADMIN_IDENTIFY, ADMIN_SET_FEATURES = 0x05, 0x06, 0x09
IO_FLUSH, IO_WRITE, IO_READ = 0x00, 0x01, 0x02
FEAT_NUM_QUEUES = 0x07
LOG_ERROR, LOG_SMART = 0x01, 0x02

# NVMe 2.0, Figure 102 (generic status) and 105 (command specific), the ones a user meets
STATUS_NAMES = {
    (0, 0x00): "Successful Completion",
    (0, 0x01): "Invalid Command Opcode",
    (0, 0x02): "Invalid Field in Command",
    (0, 0x03): "Command ID Conflict",
    (0, 0x04): "Data Transfer Error",
    (0, 0x06): "Internal Error",
    (0, 0x07): "Command Abort Requested",
    (0, 0x0B): "Invalid Namespace or Format",
    (0, 0x13): "PRP Offset Invalid",
    (0, 0x80): "LBA Out of Range",
    (0, 0x81): "Capacity Exceeded",
    (0, 0x82): "Namespace Not Ready",
    (1, 0x01): "Invalid Queue Identifier",
    (1, 0x02): "Invalid Queue Size",
    (1, 0x08): "Invalid Interrupt Vector",
    (1, 0x0C): "Invalid Queue Deletion",
    (2, 0x80): "Write Fault",
    (2, 0x81): "Unrecovered Read Error",
    (2, 0x86): "Access Denied",
}


_SQE = struct.Struct("<IIQQQQ6I")  # a submission queue entry, 64 bytes
_NO_LISTS: list[tuple[int, int]] = []  # shared, never mutated: a transfer with no PRP list


class NvmeError(UvdmaError):
    """A controller error, or a command that completed with an error status."""


class CommandError(NvmeError):
    """A command completed with a non-zero status; ``sct``/``sc`` hold it, decoded by name."""

    def __init__(self, what: str, sct: int, sc: int) -> None:
        name = STATUS_NAMES.get((sct, sc), "unknown status")
        super().__init__(f"{what}: {name} (SCT {sct:#x}, SC {sc:#x})")
        self.sct, self.sc, self.name = sct, sc, name


@dataclass(frozen=True)
class Namespace:
    """An active namespace (Identify Namespace, NVM command set 1.0, 4.1.5.1)."""

    nsid: int
    blocks: int  # NSZE
    lba_size: int

    @property
    def size(self) -> int:
        """Bytes."""
        return self.blocks * self.lba_size


class _Command:
    __slots__ = ("cid", "done", "dw0", "status", "what")

    def __init__(self, cid: int, what: str) -> None:
        self.cid, self.what, self.done, self.status, self.dw0 = cid, what, False, 0, 0


class QueuePair:
    """A submission queue and its completion queue (NVMe 2.0, 3.3), in coherent DMA memory."""

    def __init__(self, ctrl: Controller, qid: int, depth: int, vector: int | None) -> None:
        self.ctrl, self.qid, self.depth, self.vector = ctrl, qid, depth, vector
        dev = ctrl.dma
        self.sq = dma_alloc_coherent(dev, 64 * depth, GFP_KERNEL)  # zeroed
        self.cq = dma_alloc_coherent(dev, 16 * depth, GFP_KERNEL)
        stride = 4 << ctrl.dstrd  # NVMe 2.0, 3.1.4.21: doorbell stride from CAP.DSTRD
        self._sq_db = DOORBELLS + (2 * qid) * stride
        self._cq_db = DOORBELLS + (2 * qid + 1) * stride
        self._sq_doorbell = ctrl.bar.reg32(self._sq_db)  # one store each, checked once here
        self._cq_doorbell = ctrl.bar.reg32(self._cq_db)
        self._sq_tail = 0
        self._cq_head = 0
        self._phase = 1
        self._sq_mem = memoryview((ctypes.c_char * (64 * depth)).from_address(self.sq[0])).cast("B")
        self._cqe = (ctypes.c_uint32 * (4 * depth)).from_address(self.cq[0])
        self._free_cids = list(range(depth - 1, -1, -1))
        self._inflight: dict[int, _Command] = {}

    @property
    def outstanding(self) -> int:
        """Commands submitted and not yet completed."""
        return len(self._inflight)

    def submit(
        self,
        opcode: int,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: Sequence[int] = (),
        what: str = "",
    ) -> _Command:
        """Write one SQE at the tail and ring the doorbell (NVMe 2.0, 4.2)."""
        if len(self._inflight) >= self.depth - 1:  # a full queue has one empty slot
            raise NvmeError(f"queue {self.qid} is full ({self.depth - 1} commands outstanding)")
        cid = self._free_cids.pop()
        cmd = _Command(cid, what or f"opcode {opcode:#x}")
        c = (*cdw, 0, 0, 0, 0, 0, 0)
        # the 64-byte SQE in one store of packed fields (NVMe 2.0, Figure 88):
        # CDW0 (opcode, CID), NSID, reserved, MPTR, PRP1, PRP2, CDW10..15
        _SQE.pack_into(
            self._sq_mem,
            self._sq_tail * 64,
            opcode | (cid << 16),
            nsid,
            0,
            0,
            prp1,
            prp2,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
        )
        self._inflight[cid] = cmd
        tail = self._sq_tail + 1
        self._sq_tail = tail = 0 if tail == self.depth else tail
        self._sq_doorbell.value = tail
        return cmd

    def reap(self) -> int:
        """Consume every posted CQE (phase tag, NVMe 2.0, 4.6); returns how many."""
        n = 0
        cqe = self._cqe
        while True:
            base = self._cq_head * 4
            dw3 = cqe[base + 3]
            if (dw3 >> 16) & 1 != self._phase:
                break
            cmd = self._inflight.pop(dw3 & 0xFFFF, None)
            if cmd is not None:
                cmd.done, cmd.status, cmd.dw0 = True, dw3 >> 17, cqe[base]
                self._free_cids.append(cmd.cid)
            self._cq_head += 1
            if self._cq_head == self.depth:
                self._cq_head, self._phase = 0, self._phase ^ 1
            n += 1
        if n:
            self._cq_doorbell.value = self._cq_head
        return n

    def wait(self, cmd: _Command, timeout: float | None = None) -> int:
        """Until ``cmd`` completes (polling, or the MSI-X eventfd); its DW0. A non-zero
        status raises :class:`CommandError`; no completion within the timeout raises
        ``TimeoutError`` naming the command."""
        timeout = self.ctrl.command_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not cmd.done:
            if not self.reap():
                self.ctrl.check_fatal()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{cmd.what} (cid {cmd.cid}) on queue {self.qid}: no completion within "
                        f"{timeout} s"
                    )
                if self.vector is not None and self.ctrl.interrupts:
                    with contextlib.suppress(TimeoutError):  # re-check the queue either way
                        self.ctrl.vfio.wait_irq(self.vector, min(left, 0.1))
        if cmd.status:
            sct, sc = (cmd.status >> 8) & 0x7, cmd.status & 0xFF
            raise CommandError(f"{cmd.what} on queue {self.qid}", sct, sc)
        return cmd.dw0

    def run(
        self,
        opcode: int,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: Sequence[int] = (),
        what: str = "",
    ) -> int:
        """submit + wait."""
        return self.wait(self.submit(opcode, nsid, prp1, prp2, cdw, what))

    # -- I/O (NVM command set 1.0, 3.2) ----------------------------------------------------
    def _prps(self, dma: int, length: int) -> tuple[int, int, list[tuple[int, int]]]:
        """PRP1, PRP2 and the PRP list pages used (NVMe 2.0, 4.1.1)."""
        first = PAGE - (dma % PAGE)
        if length <= first:
            return dma, 0, _NO_LISTS
        rest = length - first
        pages = [dma + first + i * PAGE for i in range((rest + PAGE - 1) // PAGE)]
        if len(pages) == 1:
            return dma, pages[0], []
        lists: list[tuple[int, int]] = []
        pool = self.ctrl.prp_pool
        i = 0
        head = 0
        prev: Any = None
        while i < len(pages):
            vaddr, ldma = pool.alloc()
            lists.append((vaddr, ldma))
            entries = (ctypes.c_uint64 * 512).from_address(vaddr)
            if prev is None:
                head = ldma
            else:
                prev[511] = ldma  # the last entry of a full list points to the next list
            room = 512 if len(pages) - i <= 512 else 511
            for k in range(min(room, len(pages) - i)):
                entries[k] = pages[i + k]
            i += room
            prev = entries
        return dma, head, lists

    def io(
        self, opcode: int, ns: Namespace, lba: int, nblocks: int, dma: int, what: str
    ) -> _Command:
        """Submit one read/write of ``nblocks`` at ``dma``; PRP lists are freed on completion."""
        if nblocks < 1 or lba < 0 or lba + nblocks > ns.blocks:
            raise NvmeError(
                f"{what}: LBAs {lba}..{lba + nblocks - 1} are outside namespace {ns.nsid} "
                f"(0..{ns.blocks - 1})"
            )
        if nblocks * ns.lba_size > self.ctrl.max_transfer:
            raise NvmeError(
                f"{what}: {nblocks * ns.lba_size} bytes exceed the controller's MDTS "
                f"({self.ctrl.max_transfer} bytes): split it (read()/write() do)"
            )
        length = nblocks * ns.lba_size
        translate = self.ctrl.vfio.domain.translate
        if translate(dma) is None or translate(dma + length - 1) is None:
            raise NvmeError(
                f"{what}: DMA address {dma:#x}+{length:#x} is not mapped in the device's IOMMU "
                "domain: the IOMMU would block the transfer (use dma_map_single or a DmaBuffer)"
            )
        prp1, prp2, lists = self._prps(dma, length)
        cdw = (lba & 0xFFFFFFFF, lba >> 32, nblocks - 1)
        cmd = self.submit(opcode, ns.nsid, prp1, prp2, cdw, what)
        if lists:
            self.ctrl._prp_owned[(self.qid, cmd.cid)] = lists
        return cmd

    def complete(self, cmd: _Command, timeout: float | None = None) -> None:
        """Wait for an I/O command and give its PRP lists back."""
        lists = (
            self.ctrl._prp_owned.pop((self.qid, cmd.cid), None) if self.ctrl._prp_owned else None
        )
        try:
            if not cmd.done or cmd.status:
                self.wait(cmd, timeout)
        finally:
            for vaddr, ldma in lists or ():
                self.ctrl.prp_pool.free(vaddr, ldma)

    def _transfer(
        self, opcode: int, ns: Namespace, lba: int, buf: npt.NDArray[Any] | DmaBuffer, what: str
    ) -> None:
        size = buf.size if isinstance(buf, DmaBuffer) else buf.nbytes
        if size == 0 or size % ns.lba_size:
            raise NvmeError(
                f"{what}: the buffer ({size} bytes) must be a non-empty multiple of the "
                f"{ns.lba_size}-byte LBA"
            )
        direction = DMA_FROM_DEVICE if opcode == IO_READ else DMA_TO_DEVICE
        if isinstance(buf, DmaBuffer):
            dma, handle = buf.dma, None
        else:
            dma = handle = dma_map_single(self.ctrl.dma, buf, direction)
        try:
            step = self.ctrl.max_transfer // ns.lba_size  # split at MDTS
            nblocks = size // ns.lba_size
            cmds = []
            for off in range(0, nblocks, step):
                n = min(step, nblocks - off)
                cmds.append(self.io(opcode, ns, lba + off, n, dma + off * ns.lba_size, what))
                if len(cmds) >= self.depth - 1:
                    self.complete(cmds.pop(0))
            for c in cmds:
                self.complete(c)
        finally:
            if handle is not None:
                dma_unmap_single(self.ctrl.dma, handle, size, direction)

    def read(self, ns: Namespace, lba: int, buf: npt.NDArray[Any] | DmaBuffer) -> None:
        """Read ``len(buf)`` bytes starting at ``lba`` into ``buf``."""
        self._transfer(IO_READ, ns, lba, buf, f"read of LBA {lba}")

    def write(self, ns: Namespace, lba: int, buf: npt.NDArray[Any] | DmaBuffer) -> None:
        """Write ``buf`` starting at ``lba``."""
        self._transfer(IO_WRITE, ns, lba, buf, f"write of LBA {lba}")

    def flush(self, ns: Namespace) -> None:
        """Flush the volatile write cache (NVM command set 1.0, 3.2.2)."""
        self.run(IO_FLUSH, ns.nsid, what="flush")

    def free(self) -> None:
        """Give the queue memory back (after the controller deleted the queues)."""
        dma_free_coherent(self.ctrl.dma, 16 * self.depth, *self.cq)
        dma_free_coherent(self.ctrl.dma, 64 * self.depth, *self.sq)


class Controller:
    """An NVMe controller driven from user space through VFIO."""

    def __init__(
        self,
        vfio: VfioDevice,
        *,
        dma_bits: int = 64,
        admin_depth: int = 32,
        interrupts: bool = False,
        command_timeout: float = 10.0,
    ) -> None:
        self.vfio = vfio
        self.interrupts = interrupts
        self.command_timeout = command_timeout
        self.bar: Bar = vfio.bar(0)
        self.fault_log = IommuFaultLog(vfio.address)  # what the IOMMU blocked, from now on
        self.dma = DmaDevice(vfio)
        dma_set_mask_and_coherent(self.dma, DMA_BIT_MASK(dma_bits))
        cap = self.bar.read64(CAP)
        self.mqes = (cap & 0xFFFF) + 1  # entries a queue may have
        self.timeout = max(((cap >> 24) & 0xFF) * 0.5, 0.5)  # CAP.TO, 500 ms units
        self.dstrd = (cap >> 32) & 0xF
        if not (cap >> 37) & 1:
            raise NvmeError("the controller does not support the NVM command set (CAP.CSS)")
        mpsmin = 1 << (12 + ((cap >> 48) & 0xF))
        if mpsmin > PAGE:
            raise NvmeError(
                f"the controller's smallest page is {mpsmin} bytes; this driver uses 4 KiB"
            )
        self.prp_pool = dma_pool_create("nvme-prp", self.dma, PAGE, PAGE, 0)
        self._prp_owned: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.io_queues: list[QueuePair] = []
        self.max_transfer = PAGE  # until Identify Controller reports MDTS
        self.closed = False
        self.leaks: list[str] = []
        if interrupts:
            vfio.enable_irqs(min(vfio.irq_info(2).count, 32))
        self.admin = QueuePair(self, 0, min(admin_depth, self.mqes), 0 if interrupts else None)
        try:
            self._enable()
            ident = self.identify_controller()
        except BaseException:
            # a controller that never becomes ready (or answers nothing): give everything back
            self.bar.write32(CC, 0)
            self.admin.free()
            self.prp_pool.destroy()
            self.leaks = self.dma.close()
            self.fault_log.close()
            raise
        mdts = ident[77]  # in units of the minimum page size; 0: no limit
        self.max_transfer = min(PAGE << mdts, 1 << 20) if mdts else 1 << 20
        self.nn = int.from_bytes(ident[516:520], "little")
        self.serial = ident[4:24].decode(errors="replace").strip()
        self.model = ident[24:64].decode(errors="replace").strip()
        self.firmware = ident[64:72].decode(errors="replace").strip()

    @classmethod
    def open(cls, address: str, **kwargs: Any) -> Controller:
        """Open the controller at ``address`` (bound to vfio-pci) and bring it up."""
        vfio = open_device(address)
        try:
            return cls(vfio, **kwargs)
        except BaseException:
            vfio.close()
            raise

    # -- bring-up and shutdown (NVMe 2.0, 3.5.1 and 3.6) -------------------------------------
    def check_fatal(self) -> None:
        """CSTS.CFS at any point is a clear error."""
        if self.bar.read32(CSTS) & 0x2:
            raise NvmeError("the controller reports a fatal status (CSTS.CFS); reset it")

    def _wait_ready(self, ready: bool) -> None:
        deadline = time.monotonic() + self.timeout
        while bool(self.bar.read32(CSTS) & 1) != ready:
            self.check_fatal()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"CSTS.RDY did not become {int(ready)} within CAP.TO ({self.timeout} s)"
                )
            time.sleep(0.0005)

    def _enable(self) -> None:
        self.vfio.enable_bus_master()
        if self.bar.read32(CC) & 1:
            self.bar.write32(CC, 0)  # CC.EN = 0: reset, then wait CSTS.RDY = 0
        self._wait_ready(False)
        d = self.admin.depth
        self.bar.write32(AQA, ((d - 1) << 16) | (d - 1))
        self.bar.write64(ASQ, self.admin.sq[1])
        self.bar.write64(ACQ, self.admin.cq[1])
        # CC: IOCQES=4 (16 B), IOSQES=6 (64 B), SHN=0, AMS=0 (round robin), MPS=0 (4 KiB),
        # CSS=0 (NVM), EN=1
        self.bar.write32(CC, (4 << 20) | (6 << 16) | 1)
        self._wait_ready(True)

    def close(self) -> None:
        """Delete the I/O queues, shut down normally (CC.SHN), free all DMA memory."""
        if self.closed:
            return
        self.closed = True
        try:
            for q in reversed(self.io_queues):
                try:
                    self.admin.run(ADMIN_DELETE_SQ, cdw=(q.qid,), what=f"delete SQ {q.qid}")
                    self.admin.run(ADMIN_DELETE_CQ, cdw=(q.qid,), what=f"delete CQ {q.qid}")
                except (NvmeError, TimeoutError):
                    pass  # the shutdown below still stops the controller
            cc = self.bar.read32(CC)
            self.bar.write32(CC, (cc & ~(0x3 << 14)) | (0x1 << 14))  # CC.SHN = 01b: normal shutdown
            deadline = time.monotonic() + self.timeout
            while (self.bar.read32(CSTS) >> 2) & 0x3 != 0x2:  # CSTS.SHST = 10b: complete
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            self.bar.write32(CC, 0)
        finally:
            for q in self.io_queues:
                q.free()
            self.io_queues.clear()
            self.admin.free()
            self.prp_pool.destroy()
            self.leaks = self.dma.close()
            self.fault_log.close()
            self.vfio.close()  # the DMA-API check above found nothing if self.leaks is empty

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iommu_faults(self, wait: float = 0.0) -> list[IommuFault]:
        """DMA the IOMMU blocked for this controller since the last call (the kernel log).

        A controller may complete a command whose DMA was blocked with success (QEMU
        7.2's does); this is how the driver learns of it.  The kernel logs faults from an
        interrupt of its own, a moment after: ``wait`` gives them that moment.
        """
        return self.fault_log.faults(wait)

    # -- admin commands ----------------------------------------------------------------------
    def _admin_data(
        self, opcode: int, nsid: int, cdw: Sequence[int], what: str, size: int = PAGE
    ) -> bytes:
        with DmaBuffer(self.dma, size) as buf:
            self.admin.run(opcode, nsid, buf.dma, 0, cdw, what)
            return bytes(buf.cpu)

    def identify_controller(self) -> bytes:
        """Identify Controller (CNS 01h): 4 KiB."""
        return self._admin_data(ADMIN_IDENTIFY, 0, (0x01,), "Identify Controller")

    def active_namespaces(self) -> list[int]:
        """Identify Active Namespace ID list (CNS 02h)."""
        data = self._admin_data(ADMIN_IDENTIFY, 0, (0x02,), "Identify Active Namespaces")
        ids = np.frombuffer(data, dtype="<u4")
        return [int(n) for n in ids[ids != 0]]

    def namespace(self, nsid: int) -> Namespace:
        """Identify Namespace (CNS 00h); a namespace that does not exist is a clear error."""
        active = self.active_namespaces()
        if nsid not in active:
            raise NvmeError(f"namespace {nsid} does not exist; active: {active}")
        data = self._admin_data(ADMIN_IDENTIFY, nsid, (0x00,), f"Identify Namespace {nsid}")
        nsze = int.from_bytes(data[0:8], "little")
        flbas = data[26] & 0xF
        lbads = data[128 + 4 * flbas + 2]
        return Namespace(nsid, nsze, 1 << lbads)

    def log_page(self, lid: int, size: int) -> bytes:
        """Get Log Page (NVMe 2.0, 5.16) of ``size`` bytes."""
        numd = size // 4 - 1
        return self._admin_data(
            ADMIN_GET_LOG,
            0xFFFFFFFF,
            ((numd & 0xFFFF) << 16 | lid, numd >> 16),
            f"Get Log Page {lid:#x}",
            size,
        )

    def smart(self) -> dict[str, int]:
        """SMART / Health Information (log 02h), the fields people look at."""
        d = self.log_page(LOG_SMART, 512)
        return {
            "critical_warning": d[0],
            "temperature_k": int.from_bytes(d[1:3], "little"),
            "available_spare_pct": d[3],
            "percentage_used": d[5],
            "data_units_read": int.from_bytes(d[32:48], "little"),
            "data_units_written": int.from_bytes(d[48:64], "little"),
            "host_read_commands": int.from_bytes(d[64:80], "little"),
            "host_write_commands": int.from_bytes(d[80:96], "little"),
            "power_on_hours": int.from_bytes(d[128:144], "little"),
        }

    def error_log(self, entries: int = 4) -> list[dict[str, int]]:
        """Error Information log (01h): the non-empty entries."""
        d = self.log_page(LOG_ERROR, 64 * entries)
        out = []
        for i in range(entries):
            e = d[64 * i : 64 * (i + 1)]
            count = int.from_bytes(e[0:8], "little")
            if count:
                out.append(
                    {
                        "error_count": count,
                        "sqid": int.from_bytes(e[8:10], "little"),
                        "cid": int.from_bytes(e[10:12], "little"),
                        "status": int.from_bytes(e[12:14], "little") >> 1,
                    }
                )
        return out

    def create_io_queues(self, count: int, depth: int = 256) -> list[QueuePair]:
        """Set Features Number of Queues, then create ``count`` CQ/SQ pairs (as many as granted)."""
        if count < 1:
            raise ValueError("ask for at least one I/O queue")
        want = count - 1
        dw0 = self.admin.run(
            ADMIN_SET_FEATURES,
            cdw=(FEAT_NUM_QUEUES, (want << 16) | want),
            what="Set Features Number of Queues",
        )
        granted = min((dw0 & 0xFFFF) + 1, ((dw0 >> 16) & 0xFFFF) + 1, count)
        depth = min(depth, self.mqes)
        made = []
        for qid in range(len(self.io_queues) + 1, len(self.io_queues) + 1 + granted):
            vector = qid if self.interrupts and qid < self.vfio.enabled_vectors() else None
            q = QueuePair(self, qid, depth, vector)
            cq_flags = 0x1 | (0x2 if vector is not None else 0)  # PC=1, IEN when interrupts
            self.admin.run(
                ADMIN_CREATE_CQ,
                prp1=q.cq[1],
                cdw=(((depth - 1) << 16) | qid, ((vector or 0) << 16) | cq_flags),
                what=f"Create I/O CQ {qid}",
            )
            self.admin.run(
                ADMIN_CREATE_SQ,
                prp1=q.sq[1],
                cdw=(((depth - 1) << 16) | qid, (qid << 16) | 0x1),
                what=f"Create I/O SQ {qid}",
            )
            self.io_queues.append(q)
            made.append(q)
        return made

    def pool_stats(self) -> dict[str, int]:
        """The DMA atomic pools' sizes (debugfs dma_pools/)."""
        return self.dma.ctx.pools.stats()


def pattern(
    lba_size: int, first_lba: int, nblocks: int, seed: int = 0x5EED
) -> npt.NDArray[np.uint8]:
    """A pattern that names each LBA (so a misplaced block shows), for write/read/verify."""
    out = np.empty(nblocks * lba_size, dtype=np.uint8)
    view = out.view("<u8")
    per = lba_size // 8
    for i in range(nblocks):
        view[i * per : (i + 1) * per] = (
            np.arange(per, dtype=np.uint64) ^ ((first_lba + i) << 32) ^ seed
        )
    return out


__all__ = [
    "IO_FLUSH",
    "IO_READ",
    "IO_WRITE",
    "CommandError",
    "Controller",
    "Namespace",
    "NvmeError",
    "QueuePair",
    "pattern",
]
