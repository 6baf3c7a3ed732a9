"""A minimal userspace NVMe driver on uvdma.

Its queues come from ``dma_alloc_coherent`` and its PRP lists from a ``dma_pool``, as in
Linux's nvme driver; data lives in the caller's buffers (``dma_map_single``) or in
``DmaBuffer``s.  References are to the NVM Express Base Specification 2.0 ("NVMe 2.0").

    with Controller.open("0000:01:00.0") as ctrl:
        ns = ctrl.namespace(1)
        q = ctrl.create_io_queues(1)[0]
        data = np.zeros(ns.lba_size * 8, dtype=np.uint8)
        q.read(ns, lba=0, buf=data)

The rule the driver is built on: memory a command lets the device reach (data pages,
bounce pages, PRP list pages) belongs to the command until the device can no longer
touch it, that is until its completion has been reaped or the controller has been
disabled (CC.EN=0 and CSTS.RDY=0: a disabled controller does no DMA).  A command that
times out is aborted (admin opcode 08h); if that does not complete it, the controller is
reset, every outstanding command fails naming itself, and the controller comes back with
the same I/O queues, as Linux's nvme_timeout does.  See docs/nvme.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from uvdma.dma import (
    DMA_ATTR_SKIP_CPU_SYNC,
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
    dma_unmap_single_attrs,
)
from uvdma.dma.gfp import DmaDataDirection
from uvdma.errors import UvdmaError
from uvdma.vfio import Bar, VfioDevice, open_device
from uvdma.vfio.faults import IommuFault, IommuFaultLog

PAGE = 4096  # CC.MPS = 0: memory pages of 4 KiB
PRP_ENTRIES = PAGE // 8  # entries in one PRP list page

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
CSTS_RDY, CSTS_CFS = 0x1, 0x2
ALL_ONES = 0xFFFFFFFF  # what a read returns from a device that is gone
PCI_COMMAND, PCI_COMMAND_MASTER = 0x04, 0x4

# NVMe 2.0, 5: admin opcodes; NVM command set 1.0, 3: I/O opcodes
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG, ADMIN_DELETE_CQ = 0x00, 0x01, 0x02, 0x04
ADMIN_CREATE_CQ, ADMIN_IDENTIFY, ADMIN_ABORT, ADMIN_SET_FEATURES = 0x05, 0x06, 0x08, 0x09
IO_FLUSH, IO_WRITE, IO_READ = 0x00, 0x01, 0x02
FEAT_NUM_QUEUES = 0x07
LOG_ERROR, LOG_SMART = 0x01, 0x02
MAX_QUEUES = 65535  # NVMe 2.0, 5.27.1.5: NSQR/NCQR are 16-bit, zero-based
DEFAULT_IO_QUEUES = 1024  # asked for at enable (SPDK's default); created only on request

SCT_GENERIC, SCT_COMMAND_SPECIFIC, SCT_MEDIA, SCT_PATH = 0, 1, 2, 3
SC_ABORT_REQUESTED = 0x07

# Status codes by status code type (NVMe 2.0, Figures 100-103; NVM command set 1.0, 4.1.2)
STATUS_NAMES: dict[tuple[int, int], str] = (
    {
        (SCT_GENERIC, sc): name
        for sc, name in {
            0x00: "Successful Completion",
            0x01: "Invalid Command Opcode",
            0x02: "Invalid Field in Command",
            0x03: "Command ID Conflict",
            0x04: "Data Transfer Error",
            0x05: "Commands Aborted due to Power Loss Notification",
            0x06: "Internal Error",
            0x07: "Command Abort Requested",
            0x08: "Command Aborted due to SQ Deletion",
            0x09: "Command Aborted due to Failed Fused Command",
            0x0A: "Command Aborted due to Missing Fused Command",
            0x0B: "Invalid Namespace or Format",
            0x0C: "Command Sequence Error",
            0x0D: "Invalid SGL Segment Descriptor",
            0x0E: "Invalid Number of SGL Descriptors",
            0x0F: "Data SGL Length Invalid",
            0x10: "Metadata SGL Length Invalid",
            0x11: "SGL Descriptor Type Invalid",
            0x12: "Invalid Use of Controller Memory Buffer",
            0x13: "PRP Offset Invalid",
            0x14: "Atomic Write Unit Exceeded",
            0x15: "Operation Denied",
            0x16: "SGL Offset Invalid",
            0x18: "Host Identifier Inconsistent Format",
            0x19: "Keep Alive Timer Expired",
            0x1A: "Keep Alive Timeout Invalid",
            0x1B: "Command Aborted due to Preempt and Abort",
            0x1C: "Sanitize Failed",
            0x1D: "Sanitize In Progress",
            0x1E: "SGL Data Block Granularity Invalid",
            0x1F: "Command Not Supported for Queue in CMB",
            0x20: "Namespace is Write Protected",
            0x21: "Command Interrupted",
            0x22: "Transient Transport Error",
            0x23: "Command Prohibited by Command and Feature Lockdown",
            0x24: "Admin Command Media Not Ready",
            0x80: "LBA Out of Range",
            0x81: "Capacity Exceeded",
            0x82: "Namespace Not Ready",
            0x83: "Reservation Conflict",
            0x84: "Format In Progress",
            0x85: "Invalid Value Size",
            0x86: "Invalid Key Size",
            0x87: "KV Key Does Not Exist",
            0x88: "Unrecovered Error",
            0x89: "Key Exists",
        }.items()
    }
    | {
        (SCT_COMMAND_SPECIFIC, sc): name
        for sc, name in {
            0x00: "Completion Queue Invalid",
            0x01: "Invalid Queue Identifier",
            0x02: "Invalid Queue Size",
            0x03: "Abort Command Limit Exceeded",
            0x05: "Asynchronous Event Request Limit Exceeded",
            0x06: "Invalid Firmware Slot",
            0x07: "Invalid Firmware Image",
            0x08: "Invalid Interrupt Vector",
            0x09: "Invalid Log Page",
            0x0A: "Invalid Format",
            0x0B: "Firmware Activation Requires Conventional Reset",
            0x0C: "Invalid Queue Deletion",
            0x0D: "Feature Identifier Not Saveable",
            0x0E: "Feature Not Changeable",
            0x0F: "Feature Not Namespace Specific",
            0x10: "Firmware Activation Requires NVM Subsystem Reset",
            0x11: "Firmware Activation Requires Controller Level Reset",
            0x12: "Firmware Activation Requires Maximum Time Violation",
            0x13: "Firmware Activation Prohibited",
            0x14: "Overlapping Range",
            0x15: "Namespace Insufficient Capacity",
            0x16: "Namespace Identifier Unavailable",
            0x18: "Namespace Already Attached",
            0x19: "Namespace Is Private",
            0x1A: "Namespace Not Attached",
            0x1B: "Thin Provisioning Not Supported",
            0x1C: "Controller List Invalid",
            0x1D: "Device Self-test In Progress",
            0x1E: "Boot Partition Write Prohibited",
            0x1F: "Invalid Controller Identifier",
            0x20: "Invalid Secondary Controller State",
            0x21: "Invalid Number of Controller Resources",
            0x22: "Invalid Resource Identifier",
            0x23: "Sanitize Prohibited While Persistent Memory Region is Enabled",
            0x24: "ANA Group Identifier Invalid",
            0x25: "ANA Attach Failed",
            0x26: "Insufficient Capacity",
            0x27: "Namespace Attachment Limit Exceeded",
            0x28: "Prohibition of Command Execution Not Supported",
            0x29: "I/O Command Set Not Supported",
            0x2A: "I/O Command Set Not Enabled",
            0x2B: "I/O Command Set Combination Rejected",
            0x2C: "Invalid I/O Command Set",
            0x2D: "Identifier Unavailable",
            0x80: "Conflicting Attributes",
            0x81: "Invalid Protection Information",
            0x82: "Attempted Write to Read Only Range",
            0x83: "Command Size Limit Exceeded",
            0xB8: "Zoned Boundary Error",
            0xB9: "Zone Is Full",
            0xBA: "Zone Is Read Only",
            0xBB: "Zone Is Offline",
            0xBC: "Zone Invalid Write",
            0xBD: "Too Many Active Zones",
            0xBE: "Too Many Open Zones",
            0xBF: "Invalid Zone State Transition",
        }.items()
    }
    | {
        (SCT_MEDIA, sc): name
        for sc, name in {
            0x80: "Write Fault",
            0x81: "Unrecovered Read Error",
            0x82: "End-to-end Guard Check Error",
            0x83: "End-to-end Application Tag Check Error",
            0x84: "End-to-end Reference Tag Check Error",
            0x85: "Compare Failure",
            0x86: "Access Denied",
            0x87: "Deallocated or Unwritten Logical Block",
            0x88: "End-to-End Storage Tag Check Error",
        }.items()
    }
    | {
        (SCT_PATH, sc): name
        for sc, name in {
            0x00: "Internal Path Error",
            0x01: "Asymmetric Access Persistent Loss",
            0x02: "Asymmetric Access Inaccessible",
            0x03: "Asymmetric Access Transition",
            0x60: "Controller Pathing Error",
            0x70: "Host Pathing Error",
            0x71: "Command Aborted By Host",
        }.items()
    }
)


def status_name(sct: int, sc: int) -> str:
    """The specification's name of a status (SCT, SC); vendor-specific and reserved say so."""
    name = STATUS_NAMES.get((sct, sc))
    if name is not None:
        return name
    if sct == 7:
        return "Vendor Specific"
    return "reserved status"


_SQE = struct.Struct("<IIQQQQ6I")  # a submission queue entry, 64 bytes (NVMe 2.0, Figure 88)


class NvmeError(UvdmaError):
    """A controller error, or a command that completed with an error status."""


class CommandError(NvmeError):
    """A command completed with a non-zero status; ``sct``/``sc`` hold it, decoded by name."""

    def __init__(self, what: str, sct: int, sc: int) -> None:
        name = status_name(sct, sc)
        super().__init__(f"{what}: {name} (SCT {sct:#x}, SC {sc:#x})")
        self.sct, self.sc, self.name = sct, sc, name


class CommandTimeoutError(NvmeError, TimeoutError):
    """A command did not complete in time.  By the time this is raised the device can no
    longer touch the command's memory: the command was aborted (``aborted``) or the
    controller was reset (``reset``)."""

    def __init__(self, message: str, *, aborted: bool = False, reset: bool = False) -> None:
        super().__init__(message)
        self.aborted, self.reset = aborted, reset


class ControllerResetError(NvmeError):
    """A command was failed because the controller was reset under it (another command's
    timeout, or CSTS.CFS); the controller works again, the command did not happen or
    happened only in part."""


class ControllerGoneError(NvmeError):
    """The controller reads all-ones (surprise removal, a dead link) or could not be
    brought back after a reset: every command fails at once."""


class ControllerClosedError(NvmeError):
    """The controller was closed (or released at the kernel's request) and cannot be used."""


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


# -- PRPs: pure functions (NVMe 2.0, 4.1.1) -------------------------------------------------


class PrpPlan(NamedTuple):
    """Where a transfer's memory pages are: PRP1, then ``pages`` more pages starting at
    ``next_page`` (each the previous plus 4 KiB)."""

    prp1: int
    next_page: int
    pages: int


def plan_prps(dma: int, length: int) -> PrpPlan:
    """The pages a ``length``-byte transfer at ``dma`` touches, after the first."""
    first = PAGE - (dma % PAGE)
    if length <= first:
        return PrpPlan(dma, 0, 0)
    return PrpPlan(dma, dma - (dma % PAGE) + PAGE, (length - first + PAGE - 1) // PAGE)


def prp_list_pages_needed(pages: int) -> int:
    """PRP list pages for a transfer with ``pages`` pages after the first: none for one
    (PRP2 points at it), else lists of 512 entries whose last entry chains to the next."""
    if pages <= 1:
        return 0
    if pages <= PRP_ENTRIES:
        return 1
    return 1 + (pages - PRP_ENTRIES + PRP_ENTRIES - 2) // (PRP_ENTRIES - 1)


def fill_prp_lists(plan: PrpPlan, lists: Sequence[tuple[npt.NDArray[np.uint64], int]]) -> int:
    """Write the PRP list(s) of ``plan`` into ``lists`` ((entries view, dma) per page, as
    many as :func:`prp_list_pages_needed` says); returns PRP2."""
    if plan.pages == 0:
        return 0
    if plan.pages == 1:
        return plan.next_page
    page, left = plan.next_page, plan.pages
    for i, (entries, _dma) in enumerate(lists):
        room = PRP_ENTRIES if left <= PRP_ENTRIES else PRP_ENTRIES - 1
        n = min(room, left)
        # one C-level fill of the whole list page
        entries[:n] = np.arange(page, page + n * PAGE, PAGE, dtype=np.uint64)
        page += n * PAGE
        left -= n
        if left:
            entries[PRP_ENTRIES - 1] = lists[i + 1][1]  # chain to the next list
        else:
            break
    return lists[0][1]


# -- requests ----------------------------------------------------------------------------------

FREE, INFLIGHT, DONE, FAILED = 0, 1, 2, 3


class Request:
    """One command slot of a queue (its CID), preallocated, as libvfn's ``nvme_rq``.

    It owns its PRP list page (allocated the first time it needs one, kept for the life
    of the queue) and is reused only after the caller has collected its result with
    :meth:`QueuePair.complete` (or :meth:`QueuePair.wait` and :meth:`QueuePair.release`).
    """

    __slots__ = ("cid", "dw0", "error", "lists", "qid", "state", "status", "what")

    def __init__(self, qid: int, cid: int) -> None:
        self.qid, self.cid = qid, cid
        self.state = FREE
        self.status = 0
        self.dw0 = 0
        self.what = ""
        self.error: NvmeError | None = None
        self.lists: list[tuple[npt.NDArray[np.uint64], int, int]] = []  # (view, dma, vaddr)

    @property
    def done(self) -> bool:
        """Whether the device is finished with it (completed, or failed by a reset)."""
        return self.state >= DONE

    def __repr__(self) -> str:
        state = ("free", "in flight", "done", "failed")[self.state]
        return f"Request({self.what or '-'}, cid {self.cid} on queue {self.qid}, {state})"


class _Transfer:
    """The streaming mapping of one read()/write(): the controller holds it while the
    device may reach it, and releases it (or hands it to close()) when it cannot."""

    __slots__ = ("direction", "handle", "released", "size")

    def __init__(self, handle: int, size: int, direction: DmaDataDirection) -> None:
        self.handle, self.size, self.direction = handle, size, direction
        self.released = False


class QueuePair:
    """A submission queue and its completion queue (NVMe 2.0, 3.3), in coherent DMA memory.

    Safe to share between threads: submission and reaping take the queue's lock, and each
    thread waits for its own requests.  Threads with a queue each do not contend.
    """

    def __init__(self, ctrl: Controller, qid: int, depth: int, vector: int | None) -> None:
        self.ctrl, self.qid, self.depth, self.vector = ctrl, qid, depth, vector
        dev = ctrl.dma
        self.sq = dma_alloc_coherent(dev, 64 * depth, GFP_KERNEL)  # zeroed
        try:
            self.cq = dma_alloc_coherent(dev, 16 * depth, GFP_KERNEL)
        except BaseException:
            dma_free_coherent(dev, 64 * depth, *self.sq)
            raise
        stride = 4 << ctrl.dstrd  # NVMe 2.0, 3.1.4.21: doorbell stride from CAP.DSTRD
        self._sq_doorbell = ctrl.bar.reg32(DOORBELLS + (2 * qid) * stride)  # checked once here
        self._cq_doorbell = ctrl.bar.reg32(DOORBELLS + (2 * qid + 1) * stride)
        self._sq_mem = memoryview((ctypes.c_char * (64 * depth)).from_address(self.sq[0])).cast("B")
        self._cqe = (ctypes.c_uint32 * (4 * depth)).from_address(self.cq[0])
        # the admin queue's lock is re-entrant: a reset runs admin commands while it holds
        # every queue's lock
        self._lock: Any = threading.RLock() if qid == 0 else threading.Lock()
        self._requests = [Request(qid, cid) for cid in range(depth - 1)]  # a full queue
        self._free = list(range(depth - 2, -1, -1))  # keeps one slot empty (NVMe 2.0, 3.3.1.5)
        self._freed = False
        self._reset_state()

    def _reset_state(self) -> None:
        """Empty queues, as after creation (the caller holds the lock or owns the queue)."""
        self._sq_tail = 0
        self._cq_head = 0
        self._phase = 1
        ctypes.memset(self.cq[0], 0, 16 * self.depth)  # stale phase tags must not look new

    @property
    def outstanding(self) -> int:
        """Commands submitted whose result has not been collected yet."""
        return len(self._requests) - len(self._free)

    def _check(self) -> None:
        if self._freed or self.ctrl._failed is not None:
            raise self.ctrl._unusable()

    # -- submission ------------------------------------------------------------------------
    def _take(self, what: str) -> Request:
        with self._lock:
            self._check()
            if not self._free:
                raise NvmeError(
                    f"{what}: queue {self.qid} is full ({len(self._requests)} commands "
                    "outstanding or not yet collected with complete())"
                )
            req = self._requests[self._free.pop()]
            req.what = what
            req.error = None
            return req

    def _give_back(self, req: Request) -> None:
        with self._lock:
            req.state = FREE
            self._free.append(req.cid)

    def _post(
        self,
        req: Request,
        opcode: int,
        nsid: int,
        prp1: int,
        prp2: int,
        c10: int,
        c11: int,
        c12: int,
        c13: int = 0,
        c14: int = 0,
        c15: int = 0,
    ) -> None:
        """Write the SQE at the tail and ring the doorbell (NVMe 2.0, 4.2)."""
        with self._lock:
            try:
                self._check()
            except NvmeError:
                req.state = FREE
                self._free.append(req.cid)
                raise
            tail = self._sq_tail
            # CDW0 (opcode, CID), NSID, reserved, MPTR, PRP1, PRP2, CDW10..15 in one store
            _SQE.pack_into(
                self._sq_mem,
                tail * 64,
                opcode | (req.cid << 16),
                nsid,
                0,
                0,
                prp1,
                prp2,
                c10,
                c11,
                c12,
                c13,
                c14,
                c15,
            )
            req.state = INFLIGHT
            tail += 1
            self._sq_tail = tail = 0 if tail == self.depth else tail
            self._sq_doorbell.value = tail

    def submit(
        self,
        opcode: int,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: Sequence[int] = (),
        what: str = "",
    ) -> Request:
        """Submit one command with the given CDW10..15; collect it with :meth:`complete`."""
        c = (*cdw, 0, 0, 0, 0, 0, 0)
        req = self._take(what or f"opcode {opcode:#x}")
        self._post(req, opcode, nsid, prp1, prp2, c[0], c[1], c[2], c[3], c[4], c[5])
        return req

    # -- completion ------------------------------------------------------------------------
    def reap(self) -> int:
        """Consume every posted CQE (phase tag, NVMe 2.0, 4.6); returns how many."""
        with self._lock:
            self._check()
            n = 0
            cqe = self._cqe
            requests = self._requests
            head, phase = self._cq_head, self._phase
            while True:
                base = head * 4
                dw3 = cqe[base + 3]
                if (dw3 >> 16) & 1 != phase:
                    break
                cid = dw3 & 0xFFFF
                if cid < len(requests):
                    req = requests[cid]
                    if req.state == INFLIGHT:
                        req.status, req.dw0, req.state = dw3 >> 17, cqe[base], DONE
                head += 1
                if head == self.depth:
                    head, phase = 0, phase ^ 1
                n += 1
            if n:
                self._cq_head, self._phase = head, phase
                self._cq_doorbell.value = head
            return n

    def wait(self, req: Request, timeout: float | None = None) -> int:
        """Until ``req`` is done (polling, or the MSI-X eventfd); its DW0.

        A non-zero status raises :class:`CommandError`.  No completion within the timeout
        starts recovery (abort, then reset) and raises :class:`CommandTimeoutError` once the
        device can no longer touch the command's memory.
        """
        if req.state == FREE:
            raise NvmeError(f"{req!r} is not in flight (already collected?)")
        ctrl = self.ctrl
        timeout = ctrl.command_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while req.state == INFLIGHT:
            if self.reap():
                continue
            ctrl._check_health()
            if req.state != INFLIGHT:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                ctrl._recover(self, req, timeout)
                break
            if self.vector is not None and ctrl.interrupts:
                with contextlib.suppress(TimeoutError):  # re-check the queue either way
                    ctrl.vfio.wait_irq(self.vector, min(left, 0.1))
        return self._result(req)

    def _result(self, req: Request) -> int:
        if req.state == FAILED:
            assert req.error is not None  # FAILED is always set with its error
            raise req.error
        if req.status:
            sct, sc = (req.status >> 8) & 0x7, req.status & 0xFF
            raise CommandError(f"{req.what} on queue {self.qid}", sct, sc)
        return req.dw0

    def release(self, req: Request) -> None:
        """Give a finished request's slot back (what :meth:`complete` does after waiting)."""
        if req.state in (DONE, FAILED):
            self._give_back(req)
        elif req.state == INFLIGHT:
            raise NvmeError(f"{req!r}: the device may still use it; wait for it first")

    def complete(self, req: Request, timeout: float | None = None) -> int:
        """Wait for ``req`` and give its slot back; its DW0 (raises as :meth:`wait`)."""
        try:
            return self.wait(req, timeout)
        finally:
            if req.state in (DONE, FAILED):
                self._give_back(req)

    def run(
        self,
        opcode: int,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: Sequence[int] = (),
        what: str = "",
        timeout: float | None = None,
    ) -> int:
        """submit + complete."""
        return self.complete(self.submit(opcode, nsid, prp1, prp2, cdw, what), timeout)

    def _retire(self, error: NvmeError) -> None:
        """Fail every command in flight (the caller holds the lock and has made sure the
        device can no longer touch their memory)."""
        for req in self._requests:
            if req.state == INFLIGHT:
                req.state = FAILED
                req.error = type(error)(f"{req.what} (cid {req.cid}) on queue {self.qid}: {error}")

    # -- I/O (NVM command set 1.0, 3.2) ----------------------------------------------------
    def _prp_lists(self, req: Request, count: int) -> list[tuple[npt.NDArray[np.uint64], int]]:
        while len(req.lists) < count:  # the request's own list pages, kept for reuse
            vaddr, dma = self.ctrl.prp_pool.alloc()
            view = np.ctypeslib.as_array((ctypes.c_uint64 * PRP_ENTRIES).from_address(vaddr))
            req.lists.append((view, dma, vaddr))
        return [(view, dma) for view, dma, _ in req.lists[:count]]

    def io(
        self, opcode: int, ns: Namespace, lba: int, nblocks: int, dma: int, what: str
    ) -> Request:
        """Submit one read/write of ``nblocks`` LBAs at ``dma`` (memory the caller keeps
        allocated until :meth:`complete` returns or raises)."""
        lba, nblocks = _integer(lba, "LBA", what), _integer(nblocks, "block count", what)
        if nblocks < 1 or lba < 0 or lba + nblocks > ns.blocks:
            raise NvmeError(
                f"{what}: LBAs {lba}..{lba + nblocks - 1} are outside namespace {ns.nsid} "
                f"(0..{ns.blocks - 1})"
            )
        length = nblocks * ns.lba_size
        if length > self.ctrl.max_transfer:
            raise NvmeError(
                f"{what}: {length} bytes exceed the controller's MDTS "
                f"({self.ctrl.max_transfer} bytes): split it (read()/write() do)"
            )
        translate = self.ctrl.vfio.domain.translate
        if translate(dma) is None or translate(dma + length - 1) is None:
            raise NvmeError(
                f"{what}: DMA address {dma:#x}+{length:#x} is not mapped in the device's IOMMU "
                "domain: the IOMMU would block the transfer (use dma_map_single or a DmaBuffer)"
            )
        plan = plan_prps(dma, length)
        req = self._take(what)
        try:
            lists = self._prp_lists(req, prp_list_pages_needed(plan.pages))
            prp2 = fill_prp_lists(plan, lists)
        except BaseException:
            self._give_back(req)
            raise
        self._post(req, opcode, ns.nsid, dma, prp2, lba & 0xFFFFFFFF, lba >> 32, nblocks - 1)
        return req

    def _transfer(self, opcode: int, ns: Namespace, lba: int, buf: Any, what: str) -> None:
        ctrl = self.ctrl
        lba = _integer(lba, "LBA", what)
        direction = DMA_FROM_DEVICE if opcode == IO_READ else DMA_TO_DEVICE
        if isinstance(buf, DmaBuffer):
            size = buf.size
        else:
            try:
                view = memoryview(buf)
            except TypeError:
                raise NvmeError(
                    f"{what}: a {type(buf).__name__} is not a buffer: pass a numpy array, "
                    "bytearray, mmap or DmaBuffer"
                ) from None
            if view.readonly and direction == DMA_FROM_DEVICE:
                raise NvmeError(
                    f"{what}: the buffer ({type(buf).__name__}) is read-only, so the read "
                    "could not land in it: pass a bytearray, numpy array, mmap or DmaBuffer"
                )
            size = view.nbytes
        if size == 0 or size % ns.lba_size:
            raise NvmeError(
                f"{what}: the buffer ({size} bytes) must be a non-empty multiple of the "
                f"{ns.lba_size}-byte LBA"
            )
        nblocks = size // ns.lba_size
        if lba < 0 or lba + nblocks > ns.blocks:
            raise NvmeError(
                f"{what}: LBAs {lba}..{lba + nblocks - 1} are outside namespace {ns.nsid} "
                f"(0..{ns.blocks - 1})"
            )
        self._check()
        transfer: _Transfer | None = None
        if isinstance(buf, DmaBuffer):
            dma = buf.dma
        else:
            dma = dma_map_single(ctrl.dma, buf, direction)
            transfer = ctrl._hold(_Transfer(dma, size, direction))
        reqs: list[Request] = []
        ok = False
        try:
            step = ctrl.max_transfer // ns.lba_size  # split at MDTS
            for off in range(0, nblocks, step):
                n = min(step, nblocks - off)
                reqs.append(self.io(opcode, ns, lba + off, n, dma + off * ns.lba_size, what))
                if len(reqs) >= len(self._requests):
                    self.complete(reqs.pop(0))
            while reqs:
                self.complete(reqs[0])
                reqs.pop(0)
            ok = True
        finally:
            # Never return or raise while the device may still reach the memory: drain
            # whatever is still in flight first (a Ctrl-C waits for it too).
            interrupted = self._drain(reqs)
            if transfer is not None:
                ctrl._let_go(transfer, copy_out=ok)
            if interrupted is not None and ok:
                raise interrupted

    def _drain(self, reqs: list[Request]) -> BaseException | None:
        """Wait for ``reqs`` after an error, collecting and discarding their results; a
        KeyboardInterrupt meanwhile is kept for the caller to raise afterwards."""
        interrupted: BaseException | None = None
        for req in reqs:
            while req.state != FREE:
                try:
                    self.complete(req)
                except KeyboardInterrupt as e:
                    interrupted = e
                except (NvmeError, UvdmaError, TimeoutError):
                    pass  # the first error is the one the caller sees
        return interrupted

    def read(self, ns: Namespace, lba: int, buf: Any) -> None:
        """Read ``len(buf)`` bytes starting at ``lba`` into ``buf`` (a writable buffer:
        numpy array, bytearray, mmap, or a DmaBuffer)."""
        self._transfer(IO_READ, ns, lba, buf, f"read of LBA {lba}")

    def write(self, ns: Namespace, lba: int, buf: Any) -> None:
        """Write ``buf`` (any buffer, or a DmaBuffer) starting at ``lba``."""
        self._transfer(IO_WRITE, ns, lba, buf, f"write of LBA {lba}")

    def flush(self, ns: Namespace) -> None:
        """Flush the volatile write cache (NVM command set 1.0, 3.2.2)."""
        self.run(IO_FLUSH, ns.nsid, what="flush")

    def _free_memory(self) -> None:
        """Give the queue memory back (the device can no longer touch it). Idempotent."""
        if self._freed:
            return
        self._freed = True
        for req in self._requests:
            for _view, dma, vaddr in req.lists:
                self.ctrl.prp_pool.free(vaddr, dma)
            req.lists.clear()
        dma_free_coherent(self.ctrl.dma, 16 * self.depth, *self.cq)
        dma_free_coherent(self.ctrl.dma, 64 * self.depth, *self.sq)

    def __repr__(self) -> str:
        return f"QueuePair(qid {self.qid}, depth {self.depth}, {self.outstanding} outstanding)"


def _integer(value: object, name: str, what: str) -> int:
    """An int (or numpy integer); anything else is a clear error."""
    if isinstance(value, bool):
        raise NvmeError(f"{what}: the {name} must be an integer, not {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise NvmeError(
            f"{what}: the {name} must be an integer, not {type(value).__name__} {value!r}"
        ) from None


class Controller:
    """An NVMe controller driven from user space through VFIO.

    Public methods may be called from several threads.  After :meth:`close` (or after the
    kernel asked for the device back) every method raises :class:`ControllerClosedError`.
    """

    def __init__(
        self,
        vfio: VfioDevice,
        *,
        dma_bits: int = 64,
        admin_depth: int = 32,
        interrupts: bool = False,
        command_timeout: float = 10.0,
        io_queues: int = DEFAULT_IO_QUEUES,
    ) -> None:
        if not 2 <= admin_depth <= 4096:
            raise ValueError(f"admin_depth must be 2..4096, not {admin_depth}")
        if not command_timeout > 0:
            raise ValueError(f"command_timeout must be positive, not {command_timeout}")
        if not 1 <= io_queues <= MAX_QUEUES:
            raise ValueError(f"io_queues must be 1..{MAX_QUEUES}, not {io_queues}")
        self.vfio = vfio
        self.address = str(vfio.address)
        self.interrupts = interrupts
        self.command_timeout = command_timeout
        self.io_queues_wanted = io_queues
        self._lock = threading.RLock()  # configuration, recovery and close
        self._failed: NvmeError | None = None  # set when the controller cannot be used
        self._closed = False
        self._resets = 0
        self._resetting = False
        self._transfers: set[_Transfer] = set()
        self._quarantine: list[_Transfer] = []
        self.io_queues: list[QueuePair] = []
        self.queues_granted = 0
        self.max_transfer = PAGE  # until Identify Controller reports MDTS
        self.leaks: list[str] = []
        self.resets: list[str] = []  # why each reset happened
        self.bar: Bar = vfio.bar(0)
        # the kernel asking for the device back (uvdma unbind, hot-unplug) shuts us down
        vfio.on_release_request(self._release_requested)
        self.fault_log = IommuFaultLog(vfio.address)  # what the IOMMU blocked, from now on
        self.dma = DmaDevice(vfio)
        try:
            dma_set_mask_and_coherent(self.dma, DMA_BIT_MASK(dma_bits))
            cap = self.bar.read64(CAP)
            if cap == (1 << 64) - 1:
                raise ControllerGoneError(f"{self.address} reads all-ones: the device is gone")
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
            if interrupts:
                vfio.enable_irqs(min(vfio.irq_info(2).count, 32))
            self.admin = QueuePair(self, 0, min(admin_depth, self.mqes), 0 if interrupts else None)
        except BaseException:
            self.leaks = self.dma.close()
            self.fault_log.close()
            raise
        try:
            self._enable()
            ident = self.identify_controller()
            mdts = ident[77]  # in units of the minimum page size; 0: no limit
            self.max_transfer = min(PAGE << mdts, 1 << 20) if mdts else 1 << 20
            self.nn = int.from_bytes(ident[516:520], "little")
            self.serial = ident[4:24].decode(errors="replace").strip()
            self.model = ident[24:64].decode(errors="replace").strip()
            self.firmware = ident[64:72].decode(errors="replace").strip()
            self._set_queue_count()
        except BaseException:
            # a controller that never becomes ready (or answers nothing): give everything back
            self.close()
            raise

    @classmethod
    def open(cls, address: str, **kwargs: Any) -> Controller:
        """Open the controller at ``address`` (bound to vfio-pci) and bring it up."""
        vfio = open_device(address)
        try:
            return cls(vfio, **kwargs)
        except BaseException:
            vfio.close()
            raise

    # -- state -------------------------------------------------------------------------------
    def _unusable(self) -> NvmeError:
        """The error for a use of a controller that cannot be used (a fresh instance)."""
        failed = self._failed
        if failed is None:
            return ControllerClosedError(f"controller {self.address} is closed")
        return type(failed)(str(failed))

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._unusable()

    def _check_health(self) -> None:
        """One register read: CSTS.CFS starts a reset, all-ones marks the controller gone
        (both retire the commands in flight)."""
        if self._failed is not None:
            raise self._unusable()
        csts = self.bar.read32(CSTS)
        if csts == ALL_ONES:
            self._gone(
                f"controller {self.address} reads all-ones: the device is gone "
                "(surprise removal or a dead link)"
            )
        elif csts & CSTS_CFS:
            self.reset("the controller reported a fatal status (CSTS.CFS)")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def _all_queues(self) -> list[QueuePair]:
        return [self.admin, *self.io_queues]

    @contextlib.contextmanager
    def _quiesced(self) -> Iterator[None]:
        """Hold the controller and every queue: nobody submits or reaps meanwhile."""
        with self._lock, contextlib.ExitStack() as stack:
            for q in self._all_queues():
                stack.enter_context(q._lock)
            yield

    # -- bring-up and shutdown (NVMe 2.0, 3.5.1 and 3.6) -------------------------------------
    def check_fatal(self) -> None:
        """CSTS.CFS at any point is a clear error (used during bring-up)."""
        csts = self.bar.read32(CSTS)
        if csts == ALL_ONES:
            raise ControllerGoneError(f"controller {self.address} reads all-ones: it is gone")
        if csts & CSTS_CFS:
            raise NvmeError("the controller reports a fatal status (CSTS.CFS)")

    def _wait_ready(self, ready: bool) -> None:
        deadline = time.monotonic() + self.timeout
        while bool(self.bar.read32(CSTS) & CSTS_RDY) != ready:
            self.check_fatal()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"CSTS.RDY did not become {int(ready)} within CAP.TO ({self.timeout} s)"
                )
            time.sleep(0.0005)

    def _disable(self) -> bool:
        """CC.EN = 0 and wait for CSTS.RDY = 0: the controller stops all DMA.  When it does
        not stop in CAP.TO (or reads all-ones), turn bus mastering off so it cannot DMA
        either way.  Returns whether the controller stopped by itself."""
        try:
            if self.bar.read32(CC) & 1:
                self.bar.write32(CC, self.bar.read32(CC) & ~1)
            self._wait_ready(False)
            return True
        except (TimeoutError, NvmeError, UvdmaError):
            with contextlib.suppress(UvdmaError, OSError):
                cmd = self.vfio.config_read(PCI_COMMAND, 2)
                self.vfio.config_write(PCI_COMMAND, 2, cmd & ~PCI_COMMAND_MASTER)
            return False

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

    def _set_queue_count(self) -> None:
        """Set Features Number of Queues, once per enable (NVMe 2.0, 5.27.1.5): ask for
        ``io_queues``; ``queues_granted`` is what the controller allows."""
        want = self.io_queues_wanted - 1
        dw0 = self.admin.run(
            ADMIN_SET_FEATURES,
            cdw=(FEAT_NUM_QUEUES, (want << 16) | want),
            what="Set Features Number of Queues",
        )
        self.queues_granted = min((dw0 & 0xFFFF) + 1, ((dw0 >> 16) & 0xFFFF) + 1, want + 1)

    def _create_on_device(self, q: QueuePair) -> None:
        vector = q.vector
        cq_flags = 0x1 | (0x2 if vector is not None else 0)  # PC=1, IEN when interrupts
        self.admin.run(
            ADMIN_CREATE_CQ,
            prp1=q.cq[1],
            cdw=(((q.depth - 1) << 16) | q.qid, ((vector or 0) << 16) | cq_flags),
            what=f"Create I/O CQ {q.qid}",
        )
        try:
            self.admin.run(
                ADMIN_CREATE_SQ,
                prp1=q.sq[1],
                cdw=(((q.depth - 1) << 16) | q.qid, (q.qid << 16) | 0x1),
                what=f"Create I/O SQ {q.qid}",
            )
        except CommandError:
            with contextlib.suppress(NvmeError, TimeoutError):
                self.admin.run(ADMIN_DELETE_CQ, cdw=(q.qid,), what=f"delete CQ {q.qid}")
            raise

    def create_io_queues(self, count: int, depth: int = 256) -> list[QueuePair]:
        """Create ``count`` I/O CQ/SQ pairs of ``depth`` entries from the queues the
        controller granted; may be called again for more.  A failure frees what it took."""
        count = _integer(count, "queue count", "create_io_queues")
        depth = _integer(depth, "queue depth", "create_io_queues")
        if not 1 <= count <= MAX_QUEUES:
            raise NvmeError(f"create_io_queues: ask for 1..{MAX_QUEUES} queues, not {count}")
        if not 2 <= depth <= self.mqes:
            raise NvmeError(
                f"create_io_queues: depth {depth} is outside 2..{self.mqes} "
                "(a queue holds at least one command and at most CAP.MQES+1 entries)"
            )
        with self._lock:
            self._check_usable()
            left = self.queues_granted - len(self.io_queues)
            if count > left:
                raise NvmeError(
                    f"create_io_queues({count}): the controller granted "
                    f"{self.queues_granted} I/O queues and {len(self.io_queues)} exist: "
                    f"ask for at most {left}"
                )
            made: list[QueuePair] = []
            for _ in range(count):
                qid = len(self.io_queues) + 1
                irq = self.interrupts and qid < self.vfio.enabled_vectors()
                q = QueuePair(self, qid, depth, qid if irq else None)
                resets = self._resets
                try:
                    self._create_on_device(q)
                except BaseException:
                    if self._resets == resets or self._failed is None:
                        q._free_memory()  # the device never had the queue, or was reset
                    raise
                self.io_queues.append(q)
                made.append(q)
            return made

    # -- recovery (drivers/nvme/host/pci.c: nvme_timeout, nvme_reset_work) -------------------
    def _recover(self, q: QueuePair, req: Request, timeout: float) -> None:
        """``req`` timed out: abort it; if that does not complete it, reset.  Returns with
        ``req`` done (completed, or failed with the error to raise)."""
        what = f"{req.what} (cid {req.cid}) on queue {q.qid}: no completion within {timeout} s"
        with self._lock:
            if req.state == INFLIGHT:
                q.reap()
            if req.state != INFLIGHT:
                return  # completed meanwhile (the kernel's "completion polled")
            self._check_usable()
            if self._resetting:  # a command of the reset itself: the reset fails
                req.state = FAILED
                req.error = CommandTimeoutError(f"{what}, during a reset")
                return
            if q.qid != 0 and not self._closed:
                try:
                    not_aborted = (
                        self.admin.run(
                            ADMIN_ABORT,
                            cdw=((req.cid << 16) | q.qid,),
                            what=f"Abort of cid {req.cid} on queue {q.qid}",
                            timeout=self.command_timeout,
                        )
                        & 1
                    )
                except (NvmeError, TimeoutError):
                    not_aborted = 1
                if not not_aborted:
                    deadline = time.monotonic() + self.command_timeout
                    while req.state == INFLIGHT and time.monotonic() < deadline:
                        if not q.reap():
                            time.sleep(0.0005)
                if req.state == DONE:
                    if req.status & 0x7FF == SC_ABORT_REQUESTED:  # SCT 0, SC 07h
                        req.state = FAILED
                        req.error = CommandTimeoutError(
                            f"{what}; it was aborted (Abort command), the device no longer "
                            "touches its memory",
                            aborted=True,
                        )
                    return
            if req.state == INFLIGHT:
                self.reset(f"{what}", culprit=req)

    def reset(self, reason: str, culprit: Request | None = None) -> None:
        """Reset the controller: disable it (all DMA stops), bring it back with the same I/O
        queues, so the QueuePair objects callers hold keep working, and fail every command
        that was in flight, naming it and ``reason``.  If it cannot be brought back it is
        marked gone and its commands say so."""
        with self._quiesced():
            self._check_usable()
            if self._resetting:  # a fault while bringing it back: the reset fails
                raise NvmeError(f"{reason}, during a reset of controller {self.address}")
            self._resetting = True
            try:
                self._reset(reason, culprit)
            finally:
                self._resetting = False

    def _reset(self, reason: str, culprit: Request | None) -> None:
        self._resets += 1
        self.resets.append(reason)
        stopped = self._disable()
        # The device does no DMA now.  The commands stay "in flight" in software until the
        # verdict below; nobody sees them meanwhile (every queue's lock is held).
        stale = [(q, r) for q in self._all_queues() for r in q._requests if r.state == INFLIGHT]
        for q in self._all_queues():
            q._reset_state()
        failure = ""
        if not stopped:
            failure = "it did not stop within CAP.TO; bus mastering is off"
        else:
            try:
                self._enable()
                self._set_queue_count()
                if self.queues_granted < len(self.io_queues):
                    raise NvmeError(
                        f"it now grants {self.queues_granted} I/O queues, fewer than the "
                        f"{len(self.io_queues)} in use"
                    )
                for q in self.io_queues:
                    self._create_on_device(q)
            except (NvmeError, TimeoutError, UvdmaError) as e:
                self._disable()
                failure = f"it did not come back: {e}"
        after = (
            f"controller {self.address} was reset ({reason}) and is gone: {failure}"
            if failure
            else f"controller {self.address} was reset ({reason})"
        )
        kind: type[NvmeError] = ControllerGoneError if failure else ControllerResetError
        for q, r in stale:
            r.state = FAILED
            if r is culprit:
                r.error = CommandTimeoutError(
                    f"{reason}; the abort did not complete it, so {after}: the command did not "
                    "finish and the device no longer touches its memory",
                    reset=True,
                )
            else:
                r.error = kind(
                    f"{r.what} (cid {r.cid}) on queue {q.qid}: failed: {after}; the command did "
                    "not finish and the device no longer touches its memory"
                )
        if failure:
            self._mark_gone(after)

    def _gone(self, reason: str) -> None:
        """The controller cannot be used any more: fail everything now; memory its commands
        could reach is kept until close(), when the IOMMU mappings go first."""
        with self._quiesced():
            self._mark_gone(reason)

    def _mark_gone(self, reason: str) -> None:
        """:meth:`_gone` for a caller that holds every lock already (a reset)."""
        if self._failed is None:
            self._failed = ControllerGoneError(reason)
        err = ControllerGoneError(f"failed: {reason}")
        for q in self._all_queues():
            q._retire(err)
        self._quarantine.extend(self._transfers)
        self._transfers.clear()

    # -- streaming mappings of read()/write() ------------------------------------------------
    def _hold(self, t: _Transfer) -> _Transfer:
        with self._lock:
            self._transfers.add(t)
        return t

    def _let_go(self, t: _Transfer, *, copy_out: bool) -> None:
        """Unmap a transfer whose commands the device can no longer touch; what the device
        wrote is copied to the caller's buffer only when the transfer succeeded."""
        with self._lock:
            if t.released or t not in self._transfers:
                return  # quarantined (controller gone) or released by close()
            self._transfers.discard(t)
            t.released = True
            if copy_out:
                dma_unmap_single(self.dma, t.handle, t.size, t.direction)
            else:
                _unmap_no_sync(self.dma, t)

    # -- close --------------------------------------------------------------------------------
    def close(self) -> None:
        """Delete the I/O queues, shut down normally (CC.SHN), free all DMA memory, close
        the VFIO device.  Runs to the end whatever the controller does. Idempotent."""
        self._close(ControllerClosedError(f"controller {self.address} is closed"))

    def _release_requested(self, _dev: VfioDevice) -> None:
        """The kernel wants the device back (VFIO's device request, from uvdma's watcher
        thread): shut down cleanly and let go; later calls say why."""
        self._close(
            ControllerClosedError(
                f"controller {self.address} was released: the kernel asked for the device "
                "back (uvdma unbind or hot-unplug); open it again once it is bound to vfio-pci"
            )
        )

    def _close(self, why: ControllerClosedError) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._failed is None:
                    self._shutdown()
            finally:
                with self._quiesced():
                    if self._failed is None:
                        self._failed = why
                    err = ControllerClosedError(f"failed: {why}")
                    for q in self._all_queues():
                        q._retire(err)
                    self._release_all()

    def _shutdown(self) -> None:
        with contextlib.suppress(NvmeError, TimeoutError, UvdmaError):
            for q in reversed(self.io_queues):
                if q.outstanding:
                    break  # deleting a busy queue aborts its commands; the reset below stops them
                self.admin.run(ADMIN_DELETE_SQ, cdw=(q.qid,), what=f"delete SQ {q.qid}", timeout=1)
                self.admin.run(ADMIN_DELETE_CQ, cdw=(q.qid,), what=f"delete CQ {q.qid}", timeout=1)
        with contextlib.suppress(NvmeError, TimeoutError, UvdmaError):
            cc = self.bar.read32(CC)
            self.bar.write32(CC, (cc & ~(0x3 << 14)) | (0x1 << 14))  # CC.SHN = 01b: normal
            deadline = time.monotonic() + self.timeout
            while (self.bar.read32(CSTS) >> 2) & 0x3 != 0x2:  # CSTS.SHST = 10b: complete
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)

    def _release_all(self) -> None:
        """The device can no longer touch anything (disabled, or bus mastering off): give
        every piece of memory back, then the VFIO device."""
        with contextlib.ExitStack() as stack:
            stack.callback(self.vfio.close)  # runs last
            stack.callback(self.fault_log.close)

            def dma_close() -> None:
                self.leaks = self.dma.close()

            stack.callback(dma_close)
            stack.callback(self.prp_pool.destroy)
            for q in self._all_queues():
                stack.callback(q._free_memory)
            for t in [*self._transfers, *self._quarantine]:
                if not t.released:
                    t.released = True
                    stack.callback(_unmap_no_sync, self.dma, t)
            self._transfers.clear()
            self._quarantine.clear()
            stack.callback(self._disable)  # runs first

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
        self._check_usable()
        return self.fault_log.faults(wait)

    # -- admin commands ----------------------------------------------------------------------
    def _admin_data(
        self, opcode: int, nsid: int, cdw: Sequence[int], what: str, size: int = PAGE
    ) -> bytes:
        self._check_usable()
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
        nsid = _integer(nsid, "namespace id", "namespace")
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

    def pool_stats(self) -> dict[str, int]:
        """The DMA atomic pools' sizes (debugfs dma_pools/)."""
        self._check_usable()
        return self.dma.ctx.pools.stats()


def _unmap_no_sync(dev: DmaDevice, t: _Transfer) -> None:
    """Unmap a failed transfer without copying what the device wrote into the caller's
    buffer (``DMA_ATTR_SKIP_CPU_SYNC``)."""
    dma_unmap_single_attrs(dev, t.handle, t.size, t.direction, DMA_ATTR_SKIP_CPU_SYNC)


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
    "CommandTimeoutError",
    "Controller",
    "ControllerClosedError",
    "ControllerGoneError",
    "ControllerResetError",
    "Namespace",
    "NvmeError",
    "QueuePair",
    "Request",
    "pattern",
    "status_name",
]
