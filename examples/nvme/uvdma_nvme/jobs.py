"""More than one core: worker processes forked after bring-up, each driving its own queues.

Python runs one thread at a time per process, so a second core needs a second process.
The parent brings the controller up, creates one I/O queue pair per worker and allocates
every piece of DMA memory the workers will use (their buffers, and every request's PRP list
page: :meth:`QueuePair.reserve_prp_lists`), then forks.  What the child inherits is what it
needs, and it is shared rather than copied:

- the VFIO device, group and container file descriptors (one open file each, shared);
- BAR0, mapped ``MAP_SHARED`` from the device fd (vfio-pci faults it in again in the
  child);
- the DMA memory: hugepage or 4 KiB memfd mappings, ``MAP_SHARED``, already pinned and
  mapped in the IOMMU by the parent's container, so the device and both processes see the
  same pages (private memory would be copied on write: the device would never see the
  child's queue entries);
- the MSI-X eventfds, one vector per queue.

The rules that keep it safe: a worker touches only its own queues (no lock and no traffic
between processes on the hot path); it never allocates or maps DMA memory (the IOVA
allocator's state is the parent's: an IOVA chosen in the child could collide); admin
commands, aborts and resets are the parent's alone (a worker's timeout raises and leaves
the command outstanding, its memory kept); a worker ends with ``os._exit`` (never the
controller's close() or interpreter teardown).  The parent waits for every worker before it
closes the controller; a worker killed with SIGKILL takes nothing else down (its commands
finish into memory the parent still holds; close() disables the controller before freeing
it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from uvdma_nvme.controller import Controller
from uvdma_nvme.queue import QueuePair

Work = Callable[[int, QueuePair], dict[str, Any]]


@dataclass
class JobResult:
    """What one worker process did: its result (what ``work`` returned), or why not."""

    job: int
    pid: int
    result: dict[str, Any] | None = None
    error: str | None = None
    exit_code: int | None = None  # None: killed by a signal
    signal: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the worker finished its work and exited 0."""
        return self.exit_code == 0 and self.result is not None


def run_jobs(
    ctrl: Controller,
    queues: Sequence[QueuePair],
    work: Work,
    *,
    max_bytes: int,
    tick: Callable[[], None] | None = None,
    grace: float | None = None,
) -> list[JobResult]:
    """Fork one worker per queue; worker ``i`` runs ``work(i, queues[i])`` and its return
    value (JSON-able) comes back in :attr:`JobResult.result`.  ``max_bytes``: the largest
    transfer a worker submits (its PRP list pages are taken now).  ``tick`` runs in the
    parent about once a second while workers run (progress).  Returns when every worker
    has ended; a Ctrl-C in the parent waits for them too (they get the same SIGINT), and
    after ``grace`` seconds (2 command timeouts by default) kills what is left."""
    for q in queues:
        q.reserve_prp_lists(max_bytes)
    sys.stdout.flush()
    sys.stderr.flush()
    running: dict[int, tuple[int, int]] = {}  # pid -> (job, read end of its pipe)
    results: list[JobResult] = []
    try:
        for i, q in enumerate(queues):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                os.close(r)
                _worker(ctrl, i, q, work, w)  # never returns
            os.close(w)
            ctrl.hand_over([q], f"worker process {pid} (job {i})")
            running[pid] = (i, r)
    finally:
        results = _wait_all(running, tick, grace if grace is not None else 2 * ctrl.command_timeout)
    return sorted(results, key=lambda j: j.job)


def _worker(ctrl: Controller, job: int, q: QueuePair, work: Work, fd: int) -> None:
    """The child's whole life: drive ``q``, report, ``os._exit`` (no teardown runs here:
    the device, the memory and their close() are the parent's)."""
    code = 1
    try:
        ctrl.become_worker(f"worker process {os.getpid()} (job {job})", [q])
        out: dict[str, Any] = {"result": work(job, q)}
        code = 0
    except KeyboardInterrupt:
        out = {"error": "interrupted"}
        code = 130
    except BaseException as e:  # reported to the parent, which decides
        out = {"error": f"{type(e).__name__}: {e}"}
        if not isinstance(e, Exception):
            out["traceback"] = traceback.format_exc()
    try:
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(fd, data) :]
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _wait_all(
    running: dict[int, tuple[int, int]], tick: Callable[[], None] | None, grace: float
) -> list[JobResult]:
    out: list[JobResult] = []
    buffers: dict[int, bytearray] = {pid: bytearray() for pid in running}
    interrupted_at: float | None = None
    last_tick = time.monotonic()
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                _drain_pipes(running, buffers)
                time.sleep(0.02)
                if tick is not None and time.monotonic() - last_tick >= 1.0:
                    last_tick = time.monotonic()
                    tick()
                if interrupted_at is not None and time.monotonic() - interrupted_at > grace:
                    for p in running:  # they did not stop: the device may not wait longer
                        os.kill(p, signal.SIGKILL)
                    interrupted_at = float("inf")
                continue
        except KeyboardInterrupt:
            if interrupted_at is None:
                interrupted_at = time.monotonic()
            continue
        except ChildProcessError:
            break
        if pid not in running:
            continue
        job, fd = running.pop(pid)
        buf = buffers.pop(pid)
        buf += _read_all(fd)
        os.close(fd)
        res = JobResult(job, pid)
        if os.WIFSIGNALED(status):
            res.signal = os.WTERMSIG(status)
            res.error = f"killed by signal {res.signal} ({signal.Signals(res.signal).name})"
        else:
            res.exit_code = os.WEXITSTATUS(status)
        if buf:
            try:
                msg = json.loads(buf)
            except ValueError:
                msg = {"error": "its report was cut short"}
            res.result = msg.get("result")
            res.error = msg.get("error", res.error)
            if "traceback" in msg:
                res.extra["traceback"] = msg["traceback"]
        elif res.error is None:
            res.error = f"exited with {res.exit_code} without a report"
        out.append(res)
    return out


def _drain_pipes(running: dict[int, tuple[int, int]], buffers: dict[int, bytearray]) -> None:
    """Read what workers wrote so far (a report longer than the pipe holds must not block
    its writer)."""
    for pid, (_job, fd) in running.items():
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 65536):
                buffers[pid] += chunk
        except BlockingIOError:
            pass


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
