"""A kernel wrapper that counts the system calls made through uvdma's seam, by name."""

from __future__ import annotations

from typing import Any

from uvdma._sys import Kernel, Register


class CountingKernel:
    """Delegates every call to ``inner`` and counts it in ``calls``."""

    def __init__(self, inner: Kernel) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def total(self) -> int:
        """Every call so far."""
        return sum(self.calls.values())

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def open(self, path: str, flags: int) -> int:
        self._count("open")
        return self.inner.open(path, flags)

    def close(self, fd: int) -> None:
        self._count("close")
        return self.inner.close(fd)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        self._count("ioctl")
        return self.inner.ioctl(fd, request, arg)

    def mmap(self, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        self._count("mmap")
        return self.inner.mmap(length, prot, flags, fd, offset)

    def munmap(self, addr: int, length: int) -> None:
        self._count("munmap")
        return self.inner.munmap(addr, length)

    def mmap_fixed(
        self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int
    ) -> int:
        self._count("mmap_fixed")
        return self.inner.mmap_fixed(addr, length, prot, flags, fd, offset)

    def dup2(self, fd: int, fd2: int) -> None:
        self._count("dup2")
        return self.inner.dup2(fd, fd2)

    def memfd_create(self, name: str, flags: int) -> int:
        self._count("memfd_create")
        return self.inner.memfd_create(name, flags)

    def ftruncate(self, fd: int, length: int) -> None:
        self._count("ftruncate")
        return self.inner.ftruncate(fd, length)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self._count("pread")
        return self.inner.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._count("pwrite")
        return self.inner.pwrite(fd, data, offset)

    def eventfd(self, initval: int, flags: int) -> int:
        self._count("eventfd")
        return self.inner.eventfd(initval, flags)

    def read(self, fd: int, size: int) -> bytes:
        self._count("read")
        return self.inner.read(fd, size)

    def wait_readable(self, fd: int, timeout: float) -> bool:
        self._count("wait_readable")
        return self.inner.wait_readable(fd, timeout)

    def mlock(self, addr: int, length: int) -> None:
        self._count("mlock")
        return self.inner.mlock(addr, length)

    def munlock(self, addr: int, length: int) -> None:
        self._count("munlock")
        return self.inner.munlock(addr, length)

    def memlock_limit(self) -> int:
        self._count("memlock_limit")
        return self.inner.memlock_limit()

    def pagemap_entry(self, vaddr: int) -> int:
        self._count("pagemap_entry")
        return self.inner.pagemap_entry(vaddr)

    def mmio32(self, addr: int) -> Register:
        return self.inner.mmio32(addr)  # a load or store, not a system call: not counted

    def mmio64(self, addr: int) -> Register:
        return self.inner.mmio64(addr)
