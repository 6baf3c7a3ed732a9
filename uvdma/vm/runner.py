"""The QEMU test VM: ``uvdma vm run [options] -- COMMAND...``.

Boots a kernel under QEMU (q35; emulated VT-d with interrupt remapping and a split
irqchip, or no IOMMU at all) with the host's root filesystem shared read-only through
virtme-ng, attaches emulated NVMe controllers backed by temporary files (optionally
throttled), reserves hugepages, optionally binds the controllers to vfio-pci, and runs
COMMAND as root in the current directory.  Its output is streamed and its exit code
returned.

The kernel is the installed Debian one (``stock``), uvdma's own build of Debian's
kernel source with iommufd, VFIO cdev and no-IOMMU mode (``built``, see
:mod:`uvdma.vm.kernel`), or any image.

Nothing here needs a real IOMMU or device: this is how uvdma proves its claims about
devices on machines that have neither.  TCG is the default (see :func:`kvm_problem`);
two timeouts make sure a run never hangs.  Every option is checked before anything
boots, and every file the run or virtme-ng makes lives in one private directory that
is removed afterwards: after a timeout, Ctrl-C or SIGTERM too, and, should the runner
itself be killed, by the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import math
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from uvdma import _args
from uvdma._args import int_arg
from uvdma.errors import SizeError, VmError, VmTimeoutError
from uvdma.vm._signals import interrupts_deferred, signals_as_interrupts
from uvdma.vm.kernel import BUILD_MINUTES, ensure_built

#: The first line the guest prints: the host knows the boot is over when it sees it.
READY_MARKER = "uvdma-vm: guest up"
KERNEL_CHOICES = ("stock", "built")
IOMMU_CHOICES = ("intel", "none")
MAX_NVME = 8
MAX_CPUS = 64  # beyond this intel-iommu needs x2APIC EIM; TCG on 2 cores gains nothing
#: Below this the guest's kernel and Python do not fit (checked: 384M boots and runs
#: `python -m pytest --version`, 256M does not get to the command).
MIN_MEMORY = 512 << 20
PREALLOC_CHOICES = ("auto", "on", "off")
#: --prealloc auto leaves this much of what the host has available (QEMU's own memory, the
#: host's other work) besides the guest's.
PREALLOC_SPARE = 2 << 30
MAX_NVME_SIZE = 1 << 40  # sparse files; the guest's writes fill them
#: QEMU's THROTTLE_VALUE_MAX (include/qemu/throttle.h).
MAX_IOPS = 1_000_000_000_000_000
_RUN_DIR_PREFIX = "uvdma-vm-"
_OWNER_LOCK = "owner.lock"
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: How the guest mounts the host's root when its kernel mounts it (a kernel without
#: modules boots without an initramfs; with one, virtme-ng's init mounts it and ignores
#: this).  cache=loose: with 6.12's default cache=none every read is a 9p round trip per
#: 4 KiB page (netfs hands the virtio transport a page-per-segment bvec; its zero-copy
#: path takes one segment), tens of times slower than 6.1; loose caches data and metadata (the
#: root is read-only and a run short: host changes during a run may go unseen).
ROOT_FLAGS = "version=9p2000.L,trans=virtio,access=any,msize=512000,cache=loose"
#: The guest CPU under TCG: QEMU's "max" (what virtme-ng asks for) without ERMS.  With ERMS
#: the kernel copies and clears with ``rep movsb``/``rep stosb`` (copy_to_user, memcpy,
#: clear_page) and glibc's large memcpy/memset do too, and TCG runs those one byte per
#: iteration: copying out of the guest's page cache ran at about 220 MB/s with it and
#: 900-1200 MB/s without (``rep movsq``, 8 bytes per iteration).  Measured in
#: docs/test-vm.md ("Reading host files in the built guest").
TCG_CPU = "max,-erms"


def parse_size(text: str) -> int:
    """A size such as ``64M`` or ``2G`` (binary units), read as the kernel's memparse reads
    it (:func:`uvdma._args.parse_size`), as :class:`VmError`."""
    try:
        return _args.parse_size(text.strip(), "a VM size", "64M")
    except SizeError as e:
        raise VmError(str(e)) from None


def _mib(size: int) -> str:
    return f"{size >> 20}M"


def parse_iops(text: str, nvme: int) -> list[int]:
    """``--nvme-iops``: one limit for every controller, or a comma list with one per
    controller in creation order (= PCI address order in the guest); 0 is unlimited."""
    parts = [p.strip() for p in text.split(",")]
    values: list[int] = []
    for p in parts:
        if not p.isdigit() or len(p) > 16 or int(p) > MAX_IOPS:
            raise VmError(
                f"--nvme-iops takes whole numbers from 0 (unlimited) to {MAX_IOPS}, "
                f"one or one per controller separated by commas, not {text!r}"
            )
        values.append(int(p))
    if nvme == 0 and any(values):
        raise VmError("--nvme-iops limits NVMe controllers, and --nvme 0 asks for none")
    if len(values) == 1:
        return values * nvme
    if len(values) != nvme:
        raise VmError(
            f"--nvme-iops lists {len(values)} values for {nvme} controllers: give one value "
            f"for all, or exactly {nvme} separated by commas"
        )
    return values


@dataclass
class VmConfig:
    """How to boot the test VM; the defaults are the ones ``tools/test`` uses.

    ``kernel`` is ``"stock"`` (the newest /boot/vmlinuz-*), ``"built"`` (uvdma's guest
    kernel, built once by ``uvdma vm kernel``) or the path of an image.  ``nvme_iops``
    holds one limit per controller (0: unlimited), empty for none.
    """

    command: list[str]
    kernel: str | Path = "stock"
    nvme: int = 2
    nvme_size: int = 64 << 20
    nvme_iops: list[int] = field(default_factory=list)
    hugepage_size: str = "2M"
    hugepages: int = 64
    memory: str = "2G"
    cpus: int = 2
    accel: str = "tcg"
    iommu: str = "intel"
    bind: bool = False
    prealloc: str = "auto"
    boot_timeout: float = 180.0
    timeout: float = 1800.0
    cwd: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse settings the guest cannot honour, naming the fix; touches nothing."""
        if not self.command:
            raise VmError("no command to run in the guest: `uvdma vm run [options] -- COMMAND...`")
        if isinstance(self.kernel, str) and self.kernel not in KERNEL_CHOICES:
            raise VmError(f"--kernel must be stock, built or a path, not {self.kernel!r}")
        if not 0 <= self.nvme <= MAX_NVME:
            raise VmError(f"--nvme must be between 0 and {MAX_NVME}, not {self.nvme}")
        if not 1 << 20 <= self.nvme_size <= MAX_NVME_SIZE:
            raise VmError(
                "--nvme-size must be between 1M (the controller needs a namespace) and "
                f"1T, not {self.nvme_size} bytes"
            )
        if self.nvme_iops and len(self.nvme_iops) != self.nvme:
            raise VmError(
                f"--nvme-iops has {len(self.nvme_iops)} values for {self.nvme} controllers"
            )
        if any(not 0 <= n <= MAX_IOPS for n in self.nvme_iops):
            raise VmError(f"--nvme-iops values must be between 0 and {MAX_IOPS}")
        if self.hugepage_size not in ("2M", "1G"):
            raise VmError(f"--hugepage-size must be 2M or 1G, not {self.hugepage_size}")
        if self.accel not in ("tcg", "kvm"):
            raise VmError(f"--accel must be tcg or kvm, not {self.accel}")
        if self.iommu not in IOMMU_CHOICES:
            raise VmError(f"--iommu must be intel or none, not {self.iommu}")
        if self.prealloc not in PREALLOC_CHOICES:
            raise VmError(f"--prealloc must be auto, on or off, not {self.prealloc}")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise VmError(f"--cpus must be between 1 and {MAX_CPUS}, not {self.cpus}")
        mem = parse_size(self.memory)
        if mem % (1 << 20):
            raise VmError(f"--memory must be a whole number of MiB, not {self.memory}")
        if mem < MIN_MEMORY:
            raise VmError(
                f"--memory {self.memory} is too little: the guest needs at least "
                f"{_mib(MIN_MEMORY)} besides its hugepages"
            )
        host = _host_memory()
        if host is not None and mem > host:
            raise VmError(
                f"--memory {self.memory} is more than this machine has ({_mib(host)}): "
                "lower it (2G is the default)"
            )
        if self.hugepages < 0:
            raise VmError(f"--hugepages must not be negative, not {self.hugepages}")
        huge = self.hugepages * parse_size(self.hugepage_size)
        # Boot-time 1 GiB pages need 1 GiB-aligned free ranges; q35 puts the kernel in the
        # low 2 GiB, so leave 3 GiB besides them (checked: 1 page in 4G works, in 3G not).
        spare = (3 << 30) if self.hugepage_size == "1G" and self.hugepages else MIN_MEMORY
        if huge > mem - spare:
            raise VmError(
                f"{self.hugepages} hugepages of {self.hugepage_size} do not fit in a "
                f"{self.memory} guest with {spare >> 20}M left for the kernel: raise --memory "
                f"to at least {(huge + spare) >> 20}M or lower --hugepages"
            )
        for name, value in (("--boot-timeout", self.boot_timeout), ("--timeout", self.timeout)):
            if not (math.isfinite(value) and value > 0):
                raise VmError(f"{name} must be a positive number of seconds, not {value}")
        for key in self.env:
            if not _ENV_KEY_RE.match(key):
                raise VmError(f"--env: {key!r} is not a variable name (letters, digits, _)")


def _prealloc_fits(guest: int) -> bool:
    """``--prealloc auto``: whether QEMU may commit all ``guest`` bytes of RAM at start
    (``-mem-prealloc``): when this machine (and this process's memory cgroup) has that much
    available and 2 GiB to spare, for QEMU's own memory and the host's other work.  Guest RAM
    the host has not touched yet costs a host page fault on the guest's first write to each
    page, and a guest's page cache is such memory: the built guest's first large read over 9p
    after boot was the slowest of every boot without it (docs/test-vm.md).  Too little to
    spare: no preallocation, rather than pressing the host's other work."""
    available = _host_available()
    return available is not None and guest + PREALLOC_SPARE <= available


def _host_available() -> int | None:
    """What this process may still take: MemAvailable, lowered to its memory cgroup's room
    (cgroup v2 ``memory.max`` less ``memory.current``) when that is limited; None if
    /proc/meminfo cannot tell."""
    available = _meminfo("MemAvailable")
    room = _cgroup_room()
    if available is None or room is None:
        return available
    return min(available, room)


def _cgroup_room() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2), or None when it has
    no limit or cannot be read."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                group = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                limit = (group / "memory.max").read_text().strip()
                if limit == "max":
                    return None
                return max(0, int(limit) - int((group / "memory.current").read_text()))
    except (OSError, ValueError):
        return None
    return None


def _host_memory() -> int | None:
    """MemTotal of this machine, or None if /proc/meminfo cannot tell."""
    return _meminfo("MemTotal")


def _meminfo(field: str) -> int | None:
    """One field of /proc/meminfo in bytes, or None if it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        return None
    return None


def find_kernel() -> Path:
    """The newest installed kernel image in /boot."""
    images = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    if not images:
        raise VmError(
            "no kernel in /boot to boot the test VM: "
            "`apt-get install linux-image-amd64` (or pass --kernel PATH)"
        )
    return images[-1]


def _version_key(path: Path) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", path.name[len("vmlinuz-") :])]


def kernel_config_of(image: Path) -> Path | None:
    """The .config a kernel image was built from, where one sits beside it: /boot's
    ``config-<version>``, a built kernel's ``config``, or a kernel tree's ``.config``."""
    candidates = [image.parent / "config"]
    if image.name.startswith("vmlinuz-"):
        candidates.append(image.parent / f"config-{image.name[len('vmlinuz-') :]}")
    if image.parent.name == "boot" and image.parent.parent.parent.name == "arch":
        candidates.append(image.parents[3] / ".config")  # arch/x86/boot/bzImage
    return next((c for c in candidates if c.is_file()), None)


def kernel_has(config: Path, option: str) -> bool:
    """Whether ``CONFIG_<option>`` is built in (=y) according to a .config file."""
    return f"CONFIG_{option}=y" in config.read_text(errors="replace").splitlines()


def resolve_kernel(config: VmConfig, progress: TextIO | None = None) -> Path:
    """The image to boot; ``built`` builds uvdma's guest kernel first if it is missing.

    Refuses ``--iommu none`` with a kernel that has no CONFIG_VFIO_NOIOMMU.
    """
    if config.kernel == "stock":
        image = find_kernel()
    elif config.kernel == "built":
        image = ensure_built(progress or sys.stderr)
    else:
        image = Path(config.kernel)
        if not image.is_file():
            raise VmError(
                f"--kernel {image}: no such file (give a kernel image, `stock` or `built`)"
            )
    if config.iommu == "none":
        kconfig = kernel_config_of(image)
        if kconfig is None:
            raise VmError(
                f"--iommu none: cannot tell whether {image} has CONFIG_VFIO_NOIOMMU (no "
                "config beside it); use --kernel built, which has it"
            )
        if not kernel_has(kconfig, "VFIO_NOIOMMU"):
            raise VmError(
                f"--iommu none needs VFIO's no-IOMMU mode (CONFIG_VFIO_NOIOMMU), which {image} "
                f"lacks ({kconfig}); Debian's kernels never have it: use --kernel built "
                f"(`uvdma vm kernel` builds it once, about {BUILD_MINUTES} minutes on 2 idle cores)"
            )
    return image


def kvm_problem(
    sysfs: Path = Path("/sys"), cpuinfo: Path = Path("/proc/cpuinfo"), dev: str = "/dev/kvm"
) -> str | None:
    """Why ``--accel kvm`` cannot boot a stock kernel here, or None if it should.

    The project's machines have a /dev/kvm that is kvm-pvm: PVM runs only guest kernels
    built for PVM, and with a stock kernel QEMU aborts ("failed to set MSR 0x10a") or
    hangs after "Probing EDD", whatever -cpu is given.
    """
    if not os.path.exists(dev):
        return f"there is no {dev} (no KVM module loaded, or no hardware virtualisation)"
    if (sysfs / "module/kvm_pvm").exists():
        return (
            f"this host's {dev} is kvm-pvm ({sysfs}/module/kvm_pvm exists), which runs only "
            "guest kernels built for PVM; a stock kernel makes QEMU abort "
            "('failed to set MSR 0x10a') or hang during boot"
        )
    try:
        flags = next(
            (
                ln.split(":", 1)[1].split()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("flags")
            ),
            [],
        )
    except OSError:
        flags = ["vmx"]  # cannot tell: let QEMU say
    if "vmx" not in flags and "svm" not in flags:
        return (
            f"the CPU has neither the vmx nor the svm flag ({cpuinfo}), so {dev} is not "
            "hardware KVM and cannot run a stock kernel"
        )
    if not os.access(dev, os.R_OK | os.W_OK):
        return f"{dev} is not readable and writable by this user (add it to group kvm)"
    return None


def find_tools(accel: str) -> str:
    """The vng executable, after checking that QEMU and the rest are there; an error names
    the package that provides whatever is missing, or why KVM cannot work here."""
    if shutil.which("qemu-system-x86_64") is None:
        raise VmError("qemu-system-x86_64 is not installed: `apt-get install qemu-system-x86`")
    if not _has_static_busybox():
        raise VmError("virtme-ng needs a static busybox: `apt-get install busybox-static`")
    here = Path(sys.executable).parent / "vng"
    vng = str(here) if here.exists() else shutil.which("vng")
    if vng is None:
        raise VmError("virtme-ng is not installed: `pip install 'uvdma[vm]'` (or tools/test)")
    if accel == "kvm":
        problem = kvm_problem()
        if problem is not None:
            raise VmError(f"--accel kvm cannot work here: {problem}; use --accel tcg (the default)")
    return vng


def _has_static_busybox() -> bool:
    """A busybox ELF with no PT_INTERP (dynamic loader) program header."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        try:
            data = Path(candidate).read_bytes()[:4096]
        except OSError:
            continue
        if data[:4] == b"\x7fELF" and b"/ld-linux" not in data and b"/lib64/ld" not in data:
            return True
    return False


def guest_script(config: VmConfig) -> str:
    """The shell script the guest runs: say it is up, set up, then exec COMMAND."""
    venv_bin = str(Path(sys.executable).parent)
    iops = config.nvme_iops or [0] * config.nvme
    env = {
        "UVDMA_IN_VM": "1",
        "UVDMA_VM_NVME": str(config.nvme),
        "UVDMA_VM_NVME_IOPS": ",".join(str(n) for n in iops),
        "UVDMA_VM_HUGEPAGES": str(config.hugepages),
        "UVDMA_VM_HUGEPAGE_SIZE": config.hugepage_size,
        "UVDMA_VM_BOUND": "1" if config.bind else "0",
        "UVDMA_VM_IOMMU": config.iommu,
        "UVDMA_VM_KERNEL": str(config.kernel),
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        **config.env,
    }
    lines = [f"echo {shlex.quote(READY_MARKER)}", "unset TMPDIR"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(
        "got=$(awk '/^HugePages_Total/ {print $2}' /proc/meminfo); "
        f'[ "$got" = {config.hugepages} ] || echo "uvdma-vm: warning: {config.hugepages} '
        f'hugepages of {config.hugepage_size} asked for, $got reserved" >&2'
    )
    if config.bind:
        lines.append(
            f"{shlex.quote(sys.executable)} -m uvdma.pci bind-nvme || "
            "{ echo 'uvdma-vm: binding the NVMe controllers to vfio-pci failed' >&2; exit 97; }"
        )
    lines.append(f"cd {shlex.quote(str(config.cwd))} || exit 98")
    lines.append(f"exec {shlex.join(config.command)}")
    return "; ".join(lines)


def build_command(
    config: VmConfig, vng: str, images: Sequence[Path], kernel: Path | None = None
) -> list[str]:
    """The vng command line (see shared FACTS: q35 and intel-iommu need --disable-microvm)."""
    if kernel is None:
        kernel = Path(config.kernel) if isinstance(config.kernel, Path) else find_kernel()
    if config.hugepage_size == "1G":
        huge = f"default_hugepagesz=1G hugepagesz=1G hugepages={config.hugepages}"
    else:
        huge = f"hugepagesz=2M hugepages={config.hugepages}"
    if config.iommu == "intel":
        qemu_opts = ["-machine", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=on"]
        append = f"intel_iommu=on {huge} rootflags={ROOT_FLAGS}"
    else:
        qemu_opts = ["-machine", "q35"]
        append = f"vfio.enable_unsafe_noiommu_mode=1 {huge} rootflags={ROOT_FLAGS}"
    if config.accel == "tcg":  # (with KVM virtme-ng passes the host's CPU)
        qemu_opts += ["-cpu", TCG_CPU]  # the last -cpu wins, so this replaces virtme-ng's
    if config.prealloc == "on" or (
        config.prealloc == "auto" and _prealloc_fits(parse_size(config.memory))
    ):
        qemu_opts.append("-mem-prealloc")
    iops = config.nvme_iops or [0] * len(images)
    for i, image in enumerate(images):
        drive = f"file={image},if=none,id=uvdmanvm{i},format=raw"
        if iops[i]:
            drive += f",throttling.iops-total={iops[i]}"
        qemu_opts += ["-drive", drive, "-device", f"nvme,serial=uvdma{i:04d},drive=uvdmanvm{i}"]
    # 9p always: the rootflags above are 9p's, and the guest is the same on every machine
    # (virtio-fs needs the Rust virtiofsd, which bookworm does not have).
    cmd = [vng, "-r", str(kernel), "--disable-microvm", "--force-9p"]
    if config.accel == "tcg":
        cmd.append("--disable-kvm")
    cmd += [
        "-m",
        _mib(parse_size(config.memory)),
        "--cpus",
        str(config.cpus),
        "--append",
        append,
        f"--qemu-opts={shlex.join(qemu_opts)}",
        "--exec",
        guest_script(config),
    ]
    return cmd


def run(config: VmConfig, out: TextIO | None = None) -> int:
    """Boot the VM, run the command, stream its output to ``out``; returns its exit code.

    Every option is checked before anything is started.  Raises :class:`VmTimeoutError`
    when the boot timeout (no sign of the guest) or the run timeout (the whole run)
    fires.  However the run ends (a timeout, KeyboardInterrupt, an error), the VM is
    killed and every file it made is removed before this returns or raises.
    """
    out = out or sys.stdout
    config.check()
    vng = find_tools(config.accel)
    with signals_as_interrupts():
        kernel = resolve_kernel(config)
        sweep_stale_run_dirs()
        return _run_in(config, vng, kernel, out)


def _run_in(config: VmConfig, vng: str, kernel: Path, out: TextIO) -> int:
    with run_dir() as tmp:
        images = []
        for i in range(config.nvme):
            image = tmp / f"nvme{i}.img"
            try:
                with image.open("wb") as f:
                    f.truncate(config.nvme_size)
            except OSError as e:
                raise VmError(
                    f"creating the NVMe backing file {image} ({_mib(config.nvme_size)}, sparse): "
                    f"{e.strerror}; free space in {tmp.parent} or point TMPDIR elsewhere"
                ) from e
            images.append(image)
        cmd = build_command(config, vng, images, kernel)
        vng_tmp = tmp / "tmp"
        vng_tmp.mkdir()
        env = dict(os.environ)
        env["PATH"] = f"{Path(vng).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env["TMPDIR"] = str(vng_tmp)  # virtme-ng's own temporary files land here too
        return _supervise(cmd, env, config, out)


@contextlib.contextmanager
def run_dir(parent: Path | None = None) -> Iterator[Path]:
    """A private directory for one run, removed on exit however the run ends.

    It holds ``owner.lock``, locked (flock) for as long as the run lives: a later run
    that can take the lock knows the owner is gone and removes the directory
    (:func:`sweep_stale_run_dirs`).
    """
    with interrupts_deferred():
        try:
            path = Path(tempfile.mkdtemp(prefix=_RUN_DIR_PREFIX, dir=parent))
        except OSError as e:
            where = parent or tempfile.gettempdir()
            raise VmError(
                f"creating the VM's directory in {where}: {e.strerror or e}; free space "
                "there or point TMPDIR at a writable directory"
            ) from e
        lock_fd = -1
        try:
            # Lock before the file has its name, so no sweeper sees it unlocked.
            tmp_lock = path / (_OWNER_LOCK + ".new")
            lock_fd = os.open(tmp_lock, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            os.write(lock_fd, f"{os.getpid()}\n".encode())
            os.replace(tmp_lock, path / _OWNER_LOCK)
        except BaseException:
            if lock_fd >= 0:
                os.close(lock_fd)
            shutil.rmtree(path, ignore_errors=True)
            raise
    try:
        yield path
    finally:
        with interrupts_deferred():
            shutil.rmtree(path, ignore_errors=True)
            os.close(lock_fd)


def sweep_stale_run_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the run directories of runs that were killed (their lock is free); returns
    them.  Directories of live runs, other users' and foreign ones are left alone."""
    root = Path(parent or tempfile.gettempdir())
    removed = []
    for path in root.glob(_RUN_DIR_PREFIX + "*"):
        try:
            if path.is_symlink() or path.lstat().st_uid != os.geteuid():
                continue
            fd = os.open(path / _OWNER_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # not ours, or not a run directory of this kind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            continue  # its run is alive
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _supervise(cmd: list[str], env: dict[str, str], config: VmConfig, out: TextIO) -> int:
    start = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with interrupts_deferred():  # an interrupt must find `proc` set, ready to be killed
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,  # vng crashes with no stdin at all (CI has none)
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: the VM dies with it
            )
        booted, rc = _stream(proc, config, start, out)
    except BaseException:
        if proc is not None:
            with interrupts_deferred():
                _kill(proc)
        raise
    finally:
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
    _kill(proc)  # whatever vng left behind in its process group (a virtiofsd, say)
    if not booted:
        raise VmError(
            f"the VM exited (code {rc}) before the guest ran the command; its output above says why"
        )
    return rc


def _stream(
    proc: subprocess.Popen[bytes], config: VmConfig, start: float, out: TextIO
) -> tuple[bool, int]:
    """Copy the VM's output to ``out`` until vng exits; (booted, exit code)."""
    if proc.stdout is None:  # pragma: no cover - stdout=PIPE guarantees it
        raise VmError("could not read the VM's output")
    booted = False
    buf = b""
    exited_at: float | None = None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if not booted and now - start > config.boot_timeout:
                raise VmTimeoutError(
                    f"boot timeout: the guest did not start the command within "
                    f"{config.boot_timeout:.0f} s (a TCG boot takes about 30 s here); "
                    "raise it with --boot-timeout, and see the output above"
                )
            if now - start > config.timeout:
                raise VmTimeoutError(
                    f"run timeout: the VM ran longer than {config.timeout:.0f} s in all; "
                    "raise it with --timeout if the command needs longer"
                )
            # vng gone but something it started still holds the pipe: stop reading soon.
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 2.0:
                break
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                if not booted and READY_MARKER in line:
                    booted = True
                    continue
                out.write(line + "\n")
            out.flush()
    if buf:
        out.write(buf.decode(errors="replace"))
        out.flush()
    return booted, proc.wait()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the VM's whole process group (vng, QEMU, helpers) and reap vng."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- the command line --------------------------------------------------------------------


def size_arg(lo: int, hi: int) -> Callable[[str], str]:
    """An argparse type: a size with K/M/G/T from ``lo`` to ``hi`` bytes (kept as text)."""

    def parse(text: str) -> str:
        try:
            n = parse_size(text)
        except VmError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(
                f"must be between {_mib(lo)} and {hi >> 30}G, not {text}"
            )
        return text

    return parse


def seconds_arg(text: str) -> float:
    """An argparse type: a finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= 7 * 24 * 3600):
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most a week, not {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``uvdma vm run``."""
    p.add_argument(
        "--kernel",
        default="stock",
        metavar="stock|built|PATH",
        help="the guest kernel: stock (the newest /boot/vmlinuz-*, default), built (uvdma's "
        "kernel with iommufd and no-IOMMU mode, built once by `uvdma vm kernel`) or an image",
    )
    p.add_argument(
        "--iommu",
        default="intel",
        choices=IOMMU_CHOICES,
        help="intel: emulated VT-d (default); none: no IOMMU, VFIO in no-IOMMU mode "
        "(needs --kernel built)",
    )
    p.add_argument(
        "--nvme",
        type=int_arg(0, MAX_NVME),
        default=2,
        help="emulated NVMe controllers (default 2)",
    )
    p.add_argument(
        "--nvme-size",
        type=size_arg(1 << 20, MAX_NVME_SIZE),
        default="64M",
        help="size of each NVMe namespace (default 64M)",
    )
    p.add_argument(
        "--nvme-iops",
        metavar="N[,N...]",
        help="limit each controller to N I/O per second (QEMU drive throttling), or one "
        "value per controller in PCI address order; 0 is unlimited (default)",
    )
    p.add_argument("--hugepage-size", default="2M", choices=["2M", "1G"])
    p.add_argument(
        "--hugepages",
        type=int_arg(0, 1 << 20),
        default=64,
        help="hugepages to reserve (default 64)",
    )
    p.add_argument(
        "--memory",
        type=size_arg(MIN_MEMORY, 1 << 40),
        default="2G",
        help="guest memory (default 2G)",
    )
    p.add_argument(
        "--prealloc",
        default="auto",
        choices=PREALLOC_CHOICES,
        help="commit the guest's memory when QEMU starts (faster first writes to each page); "
        f"auto (default): when this machine has it available and {PREALLOC_SPARE >> 30} GiB "
        "to spare",
    )
    p.add_argument("--cpus", type=int_arg(1, MAX_CPUS), default=2)
    p.add_argument("--accel", default="tcg", choices=["tcg", "kvm"], help="default tcg")
    p.add_argument("--bind", action="store_true", help="bind the NVMe controllers to vfio-pci")
    p.add_argument("--boot-timeout", type=seconds_arg, default=180.0, help="default 180")
    p.add_argument("--timeout", type=seconds_arg, default=1800.0, help="whole run (default 1800)")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="set in the guest"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")


def config_from_args(args: argparse.Namespace) -> VmConfig:
    """Turn parsed ``uvdma vm run`` options into a :class:`VmConfig`."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VmError(f"--env takes KEY=VALUE, not {item!r}")
        env[key] = value
    kernel: str | Path = args.kernel if args.kernel in KERNEL_CHOICES else Path(args.kernel)
    return VmConfig(
        command=command,
        kernel=kernel,
        nvme=args.nvme,
        nvme_size=parse_size(args.nvme_size),
        nvme_iops=parse_iops(args.nvme_iops, args.nvme) if args.nvme_iops else [],
        hugepage_size=args.hugepage_size,
        hugepages=args.hugepages,
        memory=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        iommu=args.iommu,
        bind=args.bind,
        prealloc=args.prealloc,
        boot_timeout=args.boot_timeout,
        timeout=args.timeout,
        env=env,
    )
