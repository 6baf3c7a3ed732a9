"""uvdma's guest kernel: ``uvdma vm kernel``.

Debian's kernel images have no iommufd, no VFIO cdev and no VFIO no-IOMMU mode; Debian's
kernel source has all three.  This builds ``bzImage`` from the ``linux-source-6.12``
package: ``make x86_64_defconfig``, the fragment ``guest-kernel.config`` beside this
module merged on top, ``make olddefconfig``, a check that every option of the fragment
survived, then ``make bzImage``.  The result is cached under
``$XDG_CACHE_HOME/uvdma/kernel`` (``~/.cache/uvdma/kernel``) in a directory named after
the source package's version and the fragment's hash, so a new source version or a
changed fragment builds anew and nothing else does.

The build installs what it needs with apt (as root, only what is missing), runs
``make`` at the lowest CPU priority, shows a progress line (one line every so often when
the output is not a terminal) and keeps a full log.  It holds a lock (``fcntl.flock``) on
the cache, so concurrent runs build once: the others wait and then use the result.  A
failed or interrupted build leaves nothing half-made behind except its log, and says
which step failed and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, TextIO

from uvdma.errors import KernelBuildError
from uvdma.vm._signals import interrupts_deferred, signals_as_interrupts


@dataclass(frozen=True)
class KernelSource:
    """Where the guest kernel comes from and what building it needs."""

    package: str = "linux-source-6.12"
    tarball: Path = Path("/usr/src/linux-source-6.12.tar.xz")
    #: apt packages; build-essential brings gcc, make and libc6-dev on a bare machine.
    build_packages: tuple[str, ...] = (
        "linux-source-6.12",
        "build-essential",
        "flex",
        "bison",
        "libelf-dev",
        "bc",
        "libssl-dev",
    )
    defconfig: str = "x86_64_defconfig"
    image: str = "arch/x86/boot/bzImage"


SOURCE = KernelSource()
#: Free space the build needs in the cache: the unpacked tree (1.5 GB) and its objects.
SPACE_NEEDED = 3 << 30
#: Compiler and linker steps a build prints (a build of 6.12.117 printed this many);
#: only for the progress line's percentage.
EXPECTED_STEPS = 3000
#: Wall time of a build on 2 idle cores (1,620 CPU-seconds measured), for the messages.
BUILD_MINUTES = 15
#: Seconds between progress lines when the output is not a terminal.
PROGRESS_EVERY = 60.0
#: Wait for another apt or dpkg (tools/setup.sh, unattended-upgrades) instead of failing.
_APT_WAIT = ("-o", "DPkg::Lock::Timeout=600")
_STEP_RE = re.compile(rb"^\s+(CC|AS|LD|AR|HOSTCC|HOSTLD|GEN|OBJCOPY|VDSO|RELOCS)\b")
_FRAGMENT_LINE_RE = re.compile(r"^(?:(CONFIG_\w+)=(.*)|# (CONFIG_\w+) is not set)$")


def fragment_text() -> str:
    """The config fragment kept in the repository (``uvdma/vm/guest-kernel.config``)."""
    return (resources.files("uvdma.vm") / "guest-kernel.config").read_text()


def fragment_options(text: str) -> dict[str, str]:
    """``{"CONFIG_X": "y" | "n" | value}`` from a fragment or a .config."""
    options = {}
    for line in text.splitlines():
        m = _FRAGMENT_LINE_RE.match(line.strip())
        if m:
            if m.group(3):
                options[m.group(3)] = "n"
            else:
                options[m.group(1)] = m.group(2)
    return options


def merge_config(base: str, fragment: str) -> str:
    """``base`` (a .config) with every option of ``fragment`` set as the fragment says,
    as scripts/kconfig/merge_config.sh does; ``make olddefconfig`` settles the rest."""
    wanted = fragment_options(fragment)
    lines = []
    for line in base.splitlines():
        m = _FRAGMENT_LINE_RE.match(line.strip())
        name = m and (m.group(1) or m.group(3))
        if not name or name not in wanted:
            lines.append(line)
    for name, value in wanted.items():
        lines.append(f"# {name} is not set" if value == "n" else f"{name}={value}")
    return "\n".join(lines) + "\n"


def config_mismatches(config: str, fragment: str) -> list[str]:
    """The options of ``fragment`` that the final .config does not have as asked."""
    have = fragment_options(config)
    bad = []
    for name, want in fragment_options(fragment).items():
        got = have.get(name, "n")
        if got != want:
            bad.append(f"{name}={want} (the config has {'not set' if got == 'n' else got})")
    return bad


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/uvdma/kernel``, by default ``~/.cache/uvdma/kernel``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "uvdma" / "kernel"


def fragment_hash(text: str | None = None) -> str:
    """The first 12 hex digits of the fragment's SHA-256: part of the cache key."""
    return hashlib.sha256((text if text is not None else fragment_text()).encode()).hexdigest()[:12]


def installed_version(package: str) -> str | None:
    """The installed version of a Debian package, or None."""
    try:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    status, _, version = r.stdout.partition("\t")
    return version if r.returncode == 0 and status.endswith(" installed") and version else None


def missing_packages(packages: Sequence[str]) -> list[str]:
    """Those of ``packages`` that are not installed."""
    return [p for p in packages if installed_version(p) is None]


def cache_key(version: str, fhash: str) -> str:
    """The cache directory's name for a source version and a fragment hash."""
    return f"linux-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}-{fhash}"


def cached_kernel(root: Path | None = None) -> Path | None:
    """The built kernel for the installed source and the current fragment, or None.

    With the source package removed, the newest build of the current fragment serves.
    """
    root = root or cache_root()
    fhash = fragment_hash()
    version = installed_version(SOURCE.package)
    if version is not None:
        image = root / cache_key(version, fhash) / "bzImage"
        return image if image.is_file() else None
    builds = sorted(root.glob(f"linux-*-{fhash}/bzImage"), key=lambda p: p.stat().st_mtime)
    return builds[-1] if builds else None


def ensure_built(progress: TextIO | None = None) -> Path:
    """The guest kernel's bzImage, built first if it is missing (see :data:`BUILD_MINUTES`)."""
    image = cached_kernel()
    if image is not None:
        return image
    return build(progress or sys.stderr)


class Progress:
    """One status line: rewritten in place on a terminal, else printed every ``every`` s."""

    def __init__(self, out: TextIO, every: float | None = None) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every = 1.0 if self.tty else every if every is not None else PROGRESS_EVERY
        self.start = time.monotonic()
        self._last = -1e9
        self._shown = False

    def say(self, text: str) -> None:
        """A line of its own (ends any status line)."""
        self._end_status()
        self.out.write(f"uvdma vm kernel: {text}\n")
        self.out.flush()

    def status(self, text: str, force: bool = False) -> None:
        """The status line, at most once per interval unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        elapsed = int(now - self.start)
        line = f"uvdma vm kernel: {text}, {elapsed // 60}:{elapsed % 60:02d} elapsed"
        if self.tty:
            self.out.write(f"\r\033[K{line}")
            self._shown = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        """End a status line left on the terminal."""
        self._end_status()

    def _end_status(self) -> None:
        if self._shown:
            self.out.write("\n")
            self._shown = False


@contextlib.contextmanager
def _cache_lock(root: Path, progress: Progress) -> Iterator[None]:
    """Hold the cache's lock; if another build holds it, say so and wait."""
    lock_path = root / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            progress.say(
                f"another `uvdma vm kernel` (pid {holder}) is building the guest kernel; "
                "waiting for it to finish"
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def build(progress_out: TextIO, *, jobs: int | None = None, root: Path | None = None) -> Path:
    """Build the guest kernel unless it is cached; returns its bzImage.

    Raises :class:`KernelBuildError` naming the failed step and the fix.  Interrupted
    (Ctrl-C, SIGTERM), it stops ``make`` and removes the partial tree before raising.
    """
    root = root or cache_root()
    progress = Progress(progress_out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(
            f"creating the kernel cache {root}: {e.strerror}; set XDG_CACHE_HOME to a "
            "writable directory"
        ) from e
    try:
        with signals_as_interrupts(), _cache_lock(root, progress):
            return _build_locked(root, progress, jobs)
    finally:
        progress.end()


def _build_locked(root: Path, progress: Progress, jobs: int | None) -> Path:
    """The rest of :func:`build`, with the cache's lock held."""
    _install_packages(progress, root)
    version = installed_version(SOURCE.package)
    if version is None:
        raise KernelBuildError(
            f"{SOURCE.package} is still not installed after installing it: "
            f"`apt-get install {SOURCE.package}` as root and look at what it says"
        )
    fragment = fragment_text()
    key = cache_key(version, fragment_hash(fragment))
    final = root / key
    if (final / "bzImage").is_file():
        return final / "bzImage"  # built by another run while this one waited
    for stale in root.glob("*.partial"):  # left by a killed build (the lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    free = shutil.disk_usage(root).free
    if free < SPACE_NEEDED:
        raise KernelBuildError(
            f"building the guest kernel needs about {SPACE_NEEDED >> 30} GB free in "
            f"{root}, which has {free / (1 << 30):.1f} GB: free some space, or set "
            "XDG_CACHE_HOME to a disk with room"
        )
    progress.start = time.monotonic()  # not the time spent waiting for the lock
    progress.say(
        f"building the guest kernel from {SOURCE.package} {version} (once: about "
        f"{BUILD_MINUTES} minutes on 2 idle cores); log: {root / (key + '.log')}"
    )
    _build_into(root, key, version, fragment, progress, jobs)
    progress.say(f"built {final / 'bzImage'}")
    return final / "bzImage"


def _install_packages(progress: Progress, root: Path) -> None:
    missing = missing_packages(SOURCE.build_packages)
    if not missing:
        return
    names = " ".join(missing)
    if os.geteuid() != 0:
        raise KernelBuildError(
            f"building the guest kernel needs these Debian packages: {names}; install them "
            f"as root (`apt-get install {names}`) or run `uvdma vm kernel` as root"
        )
    progress.say(f"installing Debian packages: {names}")
    log = root / "apt.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("wb") as f:
        for what, cmd in (
            ("apt-get update", ["apt-get", *_APT_WAIT, "update", "-q"]),
            (
                f"apt-get install {names}",
                ["apt-get", *_APT_WAIT, "install", "-y", "-q", "--no-install-recommends", *missing],
            ),
        ):
            rc = _run_logged(cmd, f, env=env)
            if rc != 0:
                raise KernelBuildError(
                    f"{what} failed (exit {rc}):\n{_tail(log)}\nthe whole output: {log}; "
                    "check the network and /etc/apt/sources.list, then run it again"
                )


class _Build:
    """One build in ``root/<key>.partial``: its log, its steps, its publication."""

    def __init__(self, root: Path, key: str, log: IO[bytes], progress: Progress) -> None:
        self.root = root
        self.key = key
        self.work = root / f"{key}.partial"
        self.log_path = root / f"{key}.log"
        self.log = log
        self.progress = progress
        # Compilers' temporary files go in the work tree: removed with it, even after a kill.
        self.env = {**os.environ, "TMPDIR": str(self.work / "tmp")}

    def step(self, what: str, cmd: list[str], cwd: Path | None = None, count: bool = False) -> None:
        """Run one step with its output in the log; a failure names the step and the fix."""
        self.log.write(f"\n==> {what}: {' '.join(cmd)}\n".encode())
        self.log.flush()
        rc = _run_logged(
            cmd, self.log, cwd=cwd, env=self.env, progress=self.progress if count else None
        )
        if rc == 0:
            return
        tail = _tail(self.log_path)
        if "No space left on device" in tail:
            fix = (
                f"the disk is full: free about {SPACE_NEEDED >> 30} GB in {self.root} or set "
                "XDG_CACHE_HOME to a disk with room, then run `uvdma vm kernel` again"
            )
        elif what.startswith("make"):
            fix = (
                "if the lines above do not say why, report it with the log; "
                f"`apt-get install --reinstall {' '.join(SOURCE.build_packages)}` rules out "
                "a broken toolchain"
            )
        else:
            fix = f"reinstall {SOURCE.package} (`apt-get install --reinstall {SOURCE.package}`)"
        raise KernelBuildError(
            f"{what} failed (exit {rc}):\n{tail}\n{fix}\nthe whole log: {self.log_path}"
        )


def _build_into(
    root: Path, key: str, version: str, fragment: str, progress: Progress, jobs: int | None
) -> None:
    work = root / f"{key}.partial"
    log_path = root / f"{key}.log"
    try:
        work.mkdir()
        (work / "tmp").mkdir()
        with log_path.open("wb") as log:
            b = _Build(root, key, log, progress)
            progress.status("unpacking the source", force=True)
            unpack = ["tar", "-xf", str(SOURCE.tarball), "-C", str(work)]
            b.step("unpacking the kernel source", unpack)
            trees = [p for p in work.iterdir() if (p / "Makefile").is_file()]
            if len(trees) != 1:
                raise KernelBuildError(
                    f"{SOURCE.tarball} did not unpack into one kernel tree ({trees}): "
                    f"reinstall {SOURCE.package}"
                )
            src = trees[0]
            progress.status("configuring", force=True)
            b.step("make " + SOURCE.defconfig, ["make", SOURCE.defconfig], src)
            config = src / ".config"
            config.write_text(merge_config(config.read_text(), fragment))
            b.step("make olddefconfig", ["make", "olddefconfig"], src)
            bad = config_mismatches(config.read_text(), fragment)
            if bad:
                raise KernelBuildError(
                    f"the kernel configuration dropped options of uvdma's fragment (a "
                    f"dependency is missing in {SOURCE.package} {version}): {', '.join(bad)}; "
                    "fix uvdma/vm/guest-kernel.config"
                )
            n = jobs or len(os.sched_getaffinity(0))
            b.step("make bzImage", ["nice", "-n", "19", "make", f"-j{n}", "bzImage"], src, True)
            out = work / "out"
            out.mkdir()
            shutil.copy2(src / SOURCE.image, out / "bzImage")
            shutil.copy2(config, out / "config")
            (out / "source").write_text(
                f"{SOURCE.package} {version}\nfragment {fragment_hash(fragment)}\n"
            )
        shutil.copy2(log_path, out / "build.log")
        with interrupts_deferred():
            os.rename(out, root / key)  # the build appears whole, or not at all
            log_path.unlink()
    except OSError as e:
        raise KernelBuildError(_os_error_text(e, root)) from e
    finally:
        with interrupts_deferred():
            if work.exists() and sys.exc_info()[0] is not None:
                progress.say("stopped: removing the partial build tree (a few seconds)")
            shutil.rmtree(work, ignore_errors=True)


def _os_error_text(e: OSError, root: Path) -> str:
    if e.errno == errno.ENOSPC:
        return (
            f"the disk holding {root} is full ({e}): free about {SPACE_NEEDED >> 30} GB or "
            "set XDG_CACHE_HOME to a disk with room, then run `uvdma vm kernel` again"
        )
    return f"building the guest kernel: {e}"


def _run_logged(
    cmd: list[str],
    log: IO[bytes],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> int:
    """Run ``cmd`` with its output into ``log`` (counting build steps for ``progress``);
    on any exception, including an interrupt, its whole process group is killed first."""
    proc: subprocess.Popen[bytes] | None = None
    if shutil.which(cmd[0], path=(env or os.environ).get("PATH")) is None:
        if cmd[0] == "apt-get":
            raise KernelBuildError(
                "apt-get is not installed: the guest kernel is built from Debian's kernel "
                f"source; install {' '.join(SOURCE.build_packages)} by hand or use Debian"
            )
        raise KernelBuildError(
            f"{cmd[0]} is not installed: `apt-get install {' '.join(SOURCE.build_packages)}`"
        )
    try:
        with interrupts_deferred():
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if proc.stdout is None:  # pragma: no cover - stdout=PIPE guarantees it
            raise KernelBuildError(f"could not read the output of {cmd[0]}")
        steps = 0
        for line in proc.stdout:
            log.write(line)
            if progress is not None and _STEP_RE.match(line):
                steps += 1
                pct = min(99, 100 * steps // EXPECTED_STEPS)
                progress.status(f"compiling: {steps} steps (about {pct}%)", force=steps == 1)
        log.flush()
        return proc.wait()
    except BaseException:
        if proc is not None:
            with interrupts_deferred():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        raise
    finally:
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in text.splitlines()[-lines:])
