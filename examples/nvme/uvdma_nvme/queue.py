"""A queue pair and its requests (NVMe 2.0, 3.3 and 4).

A :class:`Request` is one command slot (CID), preallocated per queue as libvfn's
``nvme_rq``: it owns its PRP list page and is reused only after the caller collected its
result.  A :class:`QueuePair` submits (one ``struct.pack_into`` per SQE and a doorbell
write) and reaps (phase tags) under its lock, so threads may share it.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import struct
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from uvdma.dma import (
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    GFP_KERNEL,
    DmaBuffer,
    DmaDevice,
    dma_alloc_coherent,
    dma_free_coherent,
)
from uvdma.dma.gfp import DmaDataDirection
from uvdma.errors import UvdmaError
from uvdma_nvme.errors import CommandError, NvmeError
from uvdma_nvme.prp import PRP_ENTRIES, fill_prp_lists, plan_prps, prp_list_pages_needed
from uvdma_nvme.spec import DOORBELLS, SQE_FORMAT, IoOpcode

if TYPE_CHECKING:
    from uvdma_nvme.controller import Controller, Namespace

_SQE = struct.Struct(SQE_FORMAT)


class QueueMemory(NamedTuple):
    """Coherent DMA memory of a queue: where the CPU and the device see it, and its size."""

    cpu_addr: int
    dma_handle: int
    size: int


def _region(dev: DmaDevice, size: int) -> QueueMemory:
    cpu, dma = dma_alloc_coherent(dev, size, GFP_KERNEL)
    return QueueMemory(cpu, dma, size)


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
        self.sq = _region(dev, 64 * depth)  # zeroed: 64-byte SQEs
        try:
            self.cq = _region(dev, 16 * depth)  # 16-byte CQEs
        except BaseException:
            dma_free_coherent(dev, self.sq.size, self.sq.cpu_addr, self.sq.dma_handle)
            raise
        stride = 4 << ctrl.dstrd  # NVMe 2.0, 3.1.4.21: doorbell stride from CAP.DSTRD
        self._sq_doorbell = ctrl.bar.reg32(DOORBELLS + (2 * qid) * stride)  # checked once here
        self._cq_doorbell = ctrl.bar.reg32(DOORBELLS + (2 * qid + 1) * stride)
        self._sq_mem = memoryview((ctypes.c_char * self.sq.size).from_address(self.sq.cpu_addr))
        self._sq_mem = self._sq_mem.cast("B")
        # the CQ as 32-bit words: CQE DW0..DW3 (spec.CQE), DW3 read alone on the hot path
        self._cqe = (ctypes.c_uint32 * (4 * depth)).from_address(self.cq.cpu_addr)
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
        ctypes.memset(self.cq.cpu_addr, 0, self.cq.size)  # stale phase tags must not look new

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
        with self.ctrl._closing_as_closed():  # the controller may close under us
            translate = self.ctrl.vfio.domain.translate
            mapped = translate(dma) is not None and translate(dma + length - 1) is not None
        if not mapped:
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
        direction = DMA_FROM_DEVICE if opcode == IoOpcode.READ else DMA_TO_DEVICE
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
        transfer: _Transfer | None = None
        if isinstance(buf, DmaBuffer):
            self._check()
            dma = buf.dma
        else:
            transfer = ctrl._map(buf, size, direction)
            dma = transfer.handle
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
        self._transfer(IoOpcode.READ, ns, lba, buf, f"read of LBA {lba}")

    def write(self, ns: Namespace, lba: int, buf: Any) -> None:
        """Write ``buf`` (any buffer, or a DmaBuffer) starting at ``lba``."""
        self._transfer(IoOpcode.WRITE, ns, lba, buf, f"write of LBA {lba}")

    def flush(self, ns: Namespace) -> None:
        """Flush the volatile write cache (NVM command set 1.0, 3.2.2)."""
        self.run(IoOpcode.FLUSH, ns.nsid, what="flush")

    def _free_memory(self) -> None:
        """Give the queue memory back (the device can no longer touch it). Idempotent."""
        if self._freed:
            return
        self._freed = True
        for req in self._requests:
            for _view, dma, vaddr in req.lists:
                self.ctrl.prp_pool.free(vaddr, dma)
            req.lists.clear()
        for r in (self.cq, self.sq):
            dma_free_coherent(self.ctrl.dma, r.size, r.cpu_addr, r.dma_handle)

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
