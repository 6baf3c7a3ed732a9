"""Interrupts that never leave a VM or a half-built kernel behind.

SIGINT already raises KeyboardInterrupt; :func:`signals_as_interrupts` makes SIGTERM and
SIGHUP do the same (as :class:`Interrupted`) so ``finally`` clauses run when a CI job or
``timeout`` ends the command.  :func:`interrupts_deferred` holds all three back during a
critical section (starting a child that must be killed, removing files) and raises once
it is over.  Both act only in the main thread, where Python runs signal handlers; the
handlers are Python functions, so children start with the default dispositions (exec
resets them) and an unchanged signal mask.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The command was interrupted by a signal (``signum``): Ctrl-C, SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def _raise(signum: int, frame: FrameType | None) -> None:
    # One interrupt is enough: a second signal (``timeout`` forwarding the SIGTERM its process
    # group also got, a second Ctrl-C) must not cut short the clean-up the first one started
    # (checked: a group SIGTERM to `timeout uvdma vm run` left QEMU running without this).
    for s in SIGNALS:
        if signal.getsignal(s) is _raise:
            signal.signal(s, _already_interrupted)
    raise Interrupted(signum)


def _already_interrupted(signum: int, frame: FrameType | None) -> None:
    pass  # the first signal's Interrupted is already on its way


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` unless the
    program handles or ignores them itself."""
    if not _in_main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in old.items():
        if handler in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:
                signal.signal(s, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back within the block; if one came, raise
    :class:`Interrupted` for it when the block is over (after its clean-up ran)."""
    if not _in_main_thread():
        yield
        return
    got: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    old = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in old.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, note)
    try:
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:
                signal.signal(s, handler)
    if got:
        raise Interrupted(got[0])
