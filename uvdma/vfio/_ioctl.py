"""Written once (STYLE 3): the argsz grow-and-retry, and errno -> errors that name the fix,
for an ioctl (:func:`call`) and for opening a device node (:func:`open_node`)."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Mapping
from typing import TypeAlias, TypeVar

from uvdma import _sys
from uvdma.errors import UvdmaOSError

S = TypeVar("S", bound=ctypes.Structure)


Fix: TypeAlias = "str | Callable[[], str]"  # a message, or what makes it when it is needed


def call(fd: int, request: int, arg: _sys.IoctlArg, what: str, fixes: Mapping[int, Fix]) -> int:
    """ioctl that raises :class:`UvdmaOSError` naming ``what`` and, by errno, the fix
    (a callable fix is called only then: it may read /proc)."""
    try:
        return _sys.kernel().ioctl(fd, request, arg)
    except OSError as e:
        err = e.errno or errno.EIO
        fix = fixes.get(err, "")
        text = fix() if callable(fix) else fix
        raise UvdmaOSError(err, f"{what}{': ' + text if text else ''}") from e


def open_node(path: str, what: str, fixes: Mapping[int, Fix]) -> int:
    """Open ``path`` read-write, or raise :class:`UvdmaOSError` naming ``what`` and, by errno,
    the fix (``cannot open PATH`` when ``fixes`` has none for that errno)."""
    try:
        return _sys.kernel().open(path, os.O_RDWR)
    except OSError as e:
        err = e.errno or errno.EIO
        fix = fixes.get(err, f"cannot open {path}")
        raise UvdmaOSError(err, f"{what}: {fix() if callable(fix) else fix}") from e


def info(
    fd: int,
    request: int,
    struct: type[S],
    what: str,
    setup: Callable[[S], None] = lambda _s: None,
    fixes: dict[int, str] | None = None,
) -> tuple[ctypes.Array[ctypes.c_char], S]:
    """An ``argsz`` info ioctl: if the kernel asks for a bigger buffer (capabilities
    follow the struct), grow to the ``argsz`` it wrote back and ask again.

    Returns the whole buffer (for :func:`uvdma._uapi.walk_caps`) and the struct at its start.
    """
    size = ctypes.sizeof(struct)
    for _ in range(8):
        buf = ctypes.create_string_buffer(size)
        s = struct.from_buffer(buf)
        s.argsz = size
        setup(s)
        call(fd, request, buf, what, fixes or {})
        want: int = s.argsz
        if want <= size:
            return buf, s
        size = want
    raise UvdmaOSError(errno.EOVERFLOW, f"{what}: the kernel kept asking for a larger buffer")
