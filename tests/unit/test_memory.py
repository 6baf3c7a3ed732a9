"""Hugepage memory and the IOVA space: fallbacks, warnings, zones, limits, bad input.

The fake kernel stands in for hugetlb reservations; that the guest's real hugepages
back DMA is shown in tests/vm/test_vfio.py.
"""

from __future__ import annotations

import errno
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvdma import _sys
from uvdma.errors import (
    HugepagesUnavailableError,
    IovaError,
    IovaExhaustedError,
    MemoryShortError,
    UvdmaOSError,
)
from uvdma.memory import hugepages as hp
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.vfio.iova import MSI_WINDOW, IovaSpace

MiB = 1 << 20
GiB = 1 << 30
RANGES = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    monkeypatch.setattr(hp, "_warned", set())
    k = FakeKernel()
    with _sys.use_kernel(k):
        yield k


def test_2m_pages_when_free(fake: FakeKernel) -> None:
    with hp.allocate(3 * MiB) as mem:
        assert (mem.page_size, mem.size, mem.source) == (hp.PAGE_2M, 4 * MiB, "memfd 2M")
        assert fake.free_hugepages[hp.PAGE_2M] == 14
    assert fake.free_hugepages[hp.PAGE_2M] == 16  # given back on close
    assert fake.open_kinds() == []


def test_1g_first_for_big_allocations_then_2m(fake: FakeKernel) -> None:
    fake.free_hugepages[hp.PAGE_2M] = 1024
    with hp.allocate(GiB) as mem:
        assert mem.page_size == hp.PAGE_2M  # no 1G page free: fell back
    fake.free_hugepages[hp.PAGE_1G] = 1
    with hp.allocate(GiB) as mem:
        assert mem.page_size == hp.PAGE_1G


def test_4k_fallback_warns_once_and_names_the_fix(fake: FakeKernel) -> None:
    fake.free_hugepages[hp.PAGE_2M] = 0
    with pytest.warns(RuntimeWarning, match=r"uvdma hugepages --count 64"):
        mem = hp.allocate(64 * 1024)
    assert (mem.page_size, mem.source) == (hp.PAGE_4K, "memfd 4K")
    assert fake.mlocked == 64 * 1024  # locked resident
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp.allocate(4096).close()  # no second warning
    mem.close()


def test_no_fallback_means_a_clear_error_and_nothing_left_open(fake: FakeKernel) -> None:
    fake.free_hugepages[hp.PAGE_2M] = 0
    with pytest.raises(HugepagesUnavailableError, match=r"--size 2M --count N"):
        hp.allocate(MiB, hp.PAGE_2M, fallback=False)
    assert fake.open_kinds() == []


def test_low_memlock_for_4k_memory_names_the_fix(fake: FakeKernel) -> None:
    fake.free_hugepages[hp.PAGE_2M] = 0
    fake.privileged = False
    fake.memlock = 64 * 1024
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(UvdmaOSError, match=r"RLIMIT_MEMLOCK is 65536"),
    ):
        hp.allocate(MiB)
    assert fake.open_kinds() == []


def test_bad_sizes(fake: FakeKernel) -> None:
    with pytest.raises(ValueError, match="positive"):
        hp.allocate(0)
    with pytest.raises(ValueError, match="4K, 2M or 1G"):
        hp.allocate(MiB, 3 * MiB)


def test_physical_address_needs_root(fake: FakeKernel) -> None:
    assert hp.physical_address(0x7000_0000_1234) == (0x1 << 12 | 0x234) + 0
    fake.privileged = False
    with pytest.raises(UvdmaOSError, match="needs root"):
        hp.physical_address(0x7000_0000_1234)


def test_size_names() -> None:
    assert [hp.size_name(s) for s in (4096, 2 * MiB, GiB, 100)] == ["4K", "2M", "1G", "100B"]


# -- the IOVA space ---------------------------------------------------------------------


DMA = (0, (1 << 24) - 1)
DMA32 = (1 << 24, (1 << 32) - 1)
HIGH = (1 << 32, (1 << 64) - 1)


def test_an_iova_is_chosen_inside_the_window_asked_for() -> None:
    s = IovaSpace(RANGES)
    low = s.alloc(MiB, MiB, [DMA])
    mid = s.alloc(MiB, MiB, [DMA32])
    high = s.alloc(MiB, MiB, [HIGH])
    assert low > 0 and low + MiB <= 1 << 24
    assert mid >= 1 << 24 and mid + MiB <= 1 << 32
    assert high >= 1 << 32
    # an odd upper bound (a 36-bit mask): the range ends at or below it, in one choice
    odd = s.alloc(2 * MiB, MiB, [(1 << 32, (1 << 36) - 1)])
    assert odd >= 1 << 32 and odd + 2 * MiB - 1 <= (1 << 36) - 1


def test_page_zero_and_the_msi_window_are_never_handed_out() -> None:
    s = IovaSpace([(0, (1 << 32) - 1)])  # a kernel that did not report the MSI hole
    assert s.ranges[0][0] == 4096
    got = [s.alloc(MiB, MiB, [DMA32]) for _ in range(4000)]
    for iova in got:
        assert iova + MiB <= MSI_WINDOW[0] or iova > MSI_WINDOW[1]


def test_windows_are_tried_in_order_and_bounds_hold() -> None:
    s = IovaSpace([(0, (1 << 32) - 1)])  # nothing above 4 GiB
    assert s.alloc(MiB, windows=[HIGH, DMA32]) < 1 << 32  # the first had no room
    small = IovaSpace([(0x10_0000, 0x1FF_FFFF)])  # 1-32 MiB only
    with pytest.raises(IovaExhaustedError, match=r"in \[0x0, 0xffffff\]"):
        small.alloc(16 * MiB, windows=[DMA])
    iova = small.alloc(MiB, windows=[(1 << 24, (1 << 25) - 1)])
    assert iova + MiB - 1 <= (1 << 25) - 1


def test_exhaustion_then_reuse_after_free() -> None:
    s = IovaSpace([(0, (1 << 24) - 1)])
    blocks = [s.alloc(2 * MiB, 2 * MiB, [DMA]) for _ in range(7)]
    with pytest.raises(IovaExhaustedError, match=r"unmap memory you no longer need"):
        s.alloc(2 * MiB, 2 * MiB, [DMA])
    s.free(blocks[3], 2 * MiB)
    assert s.alloc(2 * MiB, 2 * MiB, [DMA]) == blocks[3]


def test_bad_frees_and_reservations() -> None:
    s = IovaSpace(RANGES)
    a = s.alloc(MiB)
    with pytest.raises(IovaError, match="not given out"):
        s.free(a, 2 * MiB)
    s.free(a, MiB)
    with pytest.raises(IovaError, match="not given out"):
        s.free(a, MiB)
    s.reserve(0x4000_0000, MiB)
    with pytest.raises(IovaError, match="not free"):
        s.reserve(0x4000_0000 + 4096, 4096)
    with pytest.raises(IovaError, match="not free"):
        s.reserve(0xFEE0_0000, 4096)
    with pytest.raises(IovaError, match="power of two"):
        s.alloc(4096, 3000)


def test_memory_closes_idempotently(fake: FakeKernel) -> None:
    mem = hp.allocate(MiB)
    mem.close()
    mem.close()  # idempotent
    assert fake.open_kinds() == []


def test_hugetlbfs_is_the_second_choice(
    fake: FakeKernel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mount = tmp_path / "hugepages-2M"
    mount.mkdir()
    fake.hugetlbfs[str(mount)] = hp.PAGE_2M
    monkeypatch.setattr(hp, "_hugetlbfs_mount", lambda size: mount if size == hp.PAGE_2M else None)
    with hp.allocate(MiB) as mem:
        assert (mem.page_size, mem.source) == (hp.PAGE_2M, f"hugetlbfs {mount}")
        assert fake.free_hugepages[hp.PAGE_2M] == 15
    assert fake.open_kinds() == []


def test_hugetlbfs_mounts_are_read_from_proc_mounts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        f"proc /proc proc rw 0 0\nhugetlbfs {tmp_path} hugetlbfs rw,relatime,pagesize=1G 0 0\n"
    )

    def fake_path(p: str) -> Path:
        return mounts if p == "/proc/mounts" else Path(p)

    monkeypatch.setattr("uvdma.memory.hugepages.Path", fake_path)
    assert hp._hugetlbfs_mount(hp.PAGE_1G) == tmp_path
    assert hp._hugetlbfs_mount(hp.PAGE_2M) is None


# -- what an allocation may take -------------------------------------------------------------


def status(**kw: int | bool) -> hp.MemoryStatus:
    fields: dict[str, int | bool] = {
        "total": 2 * GiB,
        "available": 1600 * MiB,
        "locked": 0,
        "lock_limit": -1,
        "may_lock_all": True,
    }
    fields.update(kw)
    return hp.MemoryStatus(**fields)  # type: ignore[arg-type]


def test_1g_pages_are_used_before_4k_pages_for_small_allocations(fake: FakeKernel) -> None:
    fake.free_hugepages = {hp.PAGE_2M: 0, hp.PAGE_1G: 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall back to 4 KiB pages, so no warning
        mem = hp.allocate(2 * MiB)
    assert (mem.page_size, mem.size, mem.source) == (hp.PAGE_1G, GiB, "memfd 1G")
    mem.close()
    assert fake.free_hugepages[hp.PAGE_1G] == 1


def test_more_4k_memory_than_the_machine_has_is_refused_before_it_is_made(
    fake: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.free_hugepages[hp.PAGE_2M] = 0
    monkeypatch.setattr(hp, "memory_status", status)
    with pytest.warns(RuntimeWarning), pytest.raises(MemoryShortError) as info:
        hp.allocate(3 * GiB)
    assert "1677721600 bytes available" in str(info.value)
    assert "uvdma hugepages" in str(info.value)
    assert isinstance(info.value, MemoryError)
    assert fake.mlocked == 0 and fake.open_kinds() == []
    mem = hp.allocate(64 * MiB)  # what fits still works
    mem.close()


def test_rlimit_memlock_is_checked_before_memory_is_made_and_says_what_is_locked(
    fake: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.free_hugepages[hp.PAGE_2M] = 0
    st = status(lock_limit=64 * MiB, locked=60 * MiB, may_lock_all=False)
    monkeypatch.setattr(hp, "memory_status", lambda: st)
    with pytest.warns(RuntimeWarning), pytest.raises(UvdmaOSError) as info:
        hp.allocate(8 * MiB)
    assert info.value.errno == errno.ENOMEM
    assert (
        "RLIMIT_MEMLOCK is 67108864 bytes and this process has already locked 62914560 bytes"
        in str(info.value)
    )
    assert "VFIO has pinned" in str(info.value) and "ulimit -l" in str(info.value)
    assert fake.calls.count("munmap") == 0 and fake.open_kinds() == []  # nothing was made
    assert st.lockable() == 4 * MiB
    assert status(lock_limit=-1, may_lock_all=False).lockable() is None
    assert status(lock_limit=MiB).lockable() is None  # CAP_IPC_LOCK: no limit


def test_memory_status_reads_meminfo_vmlck_and_cap_ipc_lock(
    tmp_path: Path, fake: FakeKernel
) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text(
        "MemTotal:        2012064 kB\nMemFree:         1794896 kB\nMemAvailable:    1732292 kB\n"
    )
    (tmp_path / "self/status").write_text(
        "Name:\tpython3\nVmLck:\t    2048 kB\nCapEff:\t0000000000004000\n"
    )
    fake.memlock = 8 * MiB
    st = hp.memory_status(tmp_path)
    assert st == hp.MemoryStatus(2012064 * 1024, 1732292 * 1024, 2 * MiB, 8 * MiB, True)
    (tmp_path / "self/status").write_text("VmLck:\t0 kB\nCapEff:\t0000000000000000\n")
    assert not hp.memory_status(tmp_path).may_lock_all


def test_fits_says_whether_an_iova_range_could_be_had_without_taking_it() -> None:
    space = IovaSpace(RANGES)
    free = space.free_bytes()
    assert space.fits(2 * MiB, 2 * MiB, [DMA])
    assert not space.fits(5 * GiB, 4096, [DMA32])  # larger than the window
    assert space.fits(5 * GiB, 4096, [HIGH])
    assert not space.fits(0) and not space.fits(4096, 3)
    assert space.free_bytes() == free  # nothing taken


def test_lock_limited_is_worked_out_once_per_process(
    tmp_path: Path, fake: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hp, "_lock_limited", {})
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("MemTotal: 2048 kB\nMemAvailable: 1024 kB\n")
    (tmp_path / "self/status").write_text("VmLck:\t0 kB\nCapEff:\t0000000000000000\n")
    fake.memlock = 8 * MiB
    assert hp.lock_limited(tmp_path)
    (tmp_path / "self/status").write_text("VmLck:\t0 kB\nCapEff:\t0000000000004000\n")
    assert hp.lock_limited(tmp_path)  # cached: no /proc read on the mapping paths
    monkeypatch.setattr(hp, "_lock_limited", {})
    assert not hp.lock_limited(tmp_path)  # CAP_IPC_LOCK: the limit does not apply
