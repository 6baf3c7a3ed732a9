"""The QEMU test VM: ``uvdma vm run [options] -- COMMAND...``.

Boots the installed Debian kernel under QEMU (q35, emulated VT-d with interrupt
remapping, split irqchip) with the host's root filesystem shared read-only through
virtme-ng, attaches emulated NVMe controllers backed by temporary files, reserves
hugepages, optionally binds the controllers to vfio-pci, and runs COMMAND as root in
the current directory.  Its output is streamed and its exit code returned.

Nothing here needs a real IOMMU or device: this is how uvdma proves its claims about
devices on machines that have neither.  TCG is the default (KVM hangs under nested
virtualisation on the project's machines); two timeouts make sure a run never hangs.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from uvdma.errors import VmError, VmTimeoutError

#: The first line the guest prints: the host knows the boot is over when it sees it.
READY_MARKER = "uvdma-vm: guest up"
_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a size such as ``64M`` or ``2G`` (binary units) into bytes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise VmError(f"cannot read the size {text!r}: write a number with K, M, G or T, e.g. 64M")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


@dataclass
class VmConfig:
    """How to boot the test VM; the defaults are the ones ``tools/test`` uses."""

    command: list[str]
    kernel: Path | None = None
    nvme: int = 2
    nvme_size: int = 64 << 20
    hugepage_size: str = "2M"
    hugepages: int = 64
    memory: str = "2G"
    cpus: int = 2
    accel: str = "tcg"
    bind: bool = False
    boot_timeout: float = 180.0
    timeout: float = 1800.0
    cwd: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse settings the guest cannot honour, naming the fix."""
        if not self.command:
            raise VmError("no command to run in the guest: `uvdma vm run [options] -- COMMAND...`")
        if not 0 <= self.nvme <= 8:
            raise VmError(f"--nvme must be between 0 and 8, not {self.nvme}")
        if self.nvme_size < 1 << 20:
            raise VmError("--nvme-size must be at least 1M (the controller needs a namespace)")
        if self.hugepage_size not in ("2M", "1G"):
            raise VmError(f"--hugepage-size must be 2M or 1G, not {self.hugepage_size}")
        if self.accel not in ("tcg", "kvm"):
            raise VmError(f"--accel must be tcg or kvm, not {self.accel}")
        mem = parse_size(self.memory)
        huge = self.hugepages * parse_size(self.hugepage_size)
        # Boot-time 1 GiB pages need 1 GiB-aligned free ranges; q35 puts the kernel in the
        # low 2 GiB, so leave 3 GiB besides them (checked: 1 page in 4G works, in 3G not).
        spare = (3 << 30) if self.hugepage_size == "1G" and self.hugepages else (512 << 20)
        if huge > mem - spare:
            raise VmError(
                f"{self.hugepages} hugepages of {self.hugepage_size} do not fit in a "
                f"{self.memory} guest with {spare >> 20}M left for the kernel: raise --memory "
                f"to at least {(huge + spare) >> 20}M or lower --hugepages"
            )
        if self.boot_timeout <= 0 or self.timeout <= 0:
            raise VmError("timeouts must be positive")


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


def find_tools(accel: str) -> str:
    """The vng executable, after checking that QEMU and the rest are there; an error names
    the package that provides whatever is missing."""
    if shutil.which("qemu-system-x86_64") is None:
        raise VmError("qemu-system-x86_64 is not installed: `apt-get install qemu-system-x86`")
    if not _has_static_busybox():
        raise VmError("virtme-ng needs a static busybox: `apt-get install busybox-static`")
    here = Path(sys.executable).parent / "vng"
    vng = str(here) if here.exists() else shutil.which("vng")
    if vng is None:
        raise VmError("virtme-ng is not installed: `pip install 'uvdma[vm]'` (or tools/test)")
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise VmError("--accel kvm needs read-write /dev/kvm; use the default --accel tcg")
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
    env = {
        "UVDMA_IN_VM": "1",
        "UVDMA_VM_NVME": str(config.nvme),
        "UVDMA_VM_HUGEPAGES": str(config.hugepages),
        "UVDMA_VM_HUGEPAGE_SIZE": config.hugepage_size,
        "UVDMA_VM_BOUND": "1" if config.bind else "0",
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        **config.env,
    }
    lines = [f"echo {shlex.quote(READY_MARKER)}"]
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


def build_command(config: VmConfig, vng: str, images: Sequence[Path]) -> list[str]:
    """The vng command line (see shared FACTS: q35 and intel-iommu need --disable-microvm)."""
    kernel = config.kernel or find_kernel()
    if config.hugepage_size == "1G":
        huge = f"default_hugepagesz=1G hugepagesz=1G hugepages={config.hugepages}"
    else:
        huge = f"hugepagesz=2M hugepages={config.hugepages}"
    qemu_opts = ["-machine", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=on"]
    for i, image in enumerate(images):
        qemu_opts += [
            "-drive",
            f"file={image},if=none,id=uvdmanvm{i},format=raw",
            "-device",
            f"nvme,serial=uvdma{i:04d},drive=uvdmanvm{i}",
        ]
    cmd = [vng, "-r", str(kernel), "--disable-microvm"]
    if config.accel == "tcg":
        cmd.append("--disable-kvm")
    cmd += [
        "-m",
        config.memory,
        "--cpus",
        str(config.cpus),
        "--append",
        f"intel_iommu=on {huge}",
        f"--qemu-opts={shlex.join(qemu_opts)}",
        "--exec",
        guest_script(config),
    ]
    return cmd


def run(config: VmConfig, out: TextIO | None = None) -> int:
    """Boot the VM, run the command, stream its output to ``out``; returns its exit code.

    Raises :class:`VmTimeoutError` when the boot timeout (no sign of the guest) or the
    run timeout (the whole run) fires; the VM is killed and its files removed first.
    """
    out = out or sys.stdout
    config.check()
    vng = find_tools(config.accel)
    with tempfile.TemporaryDirectory(prefix="uvdma-vm-") as tmp:
        images = []
        for i in range(config.nvme):
            image = Path(tmp) / f"nvme{i}.img"
            with image.open("wb") as f:
                f.truncate(config.nvme_size)
            images.append(image)
        cmd = build_command(config, vng, images)
        env = dict(os.environ)
        env["PATH"] = f"{Path(vng).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        return _supervise(cmd, env, config, out)


def _supervise(cmd: list[str], env: dict[str, str], config: VmConfig, out: TextIO) -> int:
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,  # vng crashes with no stdin at all (CI has none)
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    if proc.stdout is None:  # pragma: no cover - stdout=PIPE guarantees it
        raise VmError("could not read the VM's output")
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    booted = False
    buf = b""
    try:
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
        rc = proc.wait()
    except BaseException:
        _kill(proc)
        raise
    finally:
        sel.close()
        proc.stdout.close()
    if not booted:
        raise VmError(
            f"the VM exited (code {rc}) before the guest ran the command; its output above says why"
        )
    return rc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``uvdma vm run``."""
    p.add_argument("--kernel", type=Path, help="kernel image (default: newest /boot/vmlinuz-*)")
    p.add_argument("--nvme", type=int, default=2, help="emulated NVMe controllers (default 2)")
    p.add_argument("--nvme-size", default="64M", help="size of each NVMe namespace (default 64M)")
    p.add_argument("--hugepage-size", default="2M", choices=["2M", "1G"])
    p.add_argument("--hugepages", type=int, default=64, help="hugepages to reserve (default 64)")
    p.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--accel", default="tcg", choices=["tcg", "kvm"], help="default tcg")
    p.add_argument("--bind", action="store_true", help="bind the NVMe controllers to vfio-pci")
    p.add_argument("--boot-timeout", type=float, default=180.0, help="seconds (default 180)")
    p.add_argument("--timeout", type=float, default=1800.0, help="whole run, seconds")
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
    return VmConfig(
        command=command,
        kernel=args.kernel,
        nvme=args.nvme,
        nvme_size=parse_size(args.nvme_size),
        hugepage_size=args.hugepage_size,
        hugepages=args.hugepages,
        memory=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        bind=args.bind,
        boot_timeout=args.boot_timeout,
        timeout=args.timeout,
        env=env,
    )
