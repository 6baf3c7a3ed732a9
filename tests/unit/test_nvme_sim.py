"""The software NVMe controller (uvdma_nvme.sim), driven with raw SQEs through uvdma's VFIO
layer and DMA API on the fake kernel: every value checked is the one NVMe 2.0 (or QEMU, where
it says so) gives.  The last test runs the examples/nvme driver on it."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import uvdma_nvme as nvme  # the example driver, unmodified
from uvdma import _sys
from uvdma.dma import (
    DmaDevice,
    dma_alloc_coherent,
    dma_free_coherent,
)
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.vfio import VfioDevice, open_device
from uvdma.vfio.faults import IommuFault
from uvdma_nvme import sim as S  # noqa: N812
from uvdma_nvme.sim import BDF, NvmeSim, SimConfig, SimNamespace, sim_controller

PAGE = 4096
CC_IO = (4 << 20) | (6 << 16)  # IOCQES 16 B, IOSQES 64 B
CC_EN = CC_IO | 1


class Cqe(NamedTuple):
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    phase: int
    status: int


class RawQueue:
    """An SQ/CQ pair in coherent DMA memory, written and read entry by entry."""

    def __init__(self, host: Host, qid: int, depth: int, cq_depth: int | None = None) -> None:
        self.host, self.qid, self.depth = host, qid, depth
        self.cq_depth = cq_depth or depth
        self.sq = dma_alloc_coherent(host.dma, 64 * depth)
        self.cq = dma_alloc_coherent(host.dma, 16 * self.cq_depth)
        self.sqdb = host.bar.reg32(S.DOORBELLS + 8 * qid)
        self.cqdb = host.bar.reg32(S.DOORBELLS + 8 * qid + 4)
        self.tail = self.head = 0
        self.phase = 1

    def put(
        self,
        opcode: int,
        cid: int,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: Sequence[int] = (),
        flags: int = 0,
    ) -> None:
        c = (*cdw, 0, 0, 0, 0, 0, 0)[:6]
        sqe = struct.pack("<BBHI8x8xQQ6I", opcode, flags, cid, nsid, prp1, prp2, *c)
        ctypes.memmove(self.sq[0] + 64 * self.tail, sqe, 64)
        self.tail = (self.tail + 1) % self.depth

    def ring(self) -> None:
        self.sqdb.value = self.tail

    def submit(
        self,
        opcode: int,
        cid: int,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: Sequence[int] = (),
        flags: int = 0,
    ) -> None:
        self.put(opcode, cid, nsid, prp1, prp2, cdw, flags)
        self.ring()

    def reap(self) -> list[Cqe]:
        out = []
        while True:
            w = (ctypes.c_uint32 * 4).from_address(self.cq[0] + 16 * self.head)
            if (w[3] >> 16) & 1 != self.phase:
                break
            out.append(
                Cqe(w[0], w[2] & 0xFFFF, w[2] >> 16, w[3] & 0xFFFF, (w[3] >> 16) & 1, w[3] >> 17)
            )
            self.head += 1
            if self.head == self.cq_depth:
                self.head, self.phase = 0, self.phase ^ 1
        if out:
            self.cqdb.value = self.head
        return out

    def run(
        self,
        opcode: int,
        cid: int = 1,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: Sequence[int] = (),
        flags: int = 0,
    ) -> Cqe:
        self.submit(opcode, cid, nsid, prp1, prp2, cdw, flags)
        got = self.reap()
        assert len(got) == 1 and got[0].cid == cid, got
        return got[0]

    def free(self) -> None:
        dma_free_coherent(self.host.dma, 64 * self.depth, *self.sq)
        dma_free_coherent(self.host.dma, 16 * self.cq_depth, *self.cq)


class Host:
    """A minimal host side: BAR0, DMA memory, the admin queue, raw commands."""

    def __init__(self, vd: VfioDevice) -> None:
        self.vd = vd
        self.bar = vd.bar(0)
        self.dma = DmaDevice(vd)
        vd.enable_bus_master()
        self.admin = RawQueue(self, 0, 8)
        self.io: dict[int, RawQueue] = {}
        self.bufs: list[tuple[int, int, int]] = []

    def enable(self) -> None:
        self.bar.write32(S.AQA, (7 << 16) | 7)
        self.bar.write64(S.ASQ, self.admin.sq[1])
        self.bar.write64(S.ACQ, self.admin.cq[1])
        self.bar.write32(S.CC, CC_EN)

    def csts(self) -> int:
        return self.bar.read32(S.CSTS)

    def buf(self, size: int) -> tuple[int, int]:
        """Zeroed coherent memory: (cpu address, dma address)."""
        cpu, dma = dma_alloc_coherent(self.dma, size)
        self.bufs.append((size, cpu, dma))
        return cpu, dma

    def create_pair(
        self,
        qid: int,
        depth: int = 16,
        *,
        ien: bool = False,
        iv: int = 0,
        cq_depth: int | None = None,
    ) -> RawQueue:
        q = RawQueue(self, qid, depth, cq_depth)
        self.io[qid] = q
        self.recreate(q, ien=ien, iv=iv)
        return q

    def recreate(self, q: RawQueue, *, ien: bool = False, iv: int = 0) -> None:
        """Create ``q``'s CQ and SQ on the controller (again, after a reset)."""
        restart(q)
        flags = 0x1 | (0x2 if ien else 0)
        e = self.admin.run(
            S.ADMIN_CREATE_CQ,
            90,
            prp1=q.cq[1],
            cdw=(((q.cq_depth - 1) << 16) | q.qid, (iv << 16) | flags),
        )
        assert e.status == 0, e
        e = self.admin.run(
            S.ADMIN_CREATE_SQ, 91, prp1=q.sq[1], cdw=((q.depth - 1) << 16 | q.qid, q.qid << 16 | 1)
        )
        assert e.status == 0, e

    def close(self) -> None:
        for size, cpu, dma in self.bufs:
            dma_free_coherent(self.dma, size, cpu, dma)
        for q in self.io.values():
            q.free()
        self.admin.free()
        assert self.dma.close() == []


def rw(
    qid_q: RawQueue,
    opcode: int,
    cid: int,
    lba: int,
    nblocks: int,
    prp1: int,
    prp2: int = 0,
    nsid: int = 1,
) -> Cqe:
    return qid_q.run(opcode, cid, nsid, prp1, prp2, (lba & 0xFFFFFFFF, lba >> 32, nblocks - 1))


def mem(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size)


@contextlib.contextmanager
def running(
    tmp_path: Path, config: SimConfig | None = None, *, enable: bool = True, backend: str = "type1"
) -> Iterator[tuple[FakeKernel, NvmeSim, Host]]:
    """The controller, a device opened on it, a host side; enabled (CSTS.RDY = 1) unless not."""
    with sim_controller(tmp_path, config) as (k, sim):
        vd = open_device(BDF, sysfs=tmp_path, backend=backend)
        host = Host(vd)
        try:
            if enable:
                host.enable()
                assert host.csts() == 0x1
            yield k, sim, host
        finally:
            host.close()
            vd.close()
        assert k.open_kinds() == [] and k.pinned == 0


def zero_page_buf(host: Host, pages: int = 1) -> tuple[int, int]:
    return host.buf(pages * PAGE)


def restart(q: RawQueue) -> None:
    """The host's side of a queue after a controller reset: empty, phase 1, CQ zeroed."""
    ctypes.memset(q.cq[0], 0, 16 * q.cq_depth)
    q.tail = q.head = 0
    q.phase = 1


# -- registers: bring-up, reset, shutdown ----------------------------------------------------------
def test_registers_at_power_on(tmp_path: Path) -> None:
    with running(tmp_path, enable=False) as (_k, _sim, host):
        bar = host.bar
        # CAP: MQES 1023, CQR, TO 1 (500 ms), DSTRD 0, CSS NVM, MPSMIN 0 (4 KiB), MPSMAX 4
        assert bar.read64(S.CAP) == 0x0040_0020_0101_03FF
        assert (bar.read32(S.CAP), bar.read32(S.CAP + 4)) == (0x0101_03FF, 0x0040_0020)
        assert bar.read32(S.VS) == 0x0002_0000
        assert [bar.read32(r) for r in (S.INTMS, S.INTMC, S.CC, S.CSTS, S.AQA)] == [0] * 5
        assert (bar.read64(S.ASQ), bar.read64(S.ACQ)) == (0, 0)
        bar.write64(S.CAP, 0)  # read-only registers ignore writes
        bar.write32(S.VS, 0)
        bar.write32(S.CSTS, 0xFF)
        assert (bar.read64(S.CAP), bar.read32(S.VS), bar.read32(S.CSTS)) == (
            0x0040_0020_0101_03FF,
            0x0002_0000,
            0,
        )
        bar.write32(S.INTMS, 0x5)  # write 1 to set a mask bit, INTMC to clear one
        bar.write32(S.INTMC, 0x1)
        assert (bar.read32(S.INTMS), bar.read32(S.INTMC)) == (0x4, 0x4)


def test_cap_follows_the_configuration(tmp_path: Path) -> None:
    cfg = SimConfig(mqes=63, cqr=False, to=30, dstrd=1, mpsmin=0, mpsmax=2, version=0x0001_0400)
    with running(tmp_path, cfg, enable=False) as (_k, _sim, host):
        assert host.bar.read64(S.CAP) == 63 | 30 << 24 | 1 << 32 | 1 << 37 | 2 << 52
        assert host.bar.read32(S.VS) == 0x0001_0400


def test_bring_up_reset_and_shutdown(tmp_path: Path) -> None:
    with running(tmp_path, enable=False) as (_k, sim, host):
        host.enable()
        assert host.csts() == 0x1  # RDY
        assert host.bar.read32(S.AQA) == 0x0007_0007
        assert (host.bar.read64(S.ASQ), host.bar.read64(S.ACQ)) == (
            host.admin.sq[1],
            host.admin.cq[1],
        )
        _cpu, dma = host.buf(PAGE)
        assert host.admin.run(S.ADMIN_IDENTIFY, 5, prp1=dma, cdw=(1,)) == Cqe(0, 1, 0, 5, 1, 0)
        host.bar.write32(S.CC, CC_EN | 1 << 14)  # CC.SHN = 01b: normal shutdown
        assert host.csts() == 0x1 | 0x2 << 2  # RDY, SHST = 10b: shutdown complete
        host.admin.submit(S.ADMIN_IDENTIFY, 6, prp1=dma, cdw=(1,))
        assert host.admin.reap() == []  # a shut-down controller processes nothing
        host.bar.write32(S.CC, 0)  # CC.EN = 0: a controller reset
        assert host.csts() == 0
        restart(host.admin)
        host.enable()  # the admin queue starts over from slot 0
        assert host.admin.run(S.ADMIN_IDENTIFY, 7, prp1=dma, cdw=(1,)) == Cqe(0, 1, 0, 7, 1, 0)
        assert sim.commands == 2


@pytest.mark.parametrize(
    ("aqa", "cc"),
    [
        (0x0007_0000, CC_EN),  # an admin SQ of 1 entry
        (0x0000_0007, CC_EN),  # an admin CQ of 1 entry
        (0x0007_0007, CC_EN | 5 << 7),  # CC.MPS 5: 128 KiB pages, above CAP.MPSMAX
        (0x0007_0007, CC_EN | 1 << 4),  # CC.CSS 001b: not the NVM command set
    ],
)
def test_an_unusable_configuration_sets_cfs(tmp_path: Path, aqa: int, cc: int) -> None:
    with running(tmp_path, enable=False) as (_k, _sim, host):
        host.bar.write32(S.AQA, aqa)
        host.bar.write64(S.ASQ, host.admin.sq[1])
        host.bar.write64(S.ACQ, host.admin.cq[1])
        host.bar.write32(S.CC, cc)
        assert host.csts() == 0x2  # CFS, not RDY (QEMU's nvme_start_ctrl failing)
        host.bar.write32(S.CC, 0)
        assert host.csts() == 0  # a reset clears it
        host.enable()
        assert host.csts() == 0x1


def test_a_controller_that_becomes_ready_late_or_never(tmp_path: Path) -> None:
    with running(tmp_path / "late", SimConfig(ready_delay=0.05), enable=False) as (_k, _s, host):
        host.enable()
        assert host.csts() == 0
        time.sleep(0.1)
        assert host.csts() == 0x1
    with running(tmp_path / "never", SimConfig(ready_delay=None), enable=False) as (_, sim, host):
        host.enable()
        time.sleep(0.05)
        assert host.csts() == 0
        _cpu, dma = host.buf(PAGE)
        host.admin.submit(S.ADMIN_IDENTIFY, 1, prp1=dma, cdw=(1,))
        assert host.admin.reap() == [] and sim.commands == 0  # doorbells before RDY: dropped


def test_a_function_reset_brings_every_register_back(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1)
        sim.hold(1)
        _cpu, dma = host.buf(PAGE)
        q.submit(S.IO_READ, 1, 1, dma)
        host.vd.reset()  # VFIO_DEVICE_RESET
        assert [host.bar.read32(r) for r in (S.CC, S.CSTS, S.AQA)] == [0, 0, 0]
        assert host.bar.read64(S.ASQ) == 0 and sim.held() == []


def test_the_linux_seam_is_a_plain_load_and_store() -> None:
    buf = (ctypes.c_uint64 * 2)()
    k = _sys.LinuxKernel()
    r32, r64 = k.mmio32(ctypes.addressof(buf)), k.mmio64(ctypes.addressof(buf) + 8)
    assert (type(r32), type(r64)) == (ctypes.c_uint32, ctypes.c_uint64)
    r32.value, r64.value = 0x1234_5678, 1 << 63
    assert list(buf) == [0x1234_5678, 1 << 63]


def test_doorbells_the_controller_cannot_act_on(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1, depth=4)
        _cpu, dma = host.buf(PAGE)
        q.put(S.IO_READ, 1, 1, dma, cdw=(0, 0, 7))
        q.sqdb.value = 4  # past the end of a 4-entry SQ: ignored
        host.bar.write32(S.DOORBELLS + 8 * 9, 1)  # SQ 9 does not exist
        assert q.reap() == [] and sim.commands == 2  # the two creations only
        host.vd.config_write(0x04, 2, host.vd.config_read(0x04, 2) & ~0x4)  # bus master off
        q.ring()
        assert q.reap() == []  # the device cannot fetch: the command waits in the SQ
        host.vd.enable_bus_master()
        q.ring()
        assert q.reap() == [Cqe(0, 1, 1, 1, 1, 0)]


def test_closing_the_device_resets_the_controller(tmp_path: Path) -> None:
    with sim_controller(tmp_path) as (k, sim):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        host = Host(vd)
        host.enable()
        q = host.create_pair(1)
        sim.hold(1)
        _cpu, dma = host.buf(PAGE)
        q.submit(S.IO_READ, 1, 1, dma, cdw=(0, 0, 7))
        sim.complete_after(0.02)
        host.close()
        vd.close()  # vfio-pci resets a device when its last fd is released
        assert sim.held() == [] and sim._cc == 0 and not sim._sqs
        time.sleep(0.1)
        assert sim.commands == 2  # Create CQ and SQ; the read was dropped, the timer did nothing
        assert k.iommu_faults == {}


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    k = FakeKernel()
    k.add_device(BDF, 10, 0)
    with pytest.raises(ValueError, match="do not fit in this process's address space"):
        NvmeSim(k, BDF, SimConfig(namespaces=(SimNamespace(1, 1 << 40),)))
    with pytest.raises(ValueError, match="need doorbells past the end of BAR0"):
        NvmeSim(k, BDF, SimConfig(queues=4000))
    with pytest.raises(ValueError, match="LBA size 520 is not 512 or 4096"):
        NvmeSim(k, BDF, SimConfig(namespaces=(SimNamespace(1, 8, 520),)))
    assert k.models == {}  # refused before attaching anything
    with sim_controller(tmp_path / "d") as (_k, sim):
        with pytest.raises(ValueError, match="n must be 0 or more"):
            sim.complete(-1)
        with pytest.raises(ValueError, match="no command with CID 3 is held on SQ 1"):
            sim.stick(3, qid=1)


# -- admin commands --------------------------------------------------------------------------------
def test_identify(tmp_path: Path) -> None:
    cfg = SimConfig(
        namespaces=(SimNamespace(1, 1000, 512), SimNamespace(3, 64, 4096)), nn=4, mdts=3
    )
    with running(tmp_path, cfg) as (_k, _sim, host):
        cpu, dma = host.buf(2 * PAGE)
        a = host.admin
        # PRP1 at an offset: the 4 KiB spill into the page PRP2 names
        assert a.run(S.ADMIN_IDENTIFY, 1, prp1=dma + 0x800, prp2=dma + PAGE, cdw=(1,)).status == 0
        d = mem(cpu + 0x800, PAGE)
        assert struct.unpack_from("<HH", d, 0) == (0x1B36, 0x1AF4)  # VID, SSVID
        assert d[4:24] == b"UVDMASIM0001".ljust(20)
        assert d[24:64] == b"uvdma software NVMe controller".ljust(40)
        assert d[64:72] == b"1.0".ljust(8)
        assert (d[77], struct.unpack_from("<I", d, 80)[0]) == (3, 0x0002_0000)  # MDTS, VER
        assert (d[258], d[259], d[262], d[512], d[513], d[525]) == (3, 3, 15, 0x66, 0x44, 1)
        assert struct.unpack_from("<I", d, 516)[0] == 4  # NN
        ctypes.memset(cpu, 0xEE, PAGE)
        assert a.run(S.ADMIN_IDENTIFY, 2, nsid=1, prp1=dma, cdw=(0,)).status == 0
        d = mem(cpu, PAGE)
        assert struct.unpack_from("<QQQBB", d, 0) == (1000, 1000, 1000, 0, 0)  # .., NLBAF, FLBAS
        assert d[26] == 0 and d[128:132] == bytes([0, 0, 9, 0])  # LBAF0: LBADS 9
        assert a.run(S.ADMIN_IDENTIFY, 3, nsid=3, prp1=dma, cdw=(0,)).status == 0
        assert struct.unpack_from("<Q", mem(cpu, 8))[0] == 64 and mem(cpu + 130, 1) == b"\x0c"
        ctypes.memset(cpu, 0xEE, PAGE)
        assert a.run(S.ADMIN_IDENTIFY, 4, nsid=2, prp1=dma, cdw=(0,)).status == 0
        assert mem(cpu, PAGE) == bytes(PAGE)  # an inactive NSID: zeroes
        for nsid in (0, 5, 0xFFFFFFFF):
            assert a.run(S.ADMIN_IDENTIFY, 5, nsid=nsid, prp1=dma, cdw=(0,)).status == 0x400B
        for after, ids in ((0, [1, 3]), (1, [3]), (3, [])):
            assert a.run(S.ADMIN_IDENTIFY, 6, nsid=after, prp1=dma, cdw=(2,)).status == 0
            got = struct.unpack_from("<1024I", mem(cpu, PAGE))
            assert list(got[: len(ids) + 1]) == [*ids, 0] and not any(got[len(ids) :])
        assert a.run(S.ADMIN_IDENTIFY, 7, nsid=0xFFFFFFFE, prp1=dma, cdw=(2,)).status == 0x400B
        assert a.run(S.ADMIN_IDENTIFY, 8, prp1=dma, cdw=(0x10,)).status == 0x4002  # CNS 10h
        assert a.run(0x7F, 9).status == 0x4001  # Invalid Command Opcode


def test_number_of_queues_is_set_before_any_queue_exists(tmp_path: Path) -> None:
    with running(tmp_path, SimConfig(queues=4)) as (_k, _sim, host):
        a = host.admin
        # the allocation does not depend on the request (QEMU: max_ioqpairs), 0-based
        assert a.run(S.ADMIN_SET_FEATURES, 1, cdw=(7, 15 << 16 | 15)) == Cqe(0x30003, 1, 0, 1, 1, 0)
        assert a.run(S.ADMIN_SET_FEATURES, 2, cdw=(7, 0)).dw0 == 0x30003  # again: no queue yet
        assert a.run(S.ADMIN_GET_FEATURES, 3, cdw=(7,)).dw0 == 0x30003
        assert a.run(S.ADMIN_SET_FEATURES, 4, cdw=(7, 0xFFFF)).status == 0x4002  # 65536 SQs
        host.create_pair(1)
        # NVMe 2.0, 5.27.1.5: after an I/O queue exists, Command Sequence Error
        assert a.run(S.ADMIN_SET_FEATURES, 5, cdw=(7, 0)).status == 0x400C
        assert a.run(S.ADMIN_SET_FEATURES, 6, cdw=(7 | 1 << 31, 0)).status == 0x410D  # SV
        host.bar.write32(S.CC, 0)  # a reset deletes the queues: it may be set again
        restart(a)
        host.enable()
        assert a.run(S.ADMIN_SET_FEATURES, 7, cdw=(7, 0)) == Cqe(0x30003, 1, 0, 7, 1, 0)
        assert a.run(S.ADMIN_SET_FEATURES, 8, cdw=(6, 0)).status == 0  # VWC off
        assert a.run(S.ADMIN_GET_FEATURES, 9, cdw=(6,)).dw0 == 0
        assert a.run(S.ADMIN_GET_FEATURES, 10, cdw=(6 | 1 << 8,)).dw0 == 1  # SEL: default
        assert a.run(S.ADMIN_GET_FEATURES, 11, cdw=(6 | 3 << 8,)).dw0 == 0x4  # changeable
        assert a.run(S.ADMIN_GET_FEATURES, 12, cdw=(0x7F,)).status == 0x4002


CREATE_CQ, CREATE_SQ = S.ADMIN_CREATE_CQ, S.ADMIN_CREATE_SQ
DELETE_CQ, DELETE_SQ = S.ADMIN_DELETE_CQ, S.ADMIN_DELETE_SQ


@pytest.mark.parametrize(
    ("opcode", "cdw10", "cdw11", "offset", "status"),
    [
        (CREATE_CQ, 15 << 16 | 0, 1, 0, 0x4101),  # QID 0
        (CREATE_CQ, 15 << 16 | 5, 1, 0, 0x4101),  # above the 4 allocated
        (CREATE_CQ, 15 << 16 | 1, 1, 0, 0x4101),  # in use
        (CREATE_CQ, 0 << 16 | 2, 1, 0, 0x4102),  # 1 entry
        (CREATE_CQ, 64 << 16 | 2, 1, 0, 0x4102),  # 65 entries: above MQES (63, 0-based)
        (CREATE_CQ, 15 << 16 | 2, 1, 0x100, 0x4013),  # not page aligned
        (CREATE_CQ, 15 << 16 | 2, 4 << 16 | 3, 0, 0x4108),  # vector 4 of 4 MSI-X vectors
        (CREATE_CQ, 15 << 16 | 2, 0, 0, 0x4002),  # not physically contiguous (CAP.CQR)
        (CREATE_SQ, 15 << 16 | 2, 0 << 16 | 1, 0, 0x4100),  # on the admin CQ
        (CREATE_SQ, 15 << 16 | 2, 2 << 16 | 1, 0, 0x4100),  # on a CQ that does not exist
        (CREATE_SQ, 15 << 16 | 0, 1 << 16 | 1, 0, 0x4101),  # QID 0
        (CREATE_SQ, 15 << 16 | 1, 1 << 16 | 1, 0, 0x4101),  # in use
        (CREATE_SQ, 15 << 16 | 5, 1 << 16 | 1, 0, 0x4101),  # above the 4 allocated
        (CREATE_SQ, 0 << 16 | 2, 1 << 16 | 1, 0, 0x4102),  # 1 entry
        (CREATE_SQ, 15 << 16 | 2, 1 << 16 | 1, 0x80, 0x4013),  # not page aligned
        (CREATE_SQ, 15 << 16 | 2, 1 << 16 | 0, 0, 0x4002),  # not physically contiguous
        (DELETE_SQ, 0, 0, 0, 0x4101),  # the admin SQ
        (DELETE_SQ, 2, 0, 0, 0x4101),  # does not exist
        (DELETE_CQ, 0, 0, 0, 0x4101),  # the admin CQ
        (DELETE_CQ, 1, 0, 0, 0x410C),  # SQ 1 still uses it: Invalid Queue Deletion
        (DELETE_CQ, 2, 0, 0, 0x4101),  # does not exist
    ],
)
def test_queue_management_errors(
    tmp_path: Path, opcode: int, cdw10: int, cdw11: int, offset: int, status: int
) -> None:
    with running(tmp_path, SimConfig(queues=4, mqes=63)) as (_k, sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(PAGE)
        e = host.admin.run(opcode, 9, prp1=dma + offset, cdw=(cdw10, cdw11))
        assert (e.status, e.dw0) == (status, 0)
        # nothing changed: queue 1 still works, and queue 2 can still be made
        _cpu, data = host.buf(PAGE)
        assert rw(q, S.IO_READ, 3, 0, 8, data).status == 0
        host.create_pair(2)
        assert sorted(sim._sqs) == [0, 1, 2] and sorted(sim._cqs) == [0, 1, 2]


def test_queues_are_deleted_and_made_again(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, _sim, host):
        q = host.create_pair(1)
        a = host.admin
        assert a.run(DELETE_SQ, 1, cdw=(1,)).status == 0
        assert a.run(DELETE_CQ, 2, cdw=(1,)).status == 0
        assert a.run(CREATE_CQ, 3, prp1=q.cq[1], cdw=(15 << 16 | 1, 1)).status == 0
        assert a.run(CREATE_SQ, 4, prp1=q.sq[1], cdw=(15 << 16 | 1, 1 << 16 | 1)).status == 0
        restart(q)
        _cpu, dma = host.buf(PAGE)
        assert rw(q, S.IO_READ, 1, 0, 8, dma) == Cqe(0, 1, 1, 1, 1, 0)


def test_queue_entry_sizes_must_be_set_first(tmp_path: Path) -> None:
    with running(tmp_path, enable=False) as (_k, _sim, host):
        host.bar.write32(S.AQA, 7 << 16 | 7)
        host.bar.write64(S.ASQ, host.admin.sq[1])
        host.bar.write64(S.ACQ, host.admin.cq[1])
        host.bar.write32(S.CC, 1)  # no IOSQES/IOCQES
        _cpu, dma = host.buf(PAGE)
        assert host.admin.run(CREATE_CQ, 1, prp1=dma, cdw=(15 << 16 | 1, 1)).status == 0x4102


def test_log_pages(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, _sim, host):
        q = host.create_pair(1)
        cpu, dma = host.buf(PAGE)
        for cid in range(3):
            assert rw(q, S.IO_READ, cid, 8 * cid, 8, dma).status == 0
        assert rw(q, S.IO_WRITE, 3, 0, 1, dma).status == 0
        assert rw(q, S.IO_READ, 4, (1 << 21) - 1, 2, dma).status == 0x4080  # LBA Out of Range
        a = host.admin
        assert a.run(S.ADMIN_GET_LOG_PAGE, 1, NSID_ALL, dma, cdw=(127 << 16 | 2,)).status == 0
        d = mem(cpu, 512)
        assert struct.unpack_from("<BHBB", d, 0) == (0, 313, 100, 10)
        # data units: thousands of 512-byte units, rounded up; commands; error entries
        assert struct.unpack_from("<QxxxxxxxxQ", d, 32) == (1, 1)
        assert struct.unpack_from("<Q8xQ", d, 64) == (3, 1)
        assert struct.unpack_from("<Q", d, 176)[0] == 1
        assert a.run(S.ADMIN_GET_LOG_PAGE, 2, NSID_ALL, dma, cdw=(31 << 16 | 1,)).status == 0
        # Error Information: count, SQID, CID, status field (bits 15:1), parameter location
        assert struct.unpack_from("<QHHHH", mem(cpu, 16)) == (1, 1, 4, 0x4080 << 1, 0xFFFF)
        assert mem(cpu + 16, 112) == bytes(112)  # the rest of entry 0, and entry 1: empty
        assert a.run(S.ADMIN_GET_LOG_PAGE, 3, NSID_ALL, dma, cdw=(127 << 16 | 3,)).status == 0
        assert mem(cpu, 16) == b"\x01" + bytes(7) + b"1.0     "  # AFI slot 1, FRS1
        assert a.run(S.ADMIN_GET_LOG_PAGE, 4, NSID_ALL, dma, cdw=(0x7F,)).status == 0x4109
        offsets = ((1028, 0), (2, 0))  # past the log's 1024 bytes; not dword aligned
        for lo, hi in offsets:
            e = a.run(S.ADMIN_GET_LOG_PAGE, 5, NSID_ALL, dma, cdw=(1, 0, lo, hi))
            assert e.status == 0x4002


NSID_ALL = 0xFFFFFFFF


# -- I/O -------------------------------------------------------------------------------------------
def build_prps(
    data: int, length: int, list_cpu: int, list_dma: int, list_offset: int = 0
) -> tuple[int, int]:
    """PRP1/PRP2 for ``length`` bytes at ``data``, the list written at ``list_offset``."""
    first = PAGE - data % PAGE
    if length <= first:
        return data, 0
    pages = [data + first + i * PAGE for i in range(-(-(length - first) // PAGE))]
    if len(pages) == 1:
        return data, pages[0]
    pos, i = list_offset, 0
    while i < len(pages):
        if pos % PAGE == PAGE - 8 and len(pages) - i > 1:  # chain to the next list page
            nxt = (pos // PAGE + 1) * PAGE
            ctypes.c_uint64.from_address(list_cpu + pos).value = list_dma + nxt
            pos = nxt
            continue
        ctypes.c_uint64.from_address(list_cpu + pos).value = pages[i]
        pos, i = pos + 8, i + 1
    return data, list_dma + list_offset


SHAPES = [  # (data offset in its page, bytes, PRP list offset)
    (0x200, 512, 0),  # PRP1 only, at an offset
    (0, 4096, 0),  # PRP1 only
    (0x200, 4096, 0),  # PRP1 and PRP2 (the second page)
    (0, 8192, 0),  # two whole pages
    (0, 3 * 4096, 0),  # a PRP list of 2 entries
    (0x800, 5 * 4096, 0),  # a list of 5, PRP1 at an offset
    (0, 4 * 4096, PAGE - 16),  # a list that starts 2 entries before its page ends: chained
    (0, 600 * 4096, 0),  # 599 entries: 511 and a chain pointer, then 88
]


@pytest.mark.parametrize("lba_size", [512, 4096])
def test_write_then_read_with_every_prp_shape(tmp_path: Path, lba_size: int) -> None:
    cfg = SimConfig(mdts=0, namespaces=(SimNamespace(1, (8 << 20) // lba_size, lba_size),))
    with running(tmp_path, cfg) as (_k, sim, host):
        q = host.create_pair(1)
        src_cpu, src = host.buf(602 * PAGE)
        dst_cpu, dst = host.buf(602 * PAGE)
        lst_cpu, lst = host.buf(4 * PAGE)
        rng = np.random.default_rng(7)
        ctypes.memmove(
            src_cpu, rng.integers(0, 256, 602 * PAGE, dtype=np.uint8).tobytes(), 602 * PAGE
        )
        lba = 3
        for cid, (offset, size, list_offset) in enumerate(SHAPES):
            if size % lba_size:
                continue
            n = size // lba_size
            ctypes.memset(dst_cpu, 0, 602 * PAGE)
            prp1, prp2 = build_prps(src + offset, size, lst_cpu, lst, list_offset)
            assert rw(q, S.IO_WRITE, cid, lba, n, prp1, prp2).status == 0, (offset, size)
            stored = sim.namespace_data()[lba * lba_size : lba * lba_size + size]
            assert stored == mem(src_cpu + offset, size)
            prp1, prp2 = build_prps(dst + offset, size, lst_cpu, lst, list_offset)
            assert rw(q, S.IO_READ, cid, lba, n, prp1, prp2).status == 0
            assert mem(dst_cpu + offset, size) == mem(src_cpu + offset, size)
            assert mem(dst_cpu, offset) == bytes(offset)  # nothing before ...
            after = dst_cpu + offset + size
            assert mem(after, 4096) == bytes(4096)  # ... or after
            lba += n + 1


def test_prp_offsets_the_specification_refuses(tmp_path: Path) -> None:
    with running(tmp_path, SimConfig(mdts=0)) as (_k, _sim, host):
        q = host.create_pair(1)
        dst_cpu, dst = host.buf(602 * PAGE)
        lst_cpu, lst = host.buf(2 * PAGE)
        assert rw(q, S.IO_READ, 1, 0, 1, dst + 2).status == 0x4013  # PRP1 not dword aligned
        assert rw(q, S.IO_READ, 2, 0, 16, dst, dst + PAGE + 0x10).status == 0x4013  # PRP2
        prp1, prp2 = build_prps(dst, 3 * PAGE, lst_cpu, lst)
        ctypes.c_uint64.from_address(lst_cpu + 8).value += 0x200  # a list entry, offset
        assert rw(q, S.IO_READ, 3, 0, 24, prp1, prp2).status == 0x4013
        assert rw(q, S.IO_READ, 4, 0, 24, prp1, lst + 4).status == 0x4013  # list not qword
        prp1, prp2 = build_prps(dst, 600 * PAGE, lst_cpu, lst)
        ctypes.c_uint64.from_address(lst_cpu + PAGE - 8).value += 0x100  # the chain pointer
        assert rw(q, S.IO_READ, 5, 0, 4800, prp1, prp2).status == 0x4013
        assert mem(dst_cpu, 602 * PAGE) == bytes(602 * PAGE)  # refused before any byte moved


def test_io_checks(tmp_path: Path) -> None:
    cfg = SimConfig(mdts=1, namespaces=(SimNamespace(1, 100, 512),))  # MDTS: 8 KiB
    with running(tmp_path, cfg) as (_k, _sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(2 * PAGE)
        assert rw(q, S.IO_READ, 1, 99, 1, dma).status == 0
        assert rw(q, S.IO_READ, 2, 99, 2, dma).status == 0x4080  # LBA Out of Range
        assert rw(q, S.IO_READ, 3, 1 << 40, 1, dma).status == 0x4080
        assert rw(q, S.IO_READ, 4, 0, 16, dma, dma + PAGE).status == 0  # 8 KiB: MDTS
        assert rw(q, S.IO_READ, 5, 0, 17, dma, dma + PAGE).status == 0x4002  # above MDTS
        assert rw(q, S.IO_READ, 6, 0, 1, dma, nsid=2).status == 0x400B
        assert rw(q, S.IO_WRITE, 7, 0, 1, dma, nsid=0).status == 0x400B
        assert q.run(S.IO_FLUSH, 8, 1).status == 0
        assert q.run(S.IO_FLUSH, 9, NSID_ALL).status == 0
        assert q.run(S.IO_FLUSH, 10, 2).status == 0x400B
        assert q.run(0x7F, 11, 1).status == 0x4001  # Invalid Command Opcode
        assert q.run(S.IO_READ, 12, 1, dma, flags=0x1).status == 0x4002  # fused
        assert q.run(S.IO_READ, 13, 1, dma, flags=0x40).status == 0x4002  # PSDT: an SGL


# -- holding, completing, sticking, aborting ---------------------------------------------------
def test_held_commands_complete_when_told(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1, depth=8, cq_depth=4)
        cpu, dma = host.buf(PAGE)
        sim.hold(1)
        for cid in (10, 11, 12):
            q.put(S.IO_READ, cid, 1, dma, cdw=(0, 0, 7))
        q.ring()
        assert q.reap() == []
        assert sim.held() == [
            S.HeldCommand(1, cid, S.IO_READ, 1, False, False) for cid in (10, 11, 12)
        ]
        sim.namespace_data()[0:PAGE] = b"\x5a" * PAGE  # the data phase runs at completion
        assert sim.complete(1) == 1
        assert q.reap() == [Cqe(0, 3, 1, 10, 1, 0)]  # SQHD 3: three fetched
        assert mem(cpu, PAGE) == b"\x5a" * PAGE
        assert sim.complete(cid=12) == 1
        assert q.reap() == [Cqe(0, 3, 1, 12, 1, 0)]
        assert sim.complete() == 1
        assert q.reap() == [Cqe(0, 3, 1, 11, 1, 0)]
        assert sim.held() == []
        sim.release(1)  # completes at once again; the CQ of 4 wraps: phase 0 on the 2nd pass
        assert rw(q, S.IO_READ, 13, 0, 8, dma) == Cqe(0, 4, 1, 13, 1, 0)
        assert rw(q, S.IO_READ, 14, 0, 8, dma) == Cqe(0, 5, 1, 14, 0, 0)
        with pytest.raises(ValueError, match="no command with CID 14 is held"):
            sim.complete(cid=14)


def test_a_slow_device_completes_on_a_timer(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(PAGE)
        sim.hold()
        q.submit(S.IO_READ, 1, 1, dma, cdw=(0, 0, 7))
        sim.complete_after(0.05, cid=1)
        deadline = time.monotonic() + 5
        got: list[Cqe] = []
        while not got and time.monotonic() < deadline:
            got = q.reap()
            time.sleep(0.005)
        assert got == [Cqe(0, 1, 1, 1, 1, 0)]


def test_a_cid_still_held_conflicts(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(PAGE)
        sim.hold(1)
        q.submit(S.IO_READ, 5, 1, dma, cdw=(0, 0, 7))
        q.submit(S.IO_READ, 5, 1, dma, cdw=(0, 0, 7))
        assert q.reap() == [Cqe(0, 2, 1, 5, 1, 0x4003)]  # Command ID Conflict, at once
        assert sim.complete() == 1 and q.reap() == [Cqe(0, 2, 1, 5, 1, 0)]


def test_a_full_cq_posts_when_the_host_frees_a_slot(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, _sim, host):
        q = host.create_pair(1, depth=8, cq_depth=2)  # a CQ of 2 entries holds one
        _cpu, dma = host.buf(PAGE)
        q.put(S.IO_READ, 1, 1, dma, cdw=(0, 0, 7))
        q.put(S.IO_READ, 2, 1, dma, cdw=(0, 0, 7))
        q.ring()
        assert mem(q.cq[0] + 16, 16) == bytes(16)  # the second waits
        # SQHD is the head when the entry is posted: 1 for the first; the host's CQ head
        # doorbell frees a slot for the second
        assert q.reap() == [Cqe(0, 1, 1, 1, 1, 0)]
        assert q.reap() == [Cqe(0, 2, 1, 2, 1, 0)]


def test_a_stuck_command_ends_only_by_abort(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1)
        cpu, dma = host.buf(PAGE)
        sim.namespace_data()[0:PAGE] = b"\x77" * PAGE
        sim.hold(1)
        q.submit(S.IO_READ, 7, 1, dma, cdw=(0, 0, 7))
        sim.stick(7)
        assert sim.held() == [S.HeldCommand(1, 7, S.IO_READ, 1, True, False)]
        assert sim.complete() == 0
        with pytest.raises(ValueError, match="CID 7 on SQ 1 is stuck"):
            sim.complete(cid=7)
        assert q.reap() == []
        e = host.admin.run(S.ADMIN_ABORT, 1, cdw=(7 << 16 | 1,))
        assert (e.status, e.dw0) == (0, 0)  # DW0 bit 0 clear: aborted
        assert q.reap() == [Cqe(0, 1, 1, 7, 1, 0x007)]  # Command Abort Requested
        assert mem(cpu, PAGE) == bytes(PAGE)  # no data phase
        assert host.admin.run(S.ADMIN_ABORT, 2, cdw=(7 << 16 | 1,)).dw0 == 1  # nothing to abort


def test_abort_that_never_aborts_as_qemu_7_2(tmp_path: Path) -> None:
    with running(tmp_path, SimConfig(aborts=False)) as (_k, sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(PAGE)
        sim.hold(1)
        q.submit(S.IO_READ, 7, 1, dma, cdw=(0, 0, 7))
        assert host.admin.run(S.ADMIN_ABORT, 1, cdw=(7 << 16 | 1,)) == Cqe(1, 3, 0, 1, 1, 0)
        assert [h.cid for h in sim.held()] == [7]  # still there
        e = host.admin.run(S.ADMIN_ABORT, 2, cdw=(7 << 16 | 9,))  # SQ 9 does not exist
        assert (e.status, e.dw0) == (0x4002, 1)
        assert sim.complete() == 1 and q.reap() == [Cqe(0, 1, 1, 7, 1, 0)]


def test_async_event_requests_wait_and_are_limited(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        a = host.admin
        for cid in range(4):  # AERL 3: four outstanding
            a.submit(S.ADMIN_ASYNC_EVENT, 20 + cid)
        assert a.reap() == []
        assert [(h.cid, h.stuck) for h in sim.held()] == [(20 + i, True) for i in range(4)]
        a.submit(S.ADMIN_ASYNC_EVENT, 24)
        assert a.reap() == [Cqe(0, 5, 0, 24, 1, 0x4105)]  # Async Event Request Limit Exceeded
        a.submit(S.ADMIN_ABORT, 1, cdw=(21 << 16 | 0,))
        assert a.reap() == [Cqe(0, 6, 0, 21, 1, 0x007), Cqe(0, 6, 0, 1, 1, 0)]


def test_abort_command_limit(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        host.create_pair(1)
        sim.hold(0)
        for cid in range(4):  # ACL 3: four outstanding
            host.admin.submit(S.ADMIN_ABORT, 30 + cid, cdw=(1 << 16 | 1,))
        assert host.admin.reap() == []
        host.admin.submit(S.ADMIN_ABORT, 34, cdw=(1 << 16 | 1,))
        assert host.admin.reap() == [Cqe(0, 7, 0, 34, 1, 0x4103)]
        sim.release()
        assert sim.complete() == 4
        assert [(e.cid, e.dw0) for e in host.admin.reap()] == [(30 + i, 1) for i in range(4)]


def test_deleting_an_sq_aborts_what_it_holds(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(PAGE)
        sim.hold(1)
        q.submit(S.IO_READ, 1, 1, dma, cdw=(0, 0, 7))
        q.submit(S.IO_READ, 2, 1, dma, cdw=(0, 0, 7))
        sim.stick(2)
        assert host.admin.run(DELETE_SQ, 3, cdw=(1,)).status == 0
        assert q.reap() == [Cqe(0, 2, 1, 1, 1, 0x008), Cqe(0, 2, 1, 2, 1, 0x008)]
        assert sim.held() == []


def test_a_reset_drops_outstanding_commands_for_good(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1, depth=4)
        cpu, dma = host.buf(2 * PAGE)
        sim.namespace_data()[0:PAGE] = b"\x33" * PAGE
        sim.hold(1)
        q.submit(S.IO_READ, 1, 1, dma, cdw=(0, 0, 7))
        q.submit(S.IO_READ, 2, 1, dma + PAGE, cdw=(0, 0, 7))
        sim.stick(2)
        sim.complete_after(0.05)
        commands = sim.commands
        host.bar.write32(S.CC, 0)  # CC.EN = 0
        assert host.csts() == 0 and sim.held() == []
        time.sleep(0.2)  # the timer fired: into nothing
        assert sim.complete() == 0
        assert mem(q.cq[0], 64) == bytes(64)  # no CQE was ever posted
        assert mem(cpu, 2 * PAGE) == bytes(2 * PAGE)  # and no data
        assert sim.commands == commands
        restart(host.admin)
        host.enable()
        sim.release()
        host.recreate(q)
        assert rw(q, S.IO_READ, 3, 0, 8, dma) == Cqe(0, 1, 1, 3, 1, 0)
        assert mem(cpu, PAGE) == b"\x33" * PAGE


def test_a_late_read_lands_in_whatever_its_iova_maps_now(tmp_path: Path) -> None:
    # Issue 8: a timed-out read the device runs later writes into memory handed out again.
    with running(tmp_path) as (k, sim, host):
        q = host.create_pair(1)
        sim.namespace_data()[0:PAGE] = b"\xab" * PAGE
        old, new = mmap.mmap(-1, PAGE), mmap.mmap(-1, PAGE)
        old_va = ctypes.addressof(ctypes.c_char.from_buffer(old))
        new_va = ctypes.addressof(ctypes.c_char.from_buffer(new))
        domain = host.vd.domain
        m = domain.map(old_va, PAGE)
        sim.hold(1)
        q.submit(S.IO_READ, 1, 1, m.iova, cdw=(0, 0, 7))
        domain.unmap(m)  # the host gave up on it, and the IOVA goes to someone else
        m2 = domain.map(new_va, PAGE, iova=m.iova)
        assert sim.transfer(1) == 0  # the device runs it now
        assert (ctypes.string_at(new_va, PAGE), ctypes.string_at(old_va, PAGE)) == (
            b"\xab" * PAGE,
            bytes(PAGE),
        )
        assert sim.held()[0].transferred
        assert sim.complete() == 1 and q.reap() == [Cqe(0, 1, 1, 1, 1, 0)]
        # unmapped by then: the IOMMU blocks the late DMA
        ctypes.memset(new_va, 0, PAGE)
        q.submit(S.IO_READ, 2, 1, m.iova, cdw=(0, 0, 7))
        domain.unmap(m2)
        assert sim.transfer(2) == S.DATA_TRANSFER_ERROR
        assert k.iommu_faults[BDF] == [IommuFault(m.iova, "Write", "blocked")]
        assert ctypes.string_at(new_va, PAGE) == bytes(PAGE)


# -- faults ----------------------------------------------------------------------------------------
def test_surprise_removal_reads_all_ones(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(PAGE)
        sim.hold(1)
        q.submit(S.IO_READ, 1, 1, dma, cdw=(0, 0, 7))
        sim.remove()
        assert host.bar.read32(S.CSTS) == 0xFFFF_FFFF
        assert host.bar.read32(S.VS) == 0xFFFF_FFFF
        assert host.bar.read64(S.CAP) == 0xFFFF_FFFF_FFFF_FFFF
        assert q.sqdb.value == 0xFFFF_FFFF
        host.bar.write32(S.CC, 0)  # dropped: nothing resets
        assert sim.complete() == 0 and len(sim.held()) == 1
        sim.release()
        q.submit(S.IO_READ, 2, 1, dma, cdw=(0, 0, 7))
        assert q.reap() == []
        with pytest.raises(ValueError, match="not running"):
            sim.transfer(1)


def test_fatal_status(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, sim, host):
        _cpu, dma = host.buf(PAGE)
        sim.fatal()
        assert host.csts() == 0x3  # RDY, CFS
        host.admin.submit(S.ADMIN_IDENTIFY, 1, prp1=dma, cdw=(1,))
        assert host.admin.reap() == []  # it processes nothing
        host.bar.write32(S.CC, 0)
        assert host.csts() == 0  # a reset recovers it
        restart(host.admin)
        host.enable()
        assert host.admin.run(S.ADMIN_IDENTIFY, 2, prp1=dma, cdw=(1,)).status == 0
        sim.fatal(persist=True)
        host.bar.write32(S.CC, 0)
        assert host.csts() == 0x2  # dead for good
        host.bar.write32(S.CC, CC_EN)
        assert host.csts() == 0x2


def test_an_unreadable_sq_is_fatal(tmp_path: Path) -> None:
    with running(tmp_path) as (k, _sim, host):
        q = host.create_pair(1)
        m = next(m for m in host.vd.domain.mappings() if m.iova <= q.sq[1] <= m.last)
        host.vd.domain.unmap(m)  # the SQ's memory is gone from the IOMMU
        q.submit(S.IO_FLUSH, 1, 1)
        assert host.csts() == 0x3  # CFS: no CQE can say so
        assert k.iommu_faults[BDF] == [IommuFault(q.sq[1], "Read", "blocked")]
        host.vd.domain.map(m.vaddr, m.size, m.iova)  # for the DMA API's teardown


def test_completions_raise_the_msix_vector(tmp_path: Path) -> None:
    with running(tmp_path) as (_k, _sim, host):
        vd = host.vd
        vd.enable_irqs(4)
        _cpu, dma = host.buf(PAGE)
        assert host.admin.run(S.ADMIN_IDENTIFY, 1, prp1=dma, cdw=(1,)).status == 0
        assert vd.wait_irq(0, 0) == 1  # the admin CQ: vector 0, always enabled
        q1 = host.create_pair(1, ien=True, iv=2)
        q2 = host.create_pair(2)  # interrupts off
        assert vd.wait_irq(0, 0) == 4  # the four creations
        assert rw(q1, S.IO_READ, 1, 0, 8, dma).status == 0
        assert rw(q2, S.IO_READ, 2, 0, 8, dma).status == 0
        assert vd.wait_irq(2, 0) == 1
        for vector in (0, 1, 2, 3):
            with pytest.raises(TimeoutError):
                vd.wait_irq(vector, 0)


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_the_iommu_refuses_what_is_not_mapped_for_it(tmp_path: Path, backend: str) -> None:
    with running(tmp_path, backend=backend) as (k, _sim, host):
        q = host.create_pair(1)
        cpu, dma = host.buf(PAGE)
        unmapped = 0x7000_0000
        assert rw(q, S.IO_READ, 1, 0, 8, unmapped).status == 0x004  # Data Transfer Error
        assert k.iommu_faults[BDF] == [IommuFault(unmapped, "Write", "blocked")]
        # the second page unmapped: the first is not written either
        ctypes.memset(cpu, 0x11, PAGE)
        assert rw(q, S.IO_READ, 2, 0, 16, dma, unmapped).status == 0x004
        assert mem(cpu, PAGE) == b"\x11" * PAGE
        # mapped for the device to write only (as DMA_FROM_DEVICE): a Write cannot read it
        page = mmap.mmap(-1, PAGE)
        va = ctypes.addressof(ctypes.c_char.from_buffer(page))
        wo = host.vd.domain.map(va, PAGE, read=False, write=True)
        assert rw(q, S.IO_WRITE, 3, 0, 8, wo.iova).status == 0x004
        assert rw(q, S.IO_READ, 4, 0, 8, wo.iova).status == 0
        host.vd.domain.unmap(wo)
        ro = host.vd.domain.map(va, PAGE, read=True, write=False)  # ... and read only
        assert rw(q, S.IO_READ, 5, 0, 8, ro.iova).status == 0x004
        assert rw(q, S.IO_WRITE, 6, 0, 8, ro.iova).status == 0
        host.vd.domain.unmap(ro)
        assert [(f.iova, f.kind) for f in k.iommu_faults[BDF]] == [
            (unmapped, "Write"),
            (unmapped, "Write"),
            (wo.iova, "Read"),
            (ro.iova, "Write"),
        ]


def test_the_cost_counter(tmp_path: Path) -> None:
    ticks = iter(range(0, 1 << 40, 100))  # every clock read is 100 ns after the last
    with running(tmp_path, SimConfig(clock=lambda: next(ticks))) as (_k, sim, host):
        q = host.create_pair(1)
        _cpu, dma = host.buf(PAGE)
        sim.reset_cost()
        assert sim.cost() == S.SimCost(0, 0, 0)
        for cid in range(10):
            rw(q, S.IO_READ, cid, 0, 8, dma)
        # each read: its SQ doorbell write and its CQ doorbell write, 100 ns each
        assert sim.cost() == S.SimCost(2000, 10, 10)
        assert sim.cost().ns_per_command == 200.0


def test_the_example_driver_runs_on_it(tmp_path: Path) -> None:
    cfg = SimConfig(namespaces=(SimNamespace(1, 4096, 512),), queues=2)
    with sim_controller(tmp_path, cfg) as (k, sim):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        ctrl = nvme.Controller(vd, command_timeout=2.0)
        try:
            ns = ctrl.namespace(1)
            assert (ns.blocks, ns.lba_size) == (4096, 512)
            q = ctrl.create_io_queues(1)[0]
            data = nvme.pattern(512, 100, 300)  # 150 KiB: split at MDTS (128 KiB), PRP lists
            q.write(ns, 100, data)
            assert sim.namespace_data()[100 * 512 : 400 * 512] == data.tobytes()
            back = np.zeros_like(data)
            q.read(ns, 100, back)
            assert np.array_equal(back, data)
        finally:
            ctrl.close()
        assert sim.io_commands == 4  # 2 writes, 2 reads
        assert k.open_kinds() == [] and k.pinned == 0
