"""The syscall seam: every open, ioctl, mmap, memfd, eventfd and pagemap read goes here.

So does every access to a device register (:meth:`Kernel.mmio32`): on Linux a plain load or
store in the mmap'd BAR, behind a fake kernel a trap into a device model.

:func:`kernel` returns the object that performs them; :func:`use_kernel` swaps in a
stand-in (a fake kernel in the unit tests, a counting wrapper to prove that a path
makes no system call).  Calls raise :class:`OSError` with the kernel's errno; the
layers above turn that into a :class:`~uvdma.errors.UvdmaOSError` naming the fix.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap as _mmap
import os
import resource
import select
import threading
from collections.abc import Iterator
from typing import Any, Protocol

PAGE_SIZE = _mmap.PAGESIZE
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10  # linux/mman.h
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_FAILED = ctypes.c_void_p(-1).value

IoctlArg = Any  # a ctypes object passed by reference, a ctypes buffer, or an int


class Register(Protocol):
    """One device register: reading ``value`` is one load of its width, assigning it one store.

    On Linux a ``ctypes.c_uint32``/``c_uint64`` at the mmap'd address; behind a fake kernel, an
    object that hands each access to a device model as it happens.
    """

    value: int


class Kernel(Protocol):
    """The system calls uvdma makes; a stand-in must have the same signatures."""

    def open(self, path: str, flags: int) -> int: ...
    def close(self, fd: int) -> None: ...
    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int: ...
    def mmap(self, length: int, prot: int, flags: int, fd: int, offset: int) -> int: ...
    def munmap(self, addr: int, length: int) -> None: ...
    def mmap_fixed(
        self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int
    ) -> int: ...
    def dup2(self, fd: int, fd2: int) -> None: ...
    def memfd_create(self, name: str, flags: int) -> int: ...
    def ftruncate(self, fd: int, length: int) -> None: ...
    def pread(self, fd: int, size: int, offset: int) -> bytes: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...
    def eventfd(self, initval: int, flags: int) -> int: ...
    def read(self, fd: int, size: int) -> bytes: ...
    def wait_readable(self, fd: int, timeout: float) -> bool: ...
    def mlock(self, addr: int, length: int) -> None: ...
    def munlock(self, addr: int, length: int) -> None: ...
    def memlock_limit(self) -> int: ...
    def pagemap_entry(self, vaddr: int) -> int: ...
    def mmio32(self, addr: int) -> Register: ...
    def mmio64(self, addr: int) -> Register: ...


# A memoryview over the user address space (x86-64: below 2**47, where Linux puts every
# mapping unless asked otherwise).  Slice assignment into it is memset/memmove in C
# without ctypes' per-call argument conversion: ~280 ns for 4 KiB here, against ~680 ns
# for ctypes.memset.  Touching an address that is not mapped faults, exactly as memset
# through a pointer would; callers pass only memory they own.
WINDOW_BASE = 1 << 12
WINDOW_END = 1 << 47
RAW = memoryview((ctypes.c_char * (WINDOW_END - WINDOW_BASE)).from_address(WINDOW_BASE)).cast("B")
ZEROS = memoryview(bytes(2 << 20))


def zero(addr: int, size: int) -> None:
    """memset(addr, 0, size) for memory this process owns."""
    if addr >= WINDOW_BASE and addr + size <= WINDOW_END and size <= len(ZEROS):
        o = addr - WINDOW_BASE
        RAW[o : o + size] = ZEROS[:size]
    else:
        ctypes.memset(addr, 0, size)


def fill(addr: int, byte: int, size: int) -> None:
    """memset(addr, byte, size) for memory this process owns."""
    ctypes.memset(addr, byte, size)


def copy(dst: int, src: int, size: int) -> None:
    """memmove(dst, src, size) between memory this process owns."""
    if min(dst, src) >= WINDOW_BASE and max(dst, src) + size <= WINDOW_END:
        d, s_ = dst - WINDOW_BASE, src - WINDOW_BASE
        RAW[d : d + size] = RAW[s_ : s_ + size]
    else:
        ctypes.memmove(dst, src, size)


def _check(rc: int, what: str) -> int:
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


class LinuxKernel:
    """The real thing: libc through ctypes (``use_errno=True``) and the os module."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._ioctl = libc.ioctl
        self._ioctl.restype = ctypes.c_int
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self._munmap = libc.munmap
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._mlock = libc.mlock
        self._mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._munlock = libc.munlock
        self._munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        # fcntl.ioctl returns the buffer, not the result: VFIO_GROUP_GET_DEVICE_FD
        # returns an fd, so libc's ioctl it is.
        if isinstance(arg, int):
            c_arg: Any = ctypes.c_ulong(arg)
        elif isinstance(arg, ctypes.Array):
            c_arg = arg
        else:
            c_arg = ctypes.byref(arg)
        return _check(self._ioctl(fd, ctypes.c_ulong(request), c_arg), f"ioctl {request:#x}")

    def mmap(self, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        addr = self._mmap(None, length, prot, flags, fd, offset)
        if addr is None or addr == MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {length} bytes: {os.strerror(err)}")
        return int(addr)

    def munmap(self, addr: int, length: int) -> None:
        _check(self._munmap(addr, length), "munmap")

    def mmap_fixed(
        self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int
    ) -> int:
        """mmap with MAP_FIXED at ``addr``: replaces whatever was mapped there in one step
        (there is never a moment with nothing mapped)."""
        got = self._mmap(addr, length, prot, flags | MAP_FIXED, fd, offset)
        if got is None or got == MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap (MAP_FIXED) of {length} bytes: {os.strerror(err)}")
        return int(got)

    def dup2(self, fd: int, fd2: int) -> None:
        os.dup2(fd, fd2, inheritable=False)

    def memfd_create(self, name: str, flags: int) -> int:
        return os.memfd_create(name, flags | os.MFD_CLOEXEC)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def eventfd(self, initval: int, flags: int) -> int:
        return os.eventfd(initval, flags | os.EFD_CLOEXEC)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def wait_readable(self, fd: int, timeout: float) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def mlock(self, addr: int, length: int) -> None:
        _check(self._mlock(addr, length), "mlock")

    def munlock(self, addr: int, length: int) -> None:
        _check(self._munlock(addr, length), "munlock")

    def memlock_limit(self) -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return soft

    def pagemap_entry(self, vaddr: int) -> int:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, 8, (vaddr // PAGE_SIZE) * 8)
        finally:
            os.close(fd)
        return int.from_bytes(data, "little")

    def mmio32(self, addr: int) -> Register:
        """The 32-bit register at ``addr`` in an mmap'd BAR: no system call, one load or store."""
        return ctypes.c_uint32.from_address(addr)

    def mmio64(self, addr: int) -> Register:
        """The 64-bit register at ``addr`` in an mmap'd BAR."""
        return ctypes.c_uint64.from_address(addr)


class _Current:
    """Holds the kernel in use; swapped only by :func:`use_kernel`."""

    lock = threading.Lock()
    kernel: Kernel = LinuxKernel()


def kernel() -> Kernel:
    """The kernel uvdma talks to (the real one unless a test swapped it)."""
    return _Current.kernel


def retire_mapping(addr: int, size: int) -> None:
    """Unmap ``[addr, addr + size)`` by putting inert anonymous memory in its place (MAP_FIXED
    replaces it in one step), so a stale pointer or numpy view into it reads zeros instead of
    killing the process with SIGSEGV.  The address range stays taken; no memory is used until
    a stale view writes (MAP_NORESERVE), and neighbouring retired ranges merge into one VMA.
    Falls back to munmap if the kernel refuses (never seen)."""
    k = kernel()
    try:
        k.mmap_fixed(
            addr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0
        )
    except OSError:
        k.munmap(addr, size)


@contextlib.contextmanager
def use_kernel(k: Kernel) -> Iterator[Kernel]:
    """Route every system call through ``k`` inside the ``with`` block."""
    with _Current.lock:
        previous, _Current.kernel = _Current.kernel, k
    try:
        yield k
    finally:
        with _Current.lock:
            _Current.kernel = previous
