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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from uvdma.dma import (
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    GFP_KERNEL,
    DmaBuffer,
    DmaDevice,
    DmaRegion,
    dma_alloc_coherent,
    dma_free_coherent,
)
from uvdma.dma.gfp import DmaDataDirection
from uvdma.errors import ClosedError, UvdmaError
from uvdma_nvme.errors import CommandError, NvmeError
from uvdma_nvme.prp import (
    PRP_ENTRIES,
    PrpPlan,
    fill_prp_lists,
    fill_run,
    plan_prps,
    prp_list_pages_needed,
)
from uvdma_nvme.spec import DOORBELLS, PAGE, SQE_FORMAT, IoOpcode

if TYPE_CHECKING:
    from uvdma.vfio.domain import IommuDomain
    from uvdma_nvme.controller import Controller, Namespace

_SQE = struct.Struct(SQE_FORMAT)
# A Read or Write SQE (NVM 1.0, 3.2.4 and 3.2.6): CDW0 (opcode, CID), NSID, CDW2-3 and MPTR
# zero, PRP1, PRP2, CDW10-11 (SLBA, one little-endian qword), CDW12 (NLB, 0's based),
# CDW13-15 zero.  The pad bytes
# are written as zeros, so one call writes the whole 64-byte slot.
_RW_SQE = struct.Struct("<II16xQQQI12x")
_PAGE_MASK = PAGE - 1
_PAGE_SHIFT = PAGE.bit_length() - 1


def _region(dev: DmaDevice, size: int) -> DmaRegion:
    """Coherent DMA memory for a queue, with its size (the DMA API's typed region)."""
    cpu, dma = dma_alloc_coherent(dev, size, GFP_KERNEL)
    return DmaRegion(cpu, dma, size)


FREE, INFLIGHT, DONE, FAILED = 0, 1, 2, 3


class _RecheckError(Exception):
    """io_batch's one-pass checks met a command they cannot pass: check it in full."""


LOST = -1  # timed out in a worker process, which cannot recover it: kept until it completes


class Request:
    """One command slot of a queue (its CID), preallocated, as libvfn's ``nvme_rq``.

    It owns its PRP list page (allocated the first time it needs one, kept for the life
    of the queue) and is reused only after the caller has collected its result with
    :meth:`QueuePair.complete` (or :meth:`QueuePair.wait` and :meth:`QueuePair.release`).
    """

    __slots__ = ("cid", "dw0", "error", "lists", "qid", "rw", "state", "status", "tag", "what")

    def __init__(self, qid: int, cid: int) -> None:
        self.qid, self.cid = qid, cid
        self.tag = cid << 16  # CDW0's CID field (NVMe 2.0, Figure 87)
        self.state = FREE
        self.status = 0
        self.dw0 = 0
        self.rw = False  # a Read or Write: its CQE's DW0 means nothing and is not read
        self.what = ""
        self.error: NvmeError | None = None
        # its PRP list pages: (entries, dma, vaddr, the page as bytes)
        self.lists: list[tuple[npt.NDArray[np.uint64], int, int, memoryview]] = []

    @property
    def done(self) -> bool:
        """Whether the device is finished with it (completed, or failed by a reset)."""
        return self.state >= DONE

    def __repr__(self) -> str:
        state = ("free", "in flight", "done", "failed", "lost")[self.state]
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

    The hot path, per I/O: :meth:`io` (or :meth:`io_batch` for many with one doorbell
    write), :meth:`reap` (the requests it completed), :meth:`complete` or
    :meth:`release_all`.  Every check stays on it, made cheap: integers, the namespace's LBA
    range, MDTS, the DMA range mapped in the IOMMU domain (cached per mapping and
    re-checked after any unmap), a full queue, a controller that cannot be used.
    """

    def __init__(self, ctrl: Controller, qid: int, depth: int, vector: int | None) -> None:
        self.ctrl, self.qid, self.depth, self.vector = ctrl, qid, depth, vector
        dev = ctrl.dma
        self.sq = _region(dev, 64 * depth)  # zeroed: 64-byte SQEs
        try:
            self.cq = _region(dev, 16 * depth)  # 16-byte CQEs
        except BaseException:
            dma_free_coherent(dev, self.sq.size, self.sq.cpu_addr, self.sq.dma_addr)
            raise
        stride = 4 << ctrl.dstrd  # NVMe 2.0, 3.1.4.21: doorbell stride from CAP.DSTRD
        self._sq_doorbell = ctrl.bar.reg32(DOORBELLS + (2 * qid) * stride)  # checked once here
        self._cq_doorbell = ctrl.bar.reg32(DOORBELLS + (2 * qid + 1) * stride)
        self._sq_mem = memoryview((ctypes.c_char * self.sq.size).from_address(self.sq.cpu_addr))
        self._sq_mem = self._sq_mem.cast("B")
        # the CQ as 32-bit words: CQE DW0..DW3 (spec.CQE); DW3 alone on the hot path
        cq_bytes = memoryview((ctypes.c_char * self.cq.size).from_address(self.cq.cpu_addr))
        self._cqe = cq_bytes.cast("B").cast("I")
        # the admin queue's lock is re-entrant: a reset runs admin commands while it holds
        # every queue's lock
        self._lock: Any = threading.RLock() if qid == 0 else threading.Lock()
        self._requests = [Request(qid, cid) for cid in range(depth - 1)]  # a full queue
        self._free = list(range(depth - 2, -1, -1))  # keeps one slot empty (NVMe 2.0, 3.3.1.5)
        self._freed = False
        self._prp_scratch = np.zeros((), dtype=np.uint64)  # fill_prp_lists's, under the lock
        self._owner = "this process"  # or the worker process the queue was handed to
        self._given = False  # handed to a worker process (the parent keeps its hands off)
        # One flag for "refuse everything": memory freed, handed to another process, or the
        # controller failed or closed (set under this queue's lock: see _retire, _stop).
        self._blocked = False
        self._max_transfer = ctrl.max_transfer  # MDTS, known before any I/O queue exists
        # the IOMMU mapping the last I/O's memory was in: [lo, end) under the domain's
        # unmap count (an unmap anywhere makes the next I/O look again)
        self._domain: IommuDomain = ctrl.vfio.domain
        # (lo, end, unmap count) in one tuple: threads replace it whole, never torn
        self._map: tuple[int, int, int] = (0, 0, -1)
        self._reset_state()

    def _reset_state(self) -> None:
        """Empty queues, as after creation (the caller holds the lock or owns the queue)."""
        self._sq_tail = 0
        self._cq_head = 0
        self._phase = 1
        ctypes.memset(self.cq.cpu_addr, 0, self.cq.size)  # stale phase tags must not look new

    @property
    def requests(self) -> tuple[Request, ...]:
        """Every command slot of the queue, one :class:`Request` per CID (the same objects
        for the life of the queue): for a caller that looks for what is still in flight
        (``state == INFLIGHT``) or finished and not yet collected (``done``)."""
        return tuple(self._requests)

    @property
    def outstanding(self) -> int:
        """Commands submitted whose result has not been collected yet."""
        return len(self._requests) - len(self._free)

    def _check(self) -> None:
        if self._blocked:
            raise self._unusable()

    def _stop(self) -> None:
        """Refuse every use from now on (the caller holds the lock, or owns the queue)."""
        self._blocked = True

    def _unusable(self) -> NvmeError:
        if self._given and not self._freed and self.ctrl._failed is None:
            return NvmeError(
                f"queue {self.qid} was handed to {self._owner}: only that process uses it"
            )
        return self.ctrl._unusable()

    def _full(self, what: str, want: int = 1) -> NvmeError:
        return NvmeError(
            f"{what}: queue {self.qid} is full ({self.outstanding} of {len(self._requests)} "
            f"commands outstanding or not yet collected, {want} more asked): collect some "
            "with complete() or release_all() first"
        )

    # -- submission ------------------------------------------------------------------------
    def _take(self, what: str) -> Request:
        with self._lock:
            self._check()
            if not self._free:
                raise self._full(what)
            req = self._requests[self._free.pop()]
            req.what = what
            req.error = None
            req.rw = False
            return req

    def _give_back(self, req: Request) -> None:
        with self._lock:
            if req.state == FREE:
                return  # collected by another thread meanwhile: never twice on the list
            req.state = FREE
            req.error = None
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
        """Submit one command with the given CDW10..15; collect it with :meth:`complete`.

        The fields are checked before a command slot is taken (a bad one is a
        :class:`~uvdma_nvme.errors.NvmeError` and changes nothing): an 8-bit opcode, a 32-bit
        NSID and CDWs (at most six), 64-bit PRP entries.
        """
        if self.qid == 0:
            self.ctrl._check_admin_owner()
        label = what or "submit"
        _field(opcode, "opcode", 0xFF, label)
        _field(nsid, "NSID", 0xFFFF_FFFF, label)
        _field(prp1, "PRP1", (1 << 64) - 1, label)
        _field(prp2, "PRP2", (1 << 64) - 1, label)
        if len(cdw) > 6:
            raise NvmeError(f"{label}: at most six CDWs (10 to 15), not {len(cdw)}")
        for i, v in enumerate(cdw):
            _field(v, f"CDW{10 + i}", 0xFFFF_FFFF, label)
        c = (*cdw, 0, 0, 0, 0, 0, 0)
        req = self._take(what or f"opcode {opcode:#x}")
        self._post(req, opcode, nsid, prp1, prp2, c[0], c[1], c[2], c[3], c[4], c[5])
        return req

    # -- completion ------------------------------------------------------------------------
    def reap(self) -> list[Request]:
        """Consume every posted CQE (phase tag, NVMe 2.0, 4.6); returns the requests this
        call completed (empty when none).  They stay the caller's until collected with
        :meth:`complete`, :meth:`release` or :meth:`release_all`; threads sharing a queue
        each collect their own (see :meth:`wait`)."""
        with self._lock:  # not acquire() then ``try``: a Ctrl-C between would keep it
            if self._blocked:
                raise self._unusable()
            cqe = self._cqe
            head, phase = self._cq_head, self._phase
            want = phase << 16  # the phase tag of a new entry, in DW3
            dw3 = cqe[(head << 2) + 3]
            if dw3 & 0x10000 != want:
                return []  # nothing new: the common answer of a poll
            requests = self._requests
            depth = self.depth
            admin = self.qid == 0
            done: list[Request] = []
            add = done.append
            lost: list[Request] = []
            inflight, done_ = INFLIGHT, DONE  # locals: no global lookups per entry
            try:
                while dw3 & 0x10000 == want:
                    try:
                        req = requests[dw3 & 0xFFFF]
                    except IndexError:
                        pass  # a CID this queue never used: nothing to complete
                    else:
                        state = req.state
                        if state == inflight:
                            req.status = dw3 >> 17
                            if admin or not req.rw:  # a Read's or Write's DW0 means nothing
                                req.dw0 = cqe[head << 2]
                            req.state = done_
                            add(req)
                        elif state == LOST:  # its caller was told; the device is done now
                            lost.append(req)  # freed once the head has moved past it
                    head += 1
                    if head == depth:
                        head, phase, want = 0, phase ^ 1, want ^ 0x10000
                    dw3 = cqe[(head << 2) + 3]
            except BaseException:
                # a Ctrl-C in the loop: the head has not moved, so the next reap reads these
                # entries again and must find their requests still in flight
                for req in done:
                    req.state = INFLIGHT
                raise
            self._cq_head, self._phase = head, phase
            self._cq_doorbell.value = head
            for req in lost:  # (only now: a CQE read again must not meet a reused slot)
                req.state = FREE
                req.error = None
                self._free.append(req.cid)
            return done

    def wait(self, req: Request, timeout: float | None = None) -> int:
        """Until ``req`` is done (polling, or the MSI-X eventfd); its DW0.

        A non-zero status raises :class:`CommandError`.  No completion within the timeout
        starts recovery (abort, then reset) and raises :class:`CommandTimeoutError` once the
        device can no longer touch the command's memory.
        """
        if req.__class__ is not Request:
            raise _not_a_request(req, "wait")
        if req.state == FREE:
            raise NvmeError(f"{req!r} is not in flight (already collected?)")
        if req.state == INFLIGHT:
            self._poll(req, timeout)
        return self._result(req)

    def _poll(self, req: Request, timeout: float | None) -> None:
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

    def result(self, req: Request) -> int:
        """A finished request's DW0; its error (status, timeout, reset) raised.  For
        requests :meth:`reap` returned, before :meth:`release_all` gives them back."""
        if req.__class__ is not Request:
            raise _not_a_request(req, "result")
        if req.state == INFLIGHT or req.state == FREE:  # noqa: PLR1714
            raise NvmeError(f"{req!r} has no result: it is not done")
        return self._result(req)

    def _result(self, req: Request) -> int:
        if req.state == FAILED or req.state == LOST:  # noqa: PLR1714
            assert req.error is not None  # FAILED and LOST are always set with their error
            raise req.error
        if req.status:
            sct, sc = (req.status >> 8) & 0x7, req.status & 0xFF
            raise CommandError(f"{req.what} on queue {self.qid}", sct, sc)
        return req.dw0

    def release(self, req: Request) -> None:
        """Give a finished request's slot back (what :meth:`complete` does after waiting)."""
        if req.__class__ is not Request:
            raise _not_a_request(req, "release")
        if req.state in (DONE, FAILED):
            self._give_back(req)
        elif req.state == INFLIGHT:
            raise NvmeError(f"{req!r}: the device may still use it; wait for it first")

    def release_all(self, reqs: Sequence[Request]) -> None:
        """Give the slots of finished requests back under one lock (what :meth:`reap`
        returned, once their results were read).  A request still in flight, or one of
        another queue, is refused and nothing is given back."""
        with self._lock:
            for req in reqs:
                try:  # (free in CPython 3.11 unless it raises)
                    bad = req.state < DONE or req.qid != self.qid
                except AttributeError:
                    raise _not_a_request(req, "release_all") from None
                if bad:
                    raise NvmeError(
                        f"release_all: {req!r} is not a finished request of queue {self.qid}: "
                        "nothing was released"
                    )
            free = self._free
            for req in reqs:
                req.state = FREE
                req.error = None
                free.append(req.cid)

    def complete(self, req: Request, timeout: float | None = None) -> int:
        """Wait for ``req`` and give its slot back; its DW0 (raises as :meth:`wait`)."""
        try:
            state = req.state
        except AttributeError:
            raise _not_a_request(req, "complete") from None
        if state == DONE and not req.status and req.qid == self.qid:  # reaped, fine
            with self._lock:
                if req.state == DONE:  # (another thread may have collected it meanwhile)
                    req.state = FREE
                    self._free.append(req.cid)
            return req.dw0
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
        self._blocked = True
        for req in self._requests:
            if req.state == INFLIGHT:
                req.state = FAILED
                req.error = type(error)(f"{req.what} (cid {req.cid}) on queue {self.qid}: {error}")

    # -- I/O (NVM command set 1.0, 3.2) ----------------------------------------------------
    def _prp_lists(self, req: Request, count: int) -> list[tuple[npt.NDArray[np.uint64], int]]:
        while len(req.lists) < count:  # the request's own list pages, kept for reuse
            self.ctrl._check_may_allocate("a PRP list page")
            vaddr, dma = self.ctrl.prp_pool.alloc()
            words = (ctypes.c_uint64 * PRP_ENTRIES).from_address(vaddr)
            view = np.ctypeslib.as_array(words)
            req.lists.append((view, dma, vaddr, memoryview(words).cast("B")))
        return [(view, dma) for view, dma, _, _ in req.lists[:count]]

    def reserve_prp_lists(self, max_bytes: int) -> None:
        """Give every request now the PRP list pages a transfer of up to ``max_bytes`` at
        any alignment needs (else taken the first time one is needed): a worker process
        may not allocate DMA memory, so :func:`uvdma_nvme.jobs.run_jobs` calls this first."""
        pages = prp_list_pages_needed(plan_prps(PAGE - 4, max_bytes).pages)  # worst alignment
        with self._lock:
            self._check()
            for req in self._requests:
                self._prp_lists(req, pages)

    def _prp2(self, req: Request, dma: int, length: int) -> int:
        """PRP2 of a transfer that spans more than one page (NVMe 2.0, 4.1.1)."""
        second = (dma | _PAGE_MASK) + 1
        end = dma + length
        if end <= second + PAGE:
            return second  # the second and last page
        entries = (end - second + _PAGE_MASK) >> _PAGE_SHIFT  # the pages after the first
        if entries <= PRP_ENTRIES and req.lists:  # one list page, the request's own
            view, list_dma, _vaddr, raw = req.lists[0]
            fill_run(view, second, entries, self._prp_scratch, raw)
            return list_dma
        plan = PrpPlan(dma, second, entries)  # what plan_prps(dma, length) gives
        lists = self._prp_lists(req, prp_list_pages_needed(plan.pages))
        return fill_prp_lists(plan, lists, self._prp_scratch)  # under the lock: ours

    def _not_io(self, ns: Namespace, lba: int, nblocks: int, what: str) -> NvmeError:
        return NvmeError(
            f"{what}: LBAs {lba}..{lba + nblocks - 1} are outside namespace {ns.nsid} "
            f"(0..{ns.blocks - 1})"
        )

    def _check_io(
        self, ns: Namespace, lba: Any, nblocks: Any, dma: Any, what: str
    ) -> tuple[int, int, int, int]:
        """The checks of one read/write, before anything is taken: (lba, nblocks, bytes,
        dma), each a plain int."""
        if lba.__class__ is not int or nblocks.__class__ is not int or dma.__class__ is not int:
            lba, nblocks = _integer(lba, "LBA", what), _integer(nblocks, "block count", what)
            dma = _integer(dma, "DMA address", what)
        if nblocks < 1 or lba < 0 or lba + nblocks > ns.blocks:
            raise self._not_io(ns, lba, nblocks, what)
        length = nblocks * ns.lba_size
        if length > self.ctrl.max_transfer:
            raise NvmeError(
                f"{what}: {length} bytes exceed the controller's MDTS "
                f"({self.ctrl.max_transfer} bytes): split it (read()/write() do)"
            )
        lo, end, gen = self._map
        if dma < lo or dma + length > end or self._domain.unmaps != gen:
            self._check_mapped(dma, length, what)
        return lba, nblocks, length, dma

    def _check_mapped(self, dma: int, length: int, what: str) -> None:
        """``dma``..+``length`` must be mapped in the device's IOMMU domain, through
        mappings that follow each other without a hole; remember the run of mappings it
        lies in (joined to the one remembered before when the two touch), valid until the
        domain's next unmap."""
        domain = self._domain
        try:
            gen = domain.unmaps  # before the lookups: an unmap in between voids them
            m = domain.mapping_at(dma)
            if m is not None and dma >= 0:
                lo, end = m.iova, m.iova + m.size
                while m is not None and end < dma + length:  # the next mapping, if adjacent
                    m = domain.mapping_at(end)
                    if m is not None:
                        end = m.iova + m.size
                if m is not None:
                    plo, pend, pgen = self._map
                    if pgen == gen and pend == lo:
                        lo = plo
                    elif pgen == gen and end == plo:
                        end = pend
                    self._map = (lo, end, gen)
                    return
        except ClosedError:  # the controller closed under us (another thread, a release)
            if self.ctrl._failed is not None:
                raise self.ctrl._unusable() from None
            raise
        raise NvmeError(
            f"{what}: DMA address {dma:#x}+{length:#x} is not mapped in the device's IOMMU "
            "domain: the IOMMU would block the transfer (use dma_map_single or a DmaBuffer)"
        )

    def io(
        self, opcode: int, ns: Namespace, lba: int, nblocks: int, dma: int, what: str
    ) -> Request:
        """Submit one read/write of ``nblocks`` LBAs at ``dma`` (memory the caller keeps
        allocated until :meth:`complete` returns or raises)."""
        # _check_io's checks, spelled out: this is the hot path
        if lba.__class__ is not int or nblocks.__class__ is not int or dma.__class__ is not int:
            lba, nblocks, dma = (
                _integer(lba, "LBA", what),
                _integer(nblocks, "block count", what),
                _integer(dma, "DMA address", what),
            )
        if nblocks < 1 or lba < 0 or lba + nblocks > ns.blocks:
            raise self._not_io(ns, lba, nblocks, what)
        length = nblocks * ns.lba_size
        if length > self._max_transfer:
            self._check_io(ns, lba, nblocks, dma, what)  # raises, with the message
        lo, end, gen = self._map
        if dma < lo or dma + length > end or self._domain.unmaps != gen:
            self._check_mapped(dma, length, what)
        # ``with``, not acquire() then ``try``: a Ctrl-C between the two would keep the lock
        with self._lock:
            if self._blocked:
                raise self._unusable()
            free = self._free
            if not free:
                raise self._full(what)
            # the slot is taken (``del``) only once the SQE is written: an error or a
            # Ctrl-C before that leaves it free.  From ``del`` to the doorbell write no
            # bytecode runs a signal handler (no call, no backward jump).
            req = self._requests[free[-1]]
            req.what = what
            if not req.rw:
                req.rw = True
                req.dw0 = 0
            prp2 = self._prp2(req, dma, length) if (dma & _PAGE_MASK) + length > PAGE else 0
            tail = self._sq_tail
            _RW_SQE.pack_into(
                self._sq_mem, tail << 6, opcode | req.tag, ns.nsid, dma, prp2, lba, nblocks - 1
            )
            del free[-1]
            req.state = INFLIGHT
            tail += 1
            if tail == self.depth:
                tail = 0
            self._sq_tail = tail
            self._sq_doorbell.value = tail
            return req

    def io_batch(
        self,
        opcode: int,
        ns: Namespace,
        cmds: Iterable[tuple[int, int, int]],
        what: str,
    ) -> list[Request]:
        """Submit one read/write per ``(lba, nblocks, dma)`` of ``cmds`` with one doorbell
        write (NVMe 2.0, 4.2: the tail may move past many entries at once).  Every command
        is checked as :meth:`io` checks it, and room for all of them, before the doorbell
        is written: a refusal submits nothing."""
        if cmds.__class__ is list or cmds.__class__ is tuple:
            todo = cast("Sequence[tuple[int, int, int]]", cmds)
        else:
            todo = list(cmds)  # a generator: it is read twice when the full checks run
        out = self._batch(opcode, ns, todo, what, None)
        for _ in range(100):
            if out is not None:
                return out
            # a command the one-pass checks could not pass (not a plain int, outside the
            # remembered mapping, out of range): every check in full, outside the lock (the
            # mapped-range lookup takes the domain's lock); then submit without re-checking
            # unless an unmap came in between
            gen = self._domain.unmaps
            norm: list[tuple[int, int, int]] = []
            for lba_, n_, dma_ in todo:
                lba, n, _length, dma = self._check_io(ns, lba_, n_, dma_, what)
                norm.append((lba, n, dma))
            out = self._batch(opcode, ns, norm, what, gen)
        raise NvmeError(
            f"{what}: the device's IOMMU mappings changed under every one of 100 attempts to "
            "check this batch: stop unmapping memory while submitting I/O"
        )

    def _batch(
        self,
        opcode: int,
        ns: Namespace,
        cmds: Sequence[tuple[int, int, int]],
        what: str,
        checked: int | None,
    ) -> list[Request] | None:
        """io_batch in one pass under the lock: the commands, or None (nothing taken) when
        one needs a check this pass does not make (not a plain int, outside the remembered
        mapping, out of range): the caller checks them in full and says why.  ``checked``:
        the domain's unmap count before the caller checked every command in full (their
        mapped ranges then stand while it is unchanged)."""
        blocks, lba_size, mdts, nsid = ns.blocks, ns.lba_size, self._max_transfer, ns.nsid
        requests, sq, pack, depth = self._requests, self._sq_mem, _RW_SQE.pack_into, self.depth
        # locals: no global or builtin lookups per command
        page, mask, inflight, int_ = PAGE, _PAGE_MASK, INFLIGHT, int
        out: list[Request] = []
        take = out.append
        with self._lock:  # not acquire() then ``try``: a Ctrl-C between would keep it
            if self._blocked:
                raise self._unusable()
            free = self._free
            top = len(free)
            if top < len(cmds):
                raise self._full(what, len(cmds))
            lo, end, gen = self._map  # one read: another thread replaces it whole
            if checked is not None:
                gen, lo, end = checked, 0, 1 << 66  # every range was checked in full
            if self._domain.unmaps != gen:
                return None
            tail = self._sq_tail
            i = top  # the slots are read from the free list here and taken after the loop
            try:
                for lba, nblocks, dma in cmds:
                    if (
                        lba.__class__ is not int_
                        or nblocks.__class__ is not int_
                        or dma.__class__ is not int_
                        or nblocks < 1
                        or lba < 0
                        or lba + nblocks > blocks
                    ):
                        raise _RecheckError
                    length = nblocks * lba_size
                    if length > mdts or dma < lo or dma + length > end:
                        raise _RecheckError
                    i -= 1
                    req = requests[free[i]]
                    take(req)
                    req.what = what
                    if not req.rw:
                        req.rw = True
                        req.dw0 = 0
                    prp2 = self._prp2(req, dma, length) if (dma & mask) + length > page else 0
                    pack(sq, tail << 6, opcode | req.tag, nsid, dma, prp2, lba, nblocks - 1)
                    req.state = inflight  # not visible to reap: it waits for this lock
                    tail += 1
                    if tail == depth:
                        tail = 0
            except BaseException as e:
                # nothing was taken or submitted: the entries past the device's tail are
                # not its until the doorbell, and the slots are still on the free list
                for req in out:
                    req.state = FREE
                if e.__class__ is _RecheckError:
                    return None
                raise
            # taken all at once, then the doorbell: no bytecode between runs a signal
            # handler (no call, no backward jump), so a Ctrl-C cannot split the two
            del free[i:]
            self._sq_tail = tail
            self._sq_doorbell.value = tail
            return out

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
            while req.state != FREE and req.state != LOST:  # noqa: PLR1714
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
        self._freed = self._blocked = True
        for req in self._requests:
            for _view, dma, vaddr, _raw in req.lists:
                self.ctrl.prp_pool.free(vaddr, dma)
            req.lists.clear()
        for r in (self.cq, self.sq):
            dma_free_coherent(self.ctrl.dma, r.size, r.cpu_addr, r.dma_addr)

    def __repr__(self) -> str:
        return f"QueuePair(qid {self.qid}, depth {self.depth}, {self.outstanding} outstanding)"


def _not_a_request(value: object, what: str) -> NvmeError:
    return NvmeError(
        f"{what}: {value!r} ({type(value).__name__}) is not a Request: pass what io(), "
        "io_batch(), submit() or reap() returned"
    )


def _field(value: object, name: str, top: int, what: str) -> None:
    """A command field: an integer in 0..top, else a clear error."""
    v = _integer(value, name, what)
    if not 0 <= v <= top:
        raise NvmeError(f"{what}: the {name} must be in 0..{top:#x}, not {v}")


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
