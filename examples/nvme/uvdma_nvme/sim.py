"""A software NVMe controller behind the fake kernel: a test double of the device.

It follows the NVM Express Base Specification 2.0 ("NVMe 2.0") and the NVM Command Set 1.0
("NVM 1.0") closely enough that an unmodified driver brings it up and does I/O on it through
uvdma's VFIO layer, with :class:`uvdma.testing.fake_kernel.FakeKernel` behind the syscall seam:

- registers (NVMe 2.0, 3.1.4): every BAR0 access reaches the controller as it happens
  (``Bar.reg32/read32/write32/read64/write64`` go through the seam's ``mmio32``/``mmio64``),
  so a doorbell write processes commands synchronously and a CC write changes CSTS;
- DMA through the fake IOMMU: SQEs, PRP lists, CQEs and data are read and written at the
  virtual address the IOVA maps to *now* (type1 container or iommufd IOAS mappings); an
  unmapped IOVA or one mapped without the permission is refused as an IOMMU would: nothing
  is touched, the fake kernel records an :class:`~uvdma.vfio.faults.IommuFault`, and the
  command completes with Data Transfer Error;
- admin: Identify (CNS 00h, 01h, 02h), Set/Get Features, Create/Delete I/O CQ and SQ, Get Log
  Page (01h, 02h, 03h), Abort, Asynchronous Event Request; Invalid Command Opcode for the rest;
- I/O: Read, Write, Flush with PRPs (PRP1 offsets, PRP2, chained PRP lists), namespace data in
  memory (sparse), MDTS and LBA range checks.

By default a command completes inside the doorbell write that submits it.  :meth:`NvmeSim.hold`
keeps commands instead (for QD > 1, timeouts, aborts and resets); :meth:`NvmeSim.complete`,
:meth:`NvmeSim.complete_after`, :meth:`NvmeSim.stick` and :meth:`NvmeSim.transfer` (the data
DMA now, the completion later) decide what happens to them.  Faults: :meth:`NvmeSim.fatal`
(CSTS.CFS), :meth:`NvmeSim.remove` (surprise removal: all-ones), ``ready_delay=None`` (never
ready).  :attr:`NvmeSim.busy_ns` and :attr:`NvmeSim.commands` measure its own cost.

It is a test double: driver logic may be tested on it; claims about devices are proven in the
VM tier against QEMU's controller.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from uvdma import _sys, pci
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma.testing.fake_kernel import DmaWindow, FakeDevice, FakeKernel
from uvdma.testing.fake_sysfs import make_device

BDF = "0000:00:0a.0"

# NVMe 2.0, 3.1.4: controller registers
CAP, VS, INTMS, INTMC, CC, CSTS, NSSR, AQA, ASQ, ACQ = (
    0x00,
    0x08,
    0x0C,
    0x10,
    0x14,
    0x1C,
    0x20,
    0x24,
    0x28,
    0x30,
)
DOORBELLS = 0x1000

# NVMe 2.0, 5 (admin) and NVM 1.0, 3 (I/O): opcodes
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG_PAGE, ADMIN_DELETE_CQ = 0x00, 0x01, 0x02, 0x04
ADMIN_CREATE_CQ, ADMIN_IDENTIFY, ADMIN_ABORT, ADMIN_SET_FEATURES = 0x05, 0x06, 0x08, 0x09
ADMIN_GET_FEATURES, ADMIN_ASYNC_EVENT = 0x0A, 0x0C
IO_FLUSH, IO_WRITE, IO_READ = 0x00, 0x01, 0x02
FEAT_NUM_QUEUES = 0x07
LOG_ERROR, LOG_SMART, LOG_FW_SLOT = 0x01, 0x02, 0x03

# The Status Field of a CQE (NVMe 2.0, Figure 93), as DW3 bits 31:17 hold it:
# SC (7:0), SCT (10:8), CRD (12:11), M (13), DNR (14).
DNR = 1 << 14  # Do Not Retry: set, as QEMU sets it, for a command that would fail again
SUCCESS = 0x000
# Generic Command Status (SCT 0h, NVMe 2.0 Figure 94)
INVALID_OPCODE = 0x001 | DNR
INVALID_FIELD = 0x002 | DNR
COMMAND_ID_CONFLICT = 0x003 | DNR
DATA_TRANSFER_ERROR = 0x004
ABORT_REQUESTED = 0x007
ABORTED_SQ_DELETION = 0x008
INVALID_NAMESPACE = 0x00B | DNR
COMMAND_SEQUENCE_ERROR = 0x00C | DNR
PRP_OFFSET_INVALID = 0x013 | DNR
LBA_OUT_OF_RANGE = 0x080 | DNR
# Command Specific Status (SCT 1h, NVMe 2.0 Figure 95)
COMPLETION_QUEUE_INVALID = 0x100 | DNR
INVALID_QUEUE_IDENTIFIER = 0x101 | DNR
INVALID_QUEUE_SIZE = 0x102 | DNR
ABORT_COMMAND_LIMIT_EXCEEDED = 0x103 | DNR
ASYNC_EVENT_LIMIT_EXCEEDED = 0x105 | DNR
INVALID_INTERRUPT_VECTOR = 0x108 | DNR
INVALID_LOG_PAGE = 0x109 | DNR
INVALID_QUEUE_DELETION = 0x10C | DNR
FEATURE_NOT_SAVEABLE = 0x10D | DNR

NSID_ALL = 0xFFFFFFFF
_MSIX = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX
_MAP_NORESERVE = 0x4000  # linux/mman.h: the namespace's memory is only what was written

# A submission queue entry (NVMe 2.0, Figure 88): CDW0 (opcode, flags, CID), NSID, CDW2-3,
# MPTR, PRP1, PRP2, CDW10..15
_SQE = struct.Struct("<BBHI8x8xQQ6I")
_RAW = _sys.RAW  # the process's address space, as the device reaches it after translation
_BASE = _sys.WINDOW_BASE

SqeFields = tuple[int, int, int, int, int, int, int, int, int, int, int, int]


@dataclass(frozen=True)
class SimNamespace:
    """An active namespace: ``blocks`` LBAs of ``lba_size`` bytes (512 or 4096)."""

    nsid: int = 1
    blocks: int = 1 << 21
    lba_size: int = 512


@dataclass
class SimConfig:
    """How the controller presents itself; field names are the specification's.

    ``mqes``, ``to``, ``dstrd``, ``mpsmin``, ``mpsmax`` and ``mdts`` are encoded as in CAP and
    Identify Controller (MQES is 0-based, TO in 500 ms units, MDTS a power of two of the
    minimum page size with 0 for no limit).  ``queues`` is the number of I/O queue pairs Set
    Features Number of Queues allocates, whatever is asked (as QEMU does).  ``ready_delay``:
    seconds from CC.EN=1 to CSTS.RDY=1; None: it never becomes ready.  ``aborts``: False makes
    Abort never abort (DW0 bit 0 = 1, "not aborted"), as QEMU 7.2's nvme_abort does.
    ``clock`` measures :attr:`NvmeSim.busy_ns`: ``time.perf_counter_ns`` (~50 ns a call) counts
    wall time, so time the thread spent preempted inside the controller counts too;
    ``time.thread_time_ns`` counts CPU time only but is a system call (~0.7 us here).
    On a running controller ``aborts``, ``queues`` and CAP's fields are read when used;
    ``ready_delay``, MDTS and the memory page size at the next CC.EN = 1.
    """

    mqes: int = 1023
    cqr: bool = True
    to: int = 1
    dstrd: int = 0
    mpsmin: int = 0
    mpsmax: int = 4
    version: int = 0x00020000  # VS: 2.0.0
    queues: int = 16
    mdts: int = 5
    namespaces: tuple[SimNamespace, ...] = (SimNamespace(),)
    nn: int | None = None  # Identify Controller NN; None: the highest NSID
    ready_delay: float | None = 0.0
    aborts: bool = True
    acl: int = 3  # Abort Command Limit, 0-based
    aerl: int = 3  # Asynchronous Event Request Limit, 0-based
    elpe: int = 15  # Error Log Page Entries, 0-based
    msix_vectors: int = 4
    serial: str = "UVDMASIM0001"
    model: str = "uvdma software NVMe controller"
    firmware: str = "1.0"
    clock: Callable[[], int] = field(default=time.perf_counter_ns)


class HeldCommand(NamedTuple):
    """A command the controller fetched and holds: not completed yet."""

    qid: int
    cid: int
    opcode: int
    nsid: int
    stuck: bool  # completes only when aborted (or its SQ deleted); a reset drops it
    transferred: bool  # its data phase already ran (:meth:`NvmeSim.transfer`)


class SimCost(NamedTuple):
    """The controller's own cost: ``ns`` inside its code, over ``commands`` completions."""

    ns: int
    commands: int
    io_commands: int

    @property
    def ns_per_command(self) -> float:
        """Mean cost of one completed command (0 when there was none)."""
        return self.ns / self.commands if self.commands else 0.0


class _Status(Exception):  # noqa: N818  (control flow: a command ends with this status)
    def __init__(self, status: int, dw0: int = 0) -> None:
        self.status, self.dw0 = status, dw0


class _Blocked(Exception):  # noqa: N818  (the IOMMU refused a DMA; the fault is recorded)
    pass


class _Ns:
    __slots__ = ("blocks", "lba_size", "mem", "mv", "nsid", "shift")

    def __init__(self, cfg: SimNamespace) -> None:
        if cfg.lba_size not in (512, 4096):
            raise ValueError(f"namespace {cfg.nsid}: LBA size {cfg.lba_size} is not 512 or 4096")
        if not 0 < cfg.nsid < 0xFFFFFFFF or cfg.blocks < 1:
            raise ValueError(f"namespace {cfg.nsid} of {cfg.blocks} blocks is not valid")
        self.nsid, self.blocks, self.lba_size = cfg.nsid, cfg.blocks, cfg.lba_size
        self.shift = cfg.lba_size.bit_length() - 1
        # anonymous, unreserved: pages exist once written, and read back zero before.
        # Shared: processes forked from the driver's (uvdma_nvme.jobs) write one medium,
        # as they would a drive.
        size = cfg.blocks * cfg.lba_size
        try:
            self.mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | _MAP_NORESERVE)
        except (OSError, OverflowError) as e:
            raise ValueError(
                f"namespace {cfg.nsid}: {size} bytes do not fit in this process's address "
                f"space ({e}): ask for fewer blocks"
            ) from e
        self.mv = memoryview(self.mem)


class _CQ:
    __slots__ = (
        "head",
        "ien",
        "iova",
        "iv",
        "pending",
        "phase",
        "qid",
        "size",
        "sqs",
        "tail",
        "words",
    )

    def __init__(self, qid: int, iova: int, size: int, ien: bool, iv: int) -> None:
        self.qid, self.iova, self.size, self.ien, self.iv = qid, iova, size, ien, iv
        self.head = self.tail = 0
        self.phase = 1  # NVMe 2.0, 4.6: the first pass through the queue posts phase 1
        self.sqs: set[int] = set()
        self.pending: deque[tuple[_SQ, int, int, int]] = deque()  # waiting for a free slot
        self.words: memoryview | None = None  # the queue as 32-bit words, while translated


class _SQ:
    __slots__ = ("cq", "head", "hold", "iova", "mem", "qid", "size", "tail")

    def __init__(self, qid: int, iova: int, size: int, cq: _CQ, hold: bool) -> None:
        self.qid, self.iova, self.size, self.cq, self.hold = qid, iova, size, cq, hold
        self.head = self.tail = 0
        self.mem: memoryview | None = None  # the queue's bytes, while translated


class _Cmd:
    __slots__ = ("f", "result", "sq", "stuck")

    def __init__(self, sq: _SQ, f: SqeFields, stuck: bool) -> None:
        self.sq, self.f, self.stuck = sq, f, stuck
        self.result: tuple[int, int] | None = None  # (status, dw0) once its data phase ran


class _Register:
    """A controller register as the fake kernel's ``mmio32``/``mmio64`` hands it out."""

    __slots__ = ("_offset", "_sim", "_width")

    def __init__(self, sim: NvmeSim, offset: int, width: int) -> None:
        self._sim, self._offset, self._width = sim, offset, width

    @property
    def value(self) -> int:
        return self._sim._mmio_read(self._offset, self._width)

    @value.setter
    def value(self, v: int) -> None:
        self._sim._mmio_write(self._offset, self._width, v)


class _SqTailDoorbell:
    """SQyTDBL (NVMe 2.0, 3.1.4.21): a write submits the commands up to the new tail."""

    __slots__ = ("_qid", "_sim")

    def __init__(self, sim: NvmeSim, qid: int) -> None:
        self._sim, self._qid = sim, qid

    @property
    def value(self) -> int:
        return self._sim._mmio_read(DOORBELLS, 4)

    @value.setter
    def value(self, v: int) -> None:
        self._sim._ring_sq(self._qid, v)


class _CqHeadDoorbell:
    """CQyHDBL (NVMe 2.0, 3.1.4.22): a write frees the CQ slots up to the new head."""

    __slots__ = ("_qid", "_sim")

    def __init__(self, sim: NvmeSim, qid: int) -> None:
        self._sim, self._qid = sim, qid

    @property
    def value(self) -> int:
        return self._sim._mmio_read(DOORBELLS, 4)

    @value.setter
    def value(self, v: int) -> None:
        self._sim._ring_cq(self._qid, v)


class NvmeSim:
    """The controller behind BAR0 of fake device ``bdf`` (attached to ``kernel`` here).

    Thread-safe: one lock serialises register accesses, doorbells and the methods below, so
    :meth:`complete_after` may complete commands from a timer thread while a driver polls.
    """

    def __init__(self, kernel: FakeKernel, bdf: str, config: SimConfig | None = None) -> None:
        self.config = cfg = config if config is not None else SimConfig()
        self.kernel = kernel
        self.bdf = bdf
        self._dev: FakeDevice = kernel.devices[bdf]
        if not 1 <= cfg.mqes <= 0xFFFF:
            raise ValueError(f"CAP.MQES {cfg.mqes}: a queue has 2 to 65536 entries (0-based 1..)")
        if not 1 <= cfg.queues <= 0xFFFE:
            raise ValueError(f"{cfg.queues} I/O queue pairs: 1 to 65534")
        stride = 4 << cfg.dstrd
        if DOORBELLS + (2 * cfg.queues + 2) * stride > len(self._dev.bar0):
            raise ValueError(
                f"{cfg.queues} queue pairs at CAP.DSTRD {cfg.dstrd} need doorbells past the "
                f"end of BAR0 ({len(self._dev.bar0)} bytes): ask for fewer"
            )
        self._ns = {n.nsid: _Ns(n) for n in cfg.namespaces}
        if len(self._ns) != len(cfg.namespaces):
            raise ValueError("two namespaces have the same NSID")
        self._nn = cfg.nn if cfg.nn is not None else max(self._ns, default=0)
        self._lock = threading.RLock()
        self._acquire, self._release = self._lock.acquire, self._lock.release
        self._clock = cfg.clock
        # the controller's own cost
        self.busy_ns = 0
        self.commands = 0  # completions posted
        self.io_commands = 0  # of which I/O (Read, Write, Flush)
        self.sq_doorbell_writes = 0  # SQ tail doorbell writes (batching shows here)
        self.cq_doorbell_writes = 0
        # faults injected
        self._removed = False
        self._cfs = False
        self._cfs_persists = False
        # registers
        self._cc = self._aqa = self._asq = self._acq = self._intms = 0
        self._shst = 0
        self._rdy = False
        self._rdy_at: float | None = None
        self._live = False  # processing commands: ready, no fatal status, not shut down
        # queues and commands
        self._sqs: dict[int, _SQ] = {}
        self._cqs: dict[int, _CQ] = {}
        self._held: dict[tuple[int, int], _Cmd] = {}  # FIFO: in the order fetched
        self._hold_all = False
        self._hold_qids: set[int] = set()
        self._queues_created = False
        self._page = 4096 << cfg.mpsmin
        self._max_transfer = 1 << 62  # MDTS in bytes, set at CC.EN = 1
        self._epoch = 0  # bumped by every reset: what a timer scheduled before it is void
        self._timers: list[threading.Timer] = []
        self._features: dict[int, int] = dict(_FEATURE_DEFAULTS)
        # logs (kept across controller resets, as a drive keeps them)
        self._errors: deque[bytes] = deque(maxlen=cfg.elpe + 1)
        self._error_count = 0
        self._read_bytes = self._written_bytes = self._reads = self._writes = 0
        # the IOMMU's view, cached until the fake kernel's mappings change
        self._gen = -1
        self._windows: list[DmaWindow] = []
        self._starts: list[int] = []
        self._hit = (0, 0, 0, False, False)  # last window: iova, end, vaddr - iova, read, write
        self.closed = False
        kernel.attach_model(bdf, self)

    # -- the controller's own cost ------------------------------------------------------------
    def cost(self) -> SimCost:
        """Time spent inside the controller's code and the completions it posted, so far."""
        return SimCost(self.busy_ns, self.commands, self.io_commands)

    def reset_cost(self) -> None:
        """Start counting again from zero (the doorbell write counts too)."""
        self.busy_ns = self.commands = self.io_commands = 0
        self.sq_doorbell_writes = self.cq_doorbell_writes = 0

    def doorbell_dispatch_ns(self, writes: int = 20_000) -> float:
        """ns of a doorbell write that :attr:`busy_ns` does not see: the Python calls that
        carry the store to the controller's code (on hardware a posted store).  Timed now
        with the controller's clock (best of three), on the SQ doorbell of a queue that
        does not exist; a benchmark adds ``doorbell writes x this`` to the controller's
        cost.  Counters are left as found."""
        reg = self.register(DOORBELLS + (2 * self.config.queues) * (4 << self.config.dstrd), 4)
        before = (self.busy_ns, self.sq_doorbell_writes)
        best = float("inf")
        for _ in range(3):
            busy0 = self.busy_ns
            t0 = self._clock()
            for _ in range(writes // 3):
                reg.value = 0
            spent = self._clock() - t0
            best = min(best, (spent - (self.busy_ns - busy0)) / (writes // 3))
        self.busy_ns, self.sq_doorbell_writes = before
        return max(best, 0.0)

    # -- holding and completing commands ------------------------------------------------------
    def hold(self, qid: int | None = None) -> None:
        """From now on keep the commands fetched from SQ ``qid`` (every SQ when None) instead
        of completing them in the doorbell write; they wait for :meth:`complete`."""
        with self._lock:
            if qid is None:
                self._hold_all = True
            else:
                self._hold_qids.add(qid)
            self._apply_hold()

    def release(self, qid: int | None = None) -> None:
        """Stop holding new commands (on every SQ when None); held commands stay held."""
        with self._lock:
            if qid is None:
                self._hold_all = False
                self._hold_qids.clear()
            else:
                self._hold_qids.discard(qid)
            self._apply_hold()

    def _apply_hold(self) -> None:
        for sq in self._sqs.values():
            sq.hold = self._hold_all or sq.qid in self._hold_qids

    def held(self, qid: int | None = None) -> list[HeldCommand]:
        """The commands held now (of SQ ``qid``, or all), in the order they were fetched."""
        with self._lock:
            return [
                HeldCommand(q, c, cmd.f[0], cmd.f[3], cmd.stuck, cmd.result is not None)
                for (q, c), cmd in self._held.items()
                if qid is None or q == qid
            ]

    def _find(self, cid: int, qid: int | None) -> _Cmd:
        found = [cmd for (q, c), cmd in self._held.items() if c == cid and qid in (None, q)]
        if not found:
            where = f"SQ {qid}" if qid is not None else "any SQ"
            raise ValueError(f"no command with CID {cid} is held on {where}")
        if len(found) > 1:
            raise ValueError(f"CID {cid} is held on several SQs: name the qid")
        return found[0]

    def complete(
        self, n: int | None = None, *, qid: int | None = None, cid: int | None = None
    ) -> int:
        """Complete held commands, as the device finishing them now: every one (``n`` None),
        the first ``n`` fetched, or the one with ``cid`` (on SQ ``qid``).  Their data phase
        runs now, through the IOMMU mappings of now (unless :meth:`transfer` ran it), then
        the CQE is posted.  Stuck commands are skipped (naming one by ``cid`` is an error).
        Returns how many completed; none on a removed or failed controller."""
        if n is not None and n < 0:
            raise ValueError(f"complete {n} commands? n must be 0 or more")
        t0 = self._clock()
        with self._lock:
            try:
                if cid is not None:
                    cmd = self._find(cid, qid)
                    if cmd.stuck:
                        raise ValueError(
                            f"CID {cid} on SQ {cmd.sq.qid} is stuck: only an Abort, deleting "
                            "its SQ or a reset ends it"
                        )
                    targets = [cmd]
                else:
                    targets = [c for c in self._held.values() if not c.stuck]
                    if qid is not None:
                        targets = [c for c in targets if c.sq.qid == qid]
                    if n is not None:
                        targets = targets[:n]
                return self._complete(targets)
            finally:
                self.busy_ns += self._clock() - t0

    def _complete(self, targets: list[_Cmd]) -> int:
        if self._removed or not self._live:
            return 0
        self._sync()
        done = 0
        for cmd in targets:
            key = (cmd.sq.qid, cmd.f[2])
            if self._held.get(key) is not cmd:
                continue
            del self._held[key]
            status, dw0 = cmd.result if cmd.result is not None else self._execute(cmd.sq, cmd.f)
            self._post(cmd.sq, cmd.f[2], status, dw0)
            done += 1
        return done

    def complete_after(
        self, delay: float, n: int | None = None, *, qid: int | None = None, cid: int | None = None
    ) -> threading.Timer:
        """:meth:`complete` from a timer thread ``delay`` seconds from now: a slow device.
        A reset meanwhile (CC.EN=0, or a function reset) voids it, as does the command
        being completed or aborted otherwise; with ``cid``, that very command is meant."""
        if n is not None and n < 0:
            raise ValueError(f"complete {n} commands? n must be 0 or more")
        with self._lock:
            epoch = self._epoch
            target = self._find(cid, qid) if cid is not None else None

        def fire() -> None:
            t0 = self._clock()
            with self._lock:
                try:
                    if self._epoch != epoch or self.closed:
                        return
                    if target is not None:
                        if not target.stuck:
                            self._complete([target])
                        return
                    cmds = [c for c in self._held.values() if not c.stuck]
                    if qid is not None:
                        cmds = [c for c in cmds if c.sq.qid == qid]
                    self._complete(cmds[:n] if n is not None else cmds)
                finally:
                    self.busy_ns += self._clock() - t0

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return timer

    def stick(self, cid: int, qid: int | None = None) -> None:
        """Keep held command ``cid`` forever: it completes only when aborted (Abort, with
        ``aborts``), when its SQ is deleted, or never (a reset drops it)."""
        with self._lock:
            self._find(cid, qid).stuck = True

    def transfer(self, cid: int, qid: int | None = None) -> int:
        """Run held command ``cid``'s data phase now, without completing it: a Read writes
        its data into whatever memory its IOVAs map to at this moment (a device that DMAs
        late).  Its completion, later, posts the status this returns."""
        t0 = self._clock()
        with self._lock:
            try:
                cmd = self._find(cid, qid)
                if self._removed or not self._live:
                    raise ValueError("the controller is not running: it does no DMA")
                self._sync()
                if cmd.result is None:
                    cmd.result = self._execute(cmd.sq, cmd.f)
                return cmd.result[0]
            finally:
                self.busy_ns += self._clock() - t0

    # -- faults ---------------------------------------------------------------------------------
    def fatal(self, persist: bool = False) -> None:
        """CSTS.CFS = 1: the controller stops (no fetch, no completion).  A controller reset
        clears it unless ``persist`` (a controller that stays dead)."""
        with self._lock:
            self._cfs = True
            self._cfs_persists = persist
            self._update_live()

    def remove(self) -> None:
        """Surprise removal: every register reads all-ones, writes are dropped, nothing is
        fetched, transferred or completed any more."""
        with self._lock:
            self._removed = True
            self._update_live()

    def close(self) -> None:
        """Stop the timers :meth:`complete_after` started. Idempotent."""
        with self._lock:
            self.closed = True
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()

    # -- namespace data, for tests ------------------------------------------------------------
    def namespace_data(self, nsid: int = 1) -> memoryview:
        """The namespace's bytes (LBA n at ``n * lba_size``), to check or seed directly."""
        return self._ns[nsid].mv

    # -- resets ---------------------------------------------------------------------------------
    def _controller_reset(self) -> None:
        # NVMe 2.0, 3.7.2: every queue deleted, every outstanding command dropped: no CQE is
        # ever posted for them (timers scheduled before are voided by the epoch).
        self._epoch += 1
        self._sqs.clear()
        self._cqs.clear()
        self._held.clear()
        self._queues_created = False
        self._features = dict(_FEATURE_DEFAULTS)
        self._rdy = False
        self._rdy_at = None
        self._shst = 0
        if not self._cfs_persists:
            self._cfs = False
        self._update_live()

    def function_reset(self) -> None:
        """A function-level reset (VFIO_DEVICE_RESET; vfio-pci's reset when the device fd is
        released): a controller reset, and the registers back to their power-on values."""
        with self._lock:
            self._controller_reset()
            self._cc = self._aqa = self._asq = self._acq = self._intms = 0

    # -- registers (NVMe 2.0, 3.1.4) --------------------------------------------------------------
    def register(self, offset: int, width: int) -> _sys.Register:
        """The register object for an access of ``width`` bytes at ``offset`` in BAR0."""
        stride = 4 << self.config.dstrd
        rel = offset - DOORBELLS
        if width == 4 and rel >= 0 and rel % stride == 0:
            y, is_cq = divmod(rel // stride, 2)
            return _CqHeadDoorbell(self, y) if is_cq else _SqTailDoorbell(self, y)
        return _Register(self, offset, width)

    def _cap(self) -> int:
        c = self.config
        return (
            c.mqes
            | int(c.cqr) << 16
            | (c.to & 0xFF) << 24
            | (c.dstrd & 0xF) << 32
            | 1 << 37  # CSS: NVM command set
            | (c.mpsmin & 0xF) << 48
            | (c.mpsmax & 0xF) << 52
        )

    def _ready(self) -> bool:
        if not self._rdy and self._rdy_at is not None and time.monotonic() >= self._rdy_at:
            self._rdy = True
            self._update_live()
        return self._rdy

    def _update_live(self) -> None:
        self._live = self._rdy and not self._cfs and not self._removed and self._shst == 0

    def _read32(self, off: int) -> int:
        if off in (CAP, CAP + 4):
            return (self._cap() >> (8 * (off - CAP))) & 0xFFFFFFFF
        if off == VS:
            return self.config.version
        if off in (INTMS, INTMC):
            return self._intms
        if off == CC:
            return self._cc
        if off == CSTS:
            return int(self._ready()) | int(self._cfs) << 1 | self._shst << 2
        if off == AQA:
            return self._aqa
        if off in (ASQ, ASQ + 4):
            return (self._asq >> (8 * (off - ASQ))) & 0xFFFFFFFF
        if off in (ACQ, ACQ + 4):
            return (self._acq >> (8 * (off - ACQ))) & 0xFFFFFFFF
        return 0  # reserved, NSSR (not supported) and doorbells read as 0

    def _mmio_read(self, off: int, width: int) -> int:
        t0 = self._clock()
        with self._lock:
            try:
                if self._removed:
                    return (1 << (8 * width)) - 1  # nothing answers: the root port's all-ones
                if width == 8:
                    return self._read32(off) | self._read32(off + 4) << 32
                return self._read32(off)
            finally:
                self.busy_ns += self._clock() - t0

    def _mmio_write(self, off: int, width: int, v: int) -> None:
        t0 = self._clock()
        with self._lock:
            try:
                if self._removed:
                    return
                if width == 8:
                    self._write32(off, v & 0xFFFFFFFF)
                    self._write32(off + 4, (v >> 32) & 0xFFFFFFFF)
                else:
                    self._write32(off, v & 0xFFFFFFFF)
            finally:
                self.busy_ns += self._clock() - t0

    def _write32(self, off: int, v: int) -> None:
        if off == INTMS:  # NVMe 2.0, 3.1.4.3: write 1 to set a mask bit (pin/MSI, not MSI-X)
            self._intms |= v
        elif off == INTMC:  # ... and 1 to clear it
            self._intms &= ~v
        elif off == CC:
            self._write_cc(v)
        elif off == AQA:
            self._aqa = v & 0x0FFF0FFF
        elif off in (ASQ, ASQ + 4):
            shift = 8 * (off - ASQ)
            self._asq = (self._asq & ~(0xFFFFFFFF << shift)) | v << shift
        elif off in (ACQ, ACQ + 4):
            shift = 8 * (off - ACQ)
            self._acq = (self._acq & ~(0xFFFFFFFF << shift)) | v << shift
        elif off >= DOORBELLS:
            stride = 4 << self.config.dstrd
            rel = off - DOORBELLS
            if rel % stride == 0:
                y, is_cq = divmod(rel // stride, 2)
                if is_cq:
                    self._cq_head(y, v)
                else:
                    self._sq_tail(y, v)
        # CAP, VS and CSTS are read-only; NSSR is not supported (CAP.NSSRS = 0)

    def _write_cc(self, v: int) -> None:
        old, self._cc = self._cc, v
        if old & 1 and not v & 1:  # CC.EN 1 -> 0: a controller reset
            self._controller_reset()
        elif not old & 1 and v & 1:
            self._enable()
        if v & 1 and (v >> 14) & 0x3 and self._shst == 0:
            # CC.SHN = 01b or 10b: shutdown; it completes at once (CSTS.SHST = 10b) and the
            # controller processes nothing more until it is reset (NVMe 2.0, 3.6)
            self._shst = 0x2
            self._update_live()

    def _enable(self) -> None:
        # NVMe 2.0, 3.5.1: CC.EN 0 -> 1 with the admin queues from AQA, ASQ and ACQ.  A
        # configuration the controller cannot use sets CSTS.CFS (QEMU's nvme_start_ctrl).
        cc, c = self._cc, self.config
        if self._cfs:
            return  # a fatal status that outlived the reset: it stays down
        mps = (cc >> 7) & 0xF
        asqs, acqs = (self._aqa & 0xFFF) + 1, ((self._aqa >> 16) & 0xFFF) + 1
        if (
            (cc >> 4) & 0x7  # CC.CSS: only the NVM command set
            or not c.mpsmin <= mps <= c.mpsmax
            or asqs < 2
            or acqs < 2
            or self._asq & 0xFFF
            or self._acq & 0xFFF
            or not self._asq
            or not self._acq
        ):
            self._cfs = True
            self._update_live()
            return
        self._page = 4096 << mps
        self._max_transfer = (4096 << c.mpsmin) << c.mdts if c.mdts else 1 << 62
        cq = _CQ(0, self._acq, acqs, True, 0)  # the admin CQ: interrupts on, vector 0
        self._cqs[0] = cq
        self._sqs[0] = _SQ(0, self._asq, asqs, cq, self._hold_all or 0 in self._hold_qids)
        cq.sqs.add(0)
        if c.ready_delay is not None:
            self._rdy_at = time.monotonic() + c.ready_delay
            self._ready()

    # -- the IOMMU, as the device sees it --------------------------------------------------------
    def _sync(self) -> None:
        """Re-read the IOMMU mappings if the fake kernel's changed since last time."""
        if self.kernel.iommu_gen == self._gen:
            return
        self._gen = self.kernel.iommu_gen
        self._windows = self.kernel.dma_windows(self.bdf)
        self._starts = [w.iova for w in self._windows]
        self._hit = (0, 0, 0, False, False)
        for sq in self._sqs.values():
            sq.mem = None
        for cq in self._cqs.values():
            cq.words = None

    def _lookup(self, iova: int, n: int, write: bool) -> list[tuple[int, int]]:
        """(vaddr, length) pieces of ``n`` bytes at ``iova``; a fault raises _Blocked."""
        out = []
        while n:
            i = bisect.bisect_right(self._starts, iova) - 1
            w = self._windows[i] if i >= 0 else None
            if w is None or iova >= w.iova + w.size or not (w.write if write else w.read):
                self.kernel.record_fault(self.bdf, iova, write)
                raise _Blocked
            self._hit = (w.iova, w.iova + w.size, w.vaddr - w.iova, w.read, w.write)
            piece = min(n, w.iova + w.size - iova)
            out.append((iova + w.vaddr - w.iova, piece))
            iova += piece
            n -= piece
        return out

    def _pieces(self, segs: list[tuple[int, int]], write: bool) -> list[tuple[int, int]]:
        """Every segment translated before any byte moves: a fault touches nothing."""
        out: list[tuple[int, int]] = []
        for iova, n in segs:
            lo, hi, delta, r, w = self._hit
            if lo <= iova and iova + n <= hi and (w if write else r):
                out.append((iova + delta, n))
            else:
                out.extend(self._lookup(iova, n, write))
        return out

    def _contiguous(self, iova: int, n: int, write: bool) -> memoryview | None:
        """The host memory behind ``n`` bytes at ``iova`` if one mapping holds them all."""
        pieces = self._lookup(iova, n, write)
        if len(pieces) != 1:
            return None
        o = pieces[0][0] - _BASE
        return _RAW[o : o + n]

    def _read_host(self, iova: int, n: int) -> bytes:
        return b"".join(
            bytes(_RAW[v - _BASE : v - _BASE + k]) for v, k in self._pieces([(iova, n)], False)
        )

    # -- doorbells --------------------------------------------------------------------------------
    # the two hot entry points: acquire/release spelled out (cheaper than ``with``)
    def _ring_sq(self, qid: int, tail: int) -> None:
        t0 = self._clock()
        self._acquire()
        self.sq_doorbell_writes += 1
        try:
            self._sq_tail(qid, tail)
        finally:
            self.busy_ns += self._clock() - t0
            self._release()

    def _ring_cq(self, qid: int, head: int) -> None:
        t0 = self._clock()
        self._acquire()
        self.cq_doorbell_writes += 1
        try:
            self._cq_head(qid, head)
        finally:
            self.busy_ns += self._clock() - t0
            self._release()

    def _sq_tail(self, qid: int, tail: int) -> None:
        if not self._live:
            self._ready()  # CSTS.RDY may have come up since (ready_delay)
            if not self._live:
                return  # not ready, shut down, failed or gone: the write is dropped
        sq = self._sqs.get(qid)
        if sq is None or tail >= sq.size:
            return  # NVMe 2.0, 3.1.4.21: an invalid doorbell write (an async event we skip)
        sq.tail = tail
        if not self._dev.config[4] & 0x4:  # PCI_COMMAND_MASTER off: the device cannot fetch
            return
        if self.kernel.iommu_gen != self._gen:
            self._sync()
        mem = sq.mem
        if mem is None:
            try:
                mem = sq.mem = self._contiguous(sq.iova, sq.size * 64, False)
            except _Blocked:
                self._fail()  # the controller cannot read its own queue
                return
        held = self._held
        while sq.head != tail:
            head = sq.head
            if mem is not None:
                f: SqeFields = _SQE.unpack_from(mem, head * 64)
            else:
                try:
                    f = _SQE.unpack(self._read_host(sq.iova + head * 64, 64))
                except _Blocked:
                    self._fail()
                    return
            head += 1
            sq.head = 0 if head == sq.size else head
            if held and (qid, f[2]) in held:
                self._post(sq, f[2], COMMAND_ID_CONFLICT, 0)
            elif sq.hold or (qid == 0 and f[0] == ADMIN_ASYNC_EVENT):
                self._hold(sq, f)
            else:
                status, dw0 = self._execute(sq, f)
                self._post(sq, f[2], status, dw0)
            if not self._live:
                return

    def _cq_head(self, qid: int, head: int) -> None:
        if self._removed:
            return
        cq = self._cqs.get(qid)
        if cq is None or head >= cq.size:
            return
        cq.head = head
        while cq.pending and self._live:
            nt = cq.tail + 1
            if (0 if nt == cq.size else nt) == cq.head:
                break
            sq, cid, status, dw0 = cq.pending.popleft()
            self._post(sq, cid, status, dw0)

    def _hold(self, sq: _SQ, f: SqeFields) -> None:
        opcode = f[0]
        if sq.qid == 0 and opcode in (ADMIN_ABORT, ADMIN_ASYNC_EVENT):
            limit, status = (
                (self.config.acl, ABORT_COMMAND_LIMIT_EXCEEDED)
                if opcode == ADMIN_ABORT
                else (self.config.aerl, ASYNC_EVENT_LIMIT_EXCEEDED)
            )
            if sum(1 for c in self._held.values() if c.sq is sq and c.f[0] == opcode) > limit:
                self._post(sq, f[2], status, 0)
                return
        # an Asynchronous Event Request waits for an event; none is ever raised here
        self._held[(sq.qid, f[2])] = _Cmd(sq, f, stuck=opcode == ADMIN_ASYNC_EVENT and not sq.qid)

    def _fail(self) -> None:
        self._cfs = True  # a fatal error no CQE can report (NVMe 2.0, 3.1.4.6 CSTS.CFS)
        self._update_live()

    # -- completion (NVMe 2.0, 4.6) ---------------------------------------------------------------
    def _post(self, sq: _SQ, cid: int, status: int, dw0: int) -> None:
        cq = sq.cq
        tail = cq.tail
        nt = tail + 1
        if nt == cq.size:
            nt = 0
        if nt == cq.head:  # full: the entry waits until the host frees a slot
            cq.pending.append((sq, cid, status, dw0))
            return
        words = cq.words
        if words is None:
            try:
                mem = self._contiguous(cq.iova, cq.size * 16, True)
            except _Blocked:
                self._fail()  # the controller cannot write its own queue
                return
            if mem is not None:
                words = cq.words = mem.cast("I")
        dw2 = sq.head | sq.qid << 16  # SQHD, SQID
        dw3 = cid | cq.phase << 16 | status << 17  # P and the status field
        if words is not None:
            i = tail * 4
            words[i] = dw0 & 0xFFFFFFFF
            words[i + 1] = 0
            words[i + 2] = dw2
            words[i + 3] = dw3  # last: the phase tag makes the entry valid
        else:
            try:
                self._write_cqe_pieces(cq.iova + tail * 16, dw0, dw2, dw3)
            except _Blocked:
                self._fail()
                return
        cq.tail = nt
        if nt == 0:
            cq.phase ^= 1
        self.commands += 1
        if sq.qid:
            self.io_commands += 1
        if status:
            self._log_error(sq.qid, cid, status)
        if cq.ien:
            fds = self.kernel.irqs.get((self.bdf, _MSIX))
            if fds and cq.iv < len(fds):
                self.kernel.signal(fds[cq.iv])  # the MSI-X vector's eventfd

    def _write_cqe_pieces(self, iova: int, dw0: int, dw2: int, dw3: int) -> None:
        """A CQE across two IOMMU mappings: DW0-2, then DW3 with the phase tag."""
        for at, data in (
            (iova, struct.pack("<III", dw0 & 0xFFFFFFFF, 0, dw2)),
            (iova + 12, struct.pack("<I", dw3)),
        ):
            off = 0
            for v, k in self._pieces([(at, len(data))], True):
                _RAW[v - _BASE : v - _BASE + k] = data[off : off + k]
                off += k

    def _log_error(self, sqid: int, cid: int, status: int) -> None:
        # Error Information log entry (NVMe 2.0, Figure 206): count, SQID, CID, status field
        # (bits 15:1; bit 0 the phase tag), parameter error location (FFFFh: not given)
        self._error_count += 1
        entry = struct.pack("<QHHHH", self._error_count, sqid, cid, status << 1, 0xFFFF)
        self._errors.appendleft(entry.ljust(64, b"\0"))

    # -- command execution ----------------------------------------------------------------------
    def _execute(self, sq: _SQ, f: SqeFields) -> tuple[int, int]:
        try:
            if sq.qid:
                return self._io(f)
            handler = _ADMIN.get(f[0])
            if handler is None:
                return INVALID_OPCODE, 0
            return handler(self, f)
        except _Status as s:
            return s.status, s.dw0
        except _Blocked:
            return DATA_TRANSFER_ERROR, 0

    def _prps(self, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
        """The (iova, length) segments of a PRP transfer (NVMe 2.0, 4.1.1)."""
        page = self._page
        mask = page - 1
        if prp1 & 0x3:  # a PRP entry is dword aligned
            raise _Status(PRP_OFFSET_INVALID)
        first = page - (prp1 & mask)
        if length <= first:
            return [(prp1, length)]
        segs = [(prp1, first)]
        rest = length - first
        if rest <= page:  # PRP2 is the second page
            if prp2 & mask:
                raise _Status(PRP_OFFSET_INVALID)
            segs.append((prp2, rest))
            return segs
        if prp2 & 0x7:  # PRP2 is a PRP list pointer: qword entries
            raise _Status(PRP_OFFSET_INVALID)
        pages = (rest + mask) // page
        lst = prp2
        while pages:
            room = (page - (lst & mask)) // 8  # entries up to the end of this list's page
            take = room if pages > room else pages
            raw = self._read_host(lst, take * 8)
            entries = struct.unpack(f"<{take}Q", raw)
            if pages > room:  # the last entry of a full list points to the next list
                entries, lst = entries[:-1], entries[-1]
                if lst & mask:
                    raise _Status(PRP_OFFSET_INVALID)
            for e in entries:
                if e & mask:
                    raise _Status(PRP_OFFSET_INVALID)
                n = page if rest > page else rest
                segs.append((e, n))
                rest -= n
            pages -= len(entries)
        return segs

    def _to_host(self, prp1: int, prp2: int, data: bytes | memoryview) -> None:
        """A transfer from the controller to host memory (Identify, Get Log Page)."""
        off = 0
        for v, k in self._pieces(self._prps(prp1, prp2, len(data)), True):
            _RAW[v - _BASE : v - _BASE + k] = data[off : off + k]
            off += k

    def _io(self, f: SqeFields) -> tuple[int, int]:
        opcode, flags, _cid, nsid, prp1, prp2, c10, c11, c12, _c13, _c14, _c15 = f
        if flags:  # FUSE (fused operations) and PSDT (SGLs): neither is supported
            return INVALID_FIELD, 0
        if opcode == IO_READ or opcode == IO_WRITE:  # noqa: PLR1714, SIM109  (cheaper than `in`)
            ns = self._ns.get(nsid)
            if ns is None:
                return INVALID_NAMESPACE, 0
            nlb = (c12 & 0xFFFF) + 1
            length = nlb << ns.shift
            if length > self._max_transfer:
                return INVALID_FIELD, 0  # NVMe 2.0, 5.15.2.1 MDTS
            slba = c10 | c11 << 32
            if slba + nlb > ns.blocks:
                return LBA_OUT_OF_RANGE, 0
            off = slba << ns.shift
            mv = ns.mv
            page = self._page
            lo, hi, delta, r, w = self._hit
            if (
                not prp1 & 0x3
                and length <= page - (prp1 & (page - 1))
                and lo <= prp1
                and prp1 + length <= hi
                and (w if opcode == IO_READ else r)
            ):  # the common case: one page, in the mapping used last
                o = prp1 + delta - _BASE
                if opcode == IO_READ:
                    _RAW[o : o + length] = mv[off : off + length]
                else:
                    mv[off : off + length] = _RAW[o : o + length]
            elif opcode == IO_READ:  # the device writes host memory
                for v, k in self._pieces(self._prps(prp1, prp2, length), True):
                    _RAW[v - _BASE : v - _BASE + k] = mv[off : off + k]
                    off += k
            else:
                for v, k in self._pieces(self._prps(prp1, prp2, length), False):
                    mv[off : off + k] = _RAW[v - _BASE : v - _BASE + k]
                    off += k
            if opcode == IO_READ:
                self._reads += 1
                self._read_bytes += length
            else:
                self._writes += 1
                self._written_bytes += length
            return SUCCESS, 0
        if opcode == IO_FLUSH:  # NVM 1.0, 3.2.2: nothing volatile to flush here
            if nsid in self._ns or nsid == NSID_ALL:
                return SUCCESS, 0
            return INVALID_NAMESPACE, 0
        return INVALID_OPCODE, 0

    # -- admin commands (NVMe 2.0, 5) -------------------------------------------------------------
    def _create_cq(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.4; checks in the order of QEMU's nvme_create_cq
        prp1, c10, c11 = f[4], f[6], f[7]
        qid, qsize = c10 & 0xFFFF, c10 >> 16
        pc, ien, iv = c11 & 1, (c11 >> 1) & 1, c11 >> 16
        if (self._cc >> 20) & 0xF != 4:  # CC.IOCQES: 16-byte entries (Identify CQES)
            return INVALID_QUEUE_SIZE, 0
        if qid == 0 or qid > self.config.queues or qid in self._cqs:
            return INVALID_QUEUE_IDENTIFIER, 0
        if qsize == 0 or qsize > self.config.mqes:  # 0-based: at least 2 entries
            return INVALID_QUEUE_SIZE, 0
        if prp1 & (self._page - 1):
            return PRP_OFFSET_INVALID, 0
        if iv >= self._dev.msix_vectors:
            return INVALID_INTERRUPT_VECTOR, 0
        if not pc:  # CAP.CQR, and PRP-list queues are not emulated anyway
            return INVALID_FIELD, 0
        self._cqs[qid] = _CQ(qid, prp1, qsize + 1, bool(ien), iv)
        self._queues_created = True
        return SUCCESS, 0

    def _create_sq(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.5; checks in the order of QEMU's nvme_create_sq
        prp1, c10, c11 = f[4], f[6], f[7]
        qid, qsize = c10 & 0xFFFF, c10 >> 16
        pc, cqid = c11 & 1, c11 >> 16
        if (self._cc >> 16) & 0xF != 6:  # CC.IOSQES: 64-byte entries (Identify SQES)
            return INVALID_QUEUE_SIZE, 0
        if cqid == 0 or cqid not in self._cqs:
            return COMPLETION_QUEUE_INVALID, 0
        if qid == 0 or qid > self.config.queues or qid in self._sqs:
            return INVALID_QUEUE_IDENTIFIER, 0
        if qsize == 0 or qsize > self.config.mqes:
            return INVALID_QUEUE_SIZE, 0
        if prp1 & (self._page - 1):
            return PRP_OFFSET_INVALID, 0
        if not pc:
            return INVALID_FIELD, 0
        cq = self._cqs[cqid]
        self._sqs[qid] = _SQ(qid, prp1, qsize + 1, cq, self._hold_all or qid in self._hold_qids)
        cq.sqs.add(qid)
        self._queues_created = True
        return SUCCESS, 0

    def _delete_sq(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.7: the SQ's outstanding commands end with Command Aborted due to SQ
        # Deletion, posted before the Delete completes
        qid = f[6] & 0xFFFF
        sq = self._sqs.get(qid) if qid else None
        if sq is None:
            return INVALID_QUEUE_IDENTIFIER, 0
        for key in [k for k, c in self._held.items() if c.sq is sq]:
            self._held.pop(key)
            self._post(sq, key[1], ABORTED_SQ_DELETION, 0)
        del self._sqs[qid]
        sq.cq.sqs.discard(qid)
        return SUCCESS, 0

    def _delete_cq(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.6 (QEMU answers Completion Queue Invalid for a CQ that does not exist)
        qid = f[6] & 0xFFFF
        cq = self._cqs.get(qid) if qid else None
        if cq is None:
            return INVALID_QUEUE_IDENTIFIER, 0
        if cq.sqs:
            return INVALID_QUEUE_DELETION, 0
        del self._cqs[qid]
        return SUCCESS, 0

    def _identify(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.17
        nsid, prp1, prp2, cns = f[3], f[4], f[5], f[6] & 0xFF
        if cns == 0x00:
            if nsid == 0 or nsid > self._nn:  # FFFFFFFFh too: no common namespace data
                return INVALID_NAMESPACE, 0
            ns = self._ns.get(nsid)
            self._to_host(prp1, prp2, self._identify_namespace(ns) if ns else bytes(4096))
        elif cns == 0x01:
            self._to_host(prp1, prp2, self._identify_controller())
        elif cns == 0x02:
            if nsid >= 0xFFFFFFFE:
                return INVALID_NAMESPACE, 0
            ids = sorted(n for n in self._ns if n > nsid)[:1024]
            self._to_host(prp1, prp2, struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0"))
        else:
            return INVALID_FIELD, 0
        return SUCCESS, 0

    def _identify_controller(self) -> bytes:
        # NVMe 2.0, Figure 275
        c = self.config
        d = bytearray(4096)
        struct.pack_into("<HH", d, 0, self._dev_vendor(), 0x1AF4)  # VID, SSVID
        d[4:24] = c.serial.encode().ljust(20)[:20]
        d[24:64] = c.model.encode().ljust(40)[:40]
        d[64:72] = c.firmware.encode().ljust(8)[:8]
        d[72] = 6  # RAB
        d[77] = c.mdts
        struct.pack_into("<HI", d, 78, 0, c.version)  # CNTLID, VER
        d[258] = c.acl
        d[259] = c.aerl
        d[260] = 0x2  # FRMW: one firmware slot
        d[262] = c.elpe
        d[512] = 0x66  # SQES: 64-byte entries
        d[513] = 0x44  # CQES: 16-byte entries
        struct.pack_into("<I", d, 516, self._nn)  # NN
        d[525] = 0x1  # VWC: a volatile write cache (Flush has work to name)
        struct.pack_into("<H", d, 2048, 2500)  # power state 0: MP 25.00 W
        return bytes(d)

    def _dev_vendor(self) -> int:
        return int.from_bytes(self._dev.config[0:2], "little")

    @staticmethod
    def _identify_namespace(ns: _Ns) -> bytes:
        # NVM 1.0, Figure 97: NSZE, NCAP, NUSE; NLBAF 0 (one format), FLBAS 0; LBAF0: LBADS
        d = bytearray(4096)
        struct.pack_into("<QQQ", d, 0, ns.blocks, ns.blocks, ns.blocks)
        struct.pack_into("<I", d, 128, ns.shift << 16)
        return bytes(d)

    def _get_log_page(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.16
        prp1, prp2, c10, c11, c12, c13 = f[4], f[5], f[6], f[7], f[8], f[9]
        lid = c10 & 0xFF
        numd = ((c11 & 0xFFFF) << 16 | c10 >> 16) + 1
        offset = c12 | c13 << 32
        if lid == LOG_ERROR:
            log = b"".join(self._errors).ljust(64 * (self.config.elpe + 1), b"\0")
        elif lid == LOG_SMART:
            log = self._smart()
        elif lid == LOG_FW_SLOT:
            log = b"\x01".ljust(8, b"\0") + self.config.firmware.encode().ljust(8)[:8]
            log = log.ljust(512, b"\0")
        else:
            return INVALID_LOG_PAGE, 0
        if offset & 0x3 or offset > len(log):
            return INVALID_FIELD, 0
        self._to_host(prp1, prp2, log[offset : offset + 4 * numd].ljust(4 * numd, b"\0"))
        return SUCCESS, 0

    def _smart(self) -> bytes:
        # NVMe 2.0, Figure 207; data units are thousands of 512-byte units, rounded up
        def units(nbytes: int) -> int:
            return -(-nbytes // 512_000)

        d = bytearray(512)
        struct.pack_into("<BHBB", d, 0, 0, 313, 100, 10)  # no warning, 313 K, spare 100%, 10%
        struct.pack_into("<QQ", d, 32, units(self._read_bytes), 0)
        struct.pack_into("<QQ", d, 48, units(self._written_bytes), 0)
        struct.pack_into("<QQQQ", d, 64, self._reads, 0, self._writes, 0)
        struct.pack_into("<Q", d, 112, 1)  # power cycles
        struct.pack_into("<Q", d, 176, self._error_count)  # error information log entries
        return bytes(d)

    def _set_features(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.27
        c10, c11 = f[6], f[7]
        fid = c10 & 0xFF
        if c10 >> 31:  # SV: nothing is saveable here (ONCS.SSFS = 0)
            return FEATURE_NOT_SAVEABLE, 0
        if fid == FEAT_NUM_QUEUES:
            # 5.27.1.5: only before any I/O queue is created, else Command Sequence Error;
            # 65535 (0-based) is invalid.  The allocation does not depend on the request.
            if self._queues_created:
                return COMMAND_SEQUENCE_ERROR, 0
            if c11 & 0xFFFF == 0xFFFF or c11 >> 16 == 0xFFFF:
                return INVALID_FIELD, 0
            return SUCCESS, self._num_queues()
        if fid not in self._features:
            return INVALID_FIELD, 0
        self._features[fid] = c11
        return SUCCESS, 0

    def _get_features(self, f: SqeFields) -> tuple[int, int]:
        c10 = f[6]
        fid, sel = c10 & 0xFF, (c10 >> 8) & 0x7
        if sel > 3 or (fid != FEAT_NUM_QUEUES and fid not in self._features):
            return INVALID_FIELD, 0
        if sel == 3:  # supported capabilities: changeable, not saveable, not per namespace
            return SUCCESS, 0x4
        if fid == FEAT_NUM_QUEUES:
            return SUCCESS, self._num_queues()
        return SUCCESS, self._features[fid] if sel == 0 else _FEATURE_DEFAULTS[fid]

    def _num_queues(self) -> int:
        n = self.config.queues - 1
        return n | n << 16  # NSQA, NCQA (0-based)

    def _abort(self, f: SqeFields) -> tuple[int, int]:
        # NVMe 2.0, 5.1: DW0 bit 0 clear when the command was aborted, set when not.
        # QEMU 7.2's nvme_abort never aborts: DW0 = 1, or Invalid Field for an SQ that
        # does not exist.
        sqid, cid = f[6] & 0xFFFF, f[6] >> 16
        if sqid not in self._sqs:
            return INVALID_FIELD, 1
        if self.config.aborts:
            cmd = self._held.pop((sqid, cid), None)
            if cmd is not None:
                self._post(cmd.sq, cid, ABORT_REQUESTED, 0)
                return SUCCESS, 0
        return SUCCESS, 1


# Features kept as the host sets them (NVMe 2.0, Figure 317), with their defaults:
# Arbitration, Power Management, Temperature Threshold (343 K), Error Recovery, Volatile
# Write Cache (enabled), Interrupt Coalescing, Interrupt Vector Configuration, Write
# Atomicity Normal, Asynchronous Event Configuration.
_FEATURE_DEFAULTS = {0x01: 0, 0x02: 0, 0x04: 343, 0x05: 0, 0x06: 1, 0x08: 0, 0x09: 0, 0x0A: 0}
_FEATURE_DEFAULTS[0x0B] = 0

_ADMIN: dict[int, Callable[[NvmeSim, SqeFields], tuple[int, int]]] = {
    ADMIN_DELETE_SQ: NvmeSim._delete_sq,
    ADMIN_CREATE_SQ: NvmeSim._create_sq,
    ADMIN_GET_LOG_PAGE: NvmeSim._get_log_page,
    ADMIN_DELETE_CQ: NvmeSim._delete_cq,
    ADMIN_CREATE_CQ: NvmeSim._create_cq,
    ADMIN_IDENTIFY: NvmeSim._identify,
    ADMIN_ABORT: NvmeSim._abort,
    ADMIN_SET_FEATURES: NvmeSim._set_features,
    ADMIN_GET_FEATURES: NvmeSim._get_features,
}


@contextlib.contextmanager
def sim_controller(
    sysfs: Path,
    config: SimConfig | None = None,
    *,
    bdf: str = BDF,
    group: int = 10,
    cdev: int = 0,
) -> Iterator[tuple[FakeKernel, NvmeSim]]:
    """A fake kernel with a software NVMe controller at ``bdf`` (bound to vfio-pci in the
    fake sysfs at ``sysfs``), in use behind the syscall seam inside the ``with`` block::

        with sim_controller(tmp_path) as (kernel, sim):
            vd = open_device(BDF, sysfs=tmp_path, backend="type1")
    """
    cfg = config if config is not None else SimConfig()
    make_device(sysfs, bdf, pci.NVME_CLASS, group, "vfio-pci", cdev=cdev)
    kernel = FakeKernel()
    dev = kernel.add_device(bdf, group, cdev)
    dev.msix_vectors = cfg.msix_vectors
    dev.config[0x42] = (cfg.msix_vectors - 1) & 0xFF  # MSI-X table size (0-based)
    sim = NvmeSim(kernel, bdf, cfg)
    try:
        with _sys.use_kernel(kernel):
            yield kernel, sim
    finally:
        sim.close()
