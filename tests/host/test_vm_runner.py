"""`uvdma vm run`: its command line, its checks, and its supervisor with a stand-in vng.

The supervisor is tested with real processes (shell scripts standing in for vng, and
children of theirs standing in for QEMU), so the timeouts, the exit code, the output
streaming, the kill and the clean-up are the real code paths.  That the real VM boots
is proven by `tools/test` running the whole VM tier in it.
"""

from __future__ import annotations

import fcntl
import io
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvdma.cli import main
from uvdma.errors import VmError, VmTimeoutError
from uvdma.vm import runner as vm
from uvdma.vm._signals import Interrupted

_HOST_AVAILABLE = vm._host_available  # the real one, for the test of it


@pytest.fixture(autouse=True)
def _host_with_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command lines on every machine: --prealloc auto sees 16 GiB available."""
    monkeypatch.setattr(vm, "_host_available", lambda: 16 << 30)


def config(**kw: object) -> vm.VmConfig:
    cfg = vm.VmConfig(command=["pytest", "-m", "vm"], kernel=Path("/boot/vmlinuz-test"))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def qemu_opts(cmd: list[str]) -> list[str]:
    return shlex.split(next(a for a in cmd if a.startswith("--qemu-opts=")).split("=", 1)[1])


def test_parse_size() -> None:
    assert vm.parse_size("64M") == 64 << 20
    assert vm.parse_size("2g") == 2 << 30
    assert vm.parse_size("512") == 512
    # the kernel's memparse (uvdma._args): trailing text ignored, P and E suffixes, 0x
    assert vm.parse_size("1.5G") == 1 and vm.parse_size("1P") == 1 << 50
    assert vm.parse_size("0x10M") == 16 << 20
    for bad in ("lots", "-1G", "G"):
        with pytest.raises(VmError, match=r"K, M, G, T, P or E, e\.g\. 64M"):
            vm.parse_size(bad)
    with pytest.raises(VmError, match=r"past 2\*\*64"):
        vm.parse_size("9" * 40)


def test_command_line_has_the_known_good_shape() -> None:
    images = [Path("/tmp/a.img"), Path("/tmp/b.img")]
    cmd = vm.build_command(config(bind=True), "/venv/bin/vng", images)
    assert cmd[:5] == [
        "/venv/bin/vng",
        "-r",
        "/boot/vmlinuz-test",
        "--disable-microvm",
        "--force-9p",  # the rootflags are 9p's
    ]
    assert "--disable-kvm" in cmd  # TCG unless asked
    assert cmd[cmd.index("-m") + 1] == "2048M"
    assert cmd[cmd.index("--append") + 1] == (
        "intel_iommu=on hugepagesz=2M hugepages=64 rootflags=version=9p2000.L,trans=virtio,"
        "access=any,msize=512000,cache=loose"
    )
    qemu = qemu_opts(cmd)
    assert qemu[:4] == [
        "-machine",
        "q35,kernel-irqchip=split",
        "-device",
        "intel-iommu,intremap=on",
    ]
    assert qemu.count("-drive") == 2
    assert "file=/tmp/a.img,if=none,id=uvdmanvm0,format=raw" in qemu  # no throttling
    assert "nvme,serial=uvdma0001,drive=uvdmanvm1" in qemu
    script = cmd[cmd.index("--exec") + 1]
    assert script.startswith(f"echo {shlex.quote(vm.READY_MARKER)}; unset TMPDIR;")
    assert "export UVDMA_VM_NVME_IOPS=0,0;" in script
    assert "export UVDMA_VM_IOMMU=intel;" in script
    assert "-m uvdma.pci bind-nvme" in script
    assert script.endswith("exec pytest -m vm")


def test_kvm_and_1g_pages_on_request() -> None:
    cmd = vm.build_command(
        config(accel="kvm", hugepage_size="1G", hugepages=1, memory="4G"), "vng", []
    )
    assert "--disable-kvm" not in cmd
    assert "default_hugepagesz=1G hugepagesz=1G hugepages=1" in cmd[cmd.index("--append") + 1]


def test_tcg_guests_run_on_a_cpu_without_erms_and_kvm_keeps_its_own() -> None:
    # TCG runs `rep movsb` a byte per iteration: without ERMS the guest copies 8 at a time
    for iommu in ("intel", "none"):
        qemu = qemu_opts(vm.build_command(config(iommu=iommu), "vng", []))
        assert qemu[qemu.index("-cpu") + 1] == "max,-erms" and qemu.count("-cpu") == 1
    assert "-cpu" not in qemu_opts(vm.build_command(config(accel="kvm"), "vng", []))


def test_guest_ram_is_preallocated_only_when_the_host_has_it_to_spare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2 GiB guest: committed at start when 4 GiB are available, left lazy below that;
    # --prealloc on/off decide whatever the host has
    for available, want in ((4 << 30, True), ((4 << 30) - 1, False), (None, False)):
        monkeypatch.setattr(vm, "_host_available", lambda a=available: a)
        qemu = qemu_opts(vm.build_command(config(memory="2G"), "vng", []))
        assert ("-mem-prealloc" in qemu) is want, available
        for prealloc in ("on", "off"):
            qemu = qemu_opts(vm.build_command(config(memory="2G", prealloc=prealloc), "vng", []))
            assert ("-mem-prealloc" in qemu) is (prealloc == "on")


def test_available_memory_is_capped_by_the_memory_cgroup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vm, "_meminfo", lambda field: 20 << 30)
    for room, want in ((None, 20 << 30), (3 << 30, 3 << 30), (40 << 30, 20 << 30)):
        monkeypatch.setattr(vm, "_cgroup_room", lambda r=room: r)
        assert _HOST_AVAILABLE() == want


def test_a_bad_prealloc_is_refused() -> None:
    with pytest.raises(VmError, match="--prealloc must be auto, on or off"):
        config(prealloc="sometimes").check()


def test_nvme_iops_throttles_each_drive_in_creation_order() -> None:
    images = [Path(f"/t/{i}.img") for i in range(3)]
    cmd = vm.build_command(config(nvme=3, nvme_iops=[0, 0, 1]), "vng", images)
    drives = [a for a in qemu_opts(cmd) if a.startswith("file=")]
    assert drives == [
        "file=/t/0.img,if=none,id=uvdmanvm0,format=raw",
        "file=/t/1.img,if=none,id=uvdmanvm1,format=raw",
        "file=/t/2.img,if=none,id=uvdmanvm2,format=raw,throttling.iops-total=1",
    ]
    assert "export UVDMA_VM_NVME_IOPS=0,0,1;" in cmd[cmd.index("--exec") + 1]


@pytest.mark.parametrize(
    ("text", "nvme", "want"),
    [("5", 3, [5, 5, 5]), ("0,0,1", 3, [0, 0, 1]), (" 7 ", 1, [7]), ("0", 2, [0, 0])],
)
def test_parse_iops(text: str, nvme: int, want: list[int]) -> None:
    assert vm.parse_iops(text, nvme) == want


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1,2", "lists 2 values for 3 controllers"),
        ("-1", "whole numbers"),
        ("1.5", "whole numbers"),
        ("x", "whole numbers"),
        ("1,,2", "whole numbers"),
        ("9" * 17, "whole numbers"),
    ],
)
def test_parse_iops_refuses_nonsense(text: str, words: str) -> None:
    with pytest.raises(VmError, match=words):
        vm.parse_iops(text, 3)


def test_no_iommu_guest_has_no_vt_d_and_vfio_in_no_iommu_mode() -> None:
    cmd = vm.build_command(config(iommu="none"), "vng", [Path("/t/0.img")])
    qemu = qemu_opts(cmd)
    assert qemu[:2] == ["-machine", "q35"]
    assert not any("intel-iommu" in a for a in qemu)
    append = cmd[cmd.index("--append") + 1]
    assert append.startswith("vfio.enable_unsafe_noiommu_mode=1 hugepagesz=2M hugepages=64 ")
    assert "export UVDMA_VM_IOMMU=none;" in cmd[cmd.index("--exec") + 1]


def test_no_iommu_is_refused_with_a_kernel_without_vfio_noiommu(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz-6.1.0-56-amd64"
    image.write_bytes(b"kernel")
    (tmp_path / "config-6.1.0-56-amd64").write_text(
        "CONFIG_VFIO=m\n# CONFIG_VFIO_NOIOMMU is not set\n"
    )
    with pytest.raises(VmError, match=r"lacks.*use --kernel built"):
        vm.resolve_kernel(config(kernel=image, iommu="none"))
    (tmp_path / "config-6.1.0-56-amd64").write_text("CONFIG_VFIO=y\nCONFIG_VFIO_NOIOMMU=y\n")
    assert vm.resolve_kernel(config(kernel=image, iommu="none")) == image


def test_kernel_config_is_found_beside_built_and_tree_images(tmp_path: Path) -> None:
    built = tmp_path / "cache" / "bzImage"
    built.parent.mkdir()
    built.write_bytes(b"")
    (built.parent / "config").write_text("CONFIG_X=y\n")
    assert vm.kernel_config_of(built) == built.parent / "config"
    tree = tmp_path / "linux"
    image = tree / "arch/x86/boot/bzImage"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    (tree / ".config").write_text("CONFIG_X=y\n")
    assert vm.kernel_config_of(image) == tree / ".config"
    assert vm.kernel_config_of(tmp_path / "nothing-here") is None


def test_missing_kernel_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="no such file"):
        vm.resolve_kernel(config(kernel=tmp_path / "nope"))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"command": []}, "no command"),
        ({"kernel": "newest"}, "stock, built or a path"),
        ({"nvme": 9}, "between 0 and 8"),
        ({"nvme": -1}, "between 0 and 8"),
        ({"nvme_size": 4096}, "at least 1M|between 1M"),
        ({"nvme_size": 2 << 40}, "and 1T"),
        ({"nvme": 2, "nvme_iops": [1]}, "1 values for 2 controllers"),
        ({"nvme": 1, "nvme_iops": [-1]}, "between 0 and"),
        ({"hugepage_size": "4K"}, "2M or 1G"),
        ({"hugepages": -5}, "must not be negative"),
        ({"hugepages": 2, "hugepage_size": "1G"}, "raise --memory"),
        ({"hugepages": 1, "hugepage_size": "1G", "memory": "3G"}, "at least 4096M"),
        ({"hugepages": 1800}, "raise --memory to at least 4112M"),
        ({"memory": "1"}, "whole number of MiB"),
        ({"memory": "256M", "hugepages": 0}, "too little"),
        ({"memory": "64T"}, "more than this machine has"),
        ({"cpus": 0}, "between 1 and 64"),
        ({"cpus": 65}, "between 1 and 64"),
        ({"accel": "hvf"}, "tcg or kvm"),
        ({"iommu": "amd"}, "intel or none"),
        ({"boot_timeout": 0}, "positive"),
        ({"timeout": float("nan")}, "positive"),
        ({"timeout": float("inf")}, "positive"),
        ({"env": {"1A": "x"}}, "not a variable name"),
        ({"env": {"A;rm": "x"}}, "not a variable name"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(changes: dict[str, object], words: str) -> None:
    with pytest.raises(VmError, match=words):
        config(**changes).check()


def test_missing_kernel_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()))
    with pytest.raises(VmError, match="apt-get install linux-image-amd64"):
        vm.find_kernel()


def test_missing_qemu_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(VmError, match="apt-get install qemu-system-x86"):
        vm.find_tools("tcg")


def test_kernel_choice_is_the_newest_version(tmp_path: Path) -> None:
    keys = sorted(
        ["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.12.0-1-amd64", "vmlinuz-6.1.0-56-amd64"],
        key=lambda n: vm._version_key(Path(n)),
    )
    assert keys[-1] == "vmlinuz-6.12.0-1-amd64"
    assert keys[0] == "vmlinuz-6.1.0-9-amd64"


# -- --accel kvm on a host whose KVM cannot boot a stock kernel -----------------------------


def fake_host(tmp_path: Path, *, pvm: bool, flags: str) -> tuple[Path, Path, str]:
    sysfs = tmp_path / "sys"
    (sysfs / "module").mkdir(parents=True)
    if pvm:
        (sysfs / "module/kvm_pvm").mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu {flags} hypervisor\n")
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    return sysfs, cpuinfo, str(dev)


def test_kvm_pvm_is_named_as_the_reason(tmp_path: Path) -> None:
    why = vm.kvm_problem(*fake_host(tmp_path, pvm=True, flags="sse2"))
    assert why is not None and "kvm-pvm" in why and "MSR 0x10a" in why


def test_kvm_without_vmx_or_svm_is_refused(tmp_path: Path) -> None:
    why = vm.kvm_problem(*fake_host(tmp_path, pvm=False, flags="sse2"))
    assert why is not None and "neither the vmx nor the svm flag" in why


def test_hardware_kvm_is_accepted(tmp_path: Path) -> None:
    assert vm.kvm_problem(*fake_host(tmp_path, pvm=False, flags="vmx sse2")) is None
    assert vm.kvm_problem(*fake_host(tmp_path / "amd", pvm=False, flags="svm")) is None


def test_kvm_pvm_is_named_even_when_dev_kvm_is_not_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    why = vm.kvm_problem(*fake_host(tmp_path, pvm=True, flags="sse2"))
    assert why is not None and "kvm-pvm" in why


def test_an_unwritable_dev_kvm_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    why = vm.kvm_problem(*fake_host(tmp_path, pvm=False, flags="vmx"))
    assert why is not None and "add it to group kvm" in why


def test_missing_dev_kvm_is_refused(tmp_path: Path) -> None:
    sysfs, cpuinfo, _ = fake_host(tmp_path, pvm=False, flags="vmx")
    why = vm.kvm_problem(sysfs, cpuinfo, str(tmp_path / "absent"))
    assert why is not None and "there is no" in why


def test_accel_kvm_refuses_at_once_without_booting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(vm, "kvm_problem", lambda: "this host's /dev/kvm is kvm-pvm")
    monkeypatch.setattr(subprocess, "Popen", no_boot)
    t0 = time.monotonic()
    assert main(["vm", "run", "--accel", "kvm", "--", "true"]) == 1
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert "--accel kvm cannot work here: this host's /dev/kvm is kvm-pvm" in err
    assert "use --accel tcg" in err


def no_boot(*args: object, **kw: object) -> None:
    raise AssertionError(f"the VM was started: {args}")


# -- the supervisor, with shell scripts standing in for vng -----------------------------


def fake_vng(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "vng"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return [str(script)]


def supervise(cmd: list[str], **kw: object) -> tuple[int, str]:
    out = io.StringIO()
    rc = vm._supervise(cmd, dict(os.environ), config(**kw), out)
    return rc, out.getvalue()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie that its (dead) parent never reaped counts as gone
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_streams_output_hides_the_marker_and_returns_the_code(tmp_path: Path) -> None:
    cmd = fake_vng(tmp_path, f"echo booting; echo '{vm.READY_MARKER}'; echo hello; exit 7")
    rc, out = supervise(cmd)
    assert rc == 7
    assert out == "booting\nhello\n"


def test_boot_timeout_fires_and_kills_the_vm(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    cmd = fake_vng(tmp_path, f"echo $$ > {pidfile}; exec sleep 60")
    t0 = time.monotonic()
    with pytest.raises(VmTimeoutError, match="boot timeout"):
        supervise(cmd, boot_timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert gone(int(pidfile.read_text()))


def test_run_timeout_fires_after_boot(tmp_path: Path) -> None:
    cmd = fake_vng(tmp_path, f"echo '{vm.READY_MARKER}'; exec sleep 60")
    with pytest.raises(VmTimeoutError, match="run timeout"):
        supervise(cmd, boot_timeout=30.0, timeout=1.5)


def test_vm_that_dies_before_the_guest_is_an_error(tmp_path: Path) -> None:
    cmd = fake_vng(tmp_path, "echo 'qemu: could not load kernel' >&2; exit 1")
    with pytest.raises(VmError, match=r"exited \(code 1\) before the guest ran"):
        supervise(cmd)


def test_a_helper_left_holding_the_output_does_not_keep_the_run_alive(tmp_path: Path) -> None:
    # vng exits, but a daemon it started (virtiofsd, say) still has its stdout.
    pidfile = tmp_path / "daemon"
    cmd = fake_vng(tmp_path, f"echo '{vm.READY_MARKER}'; sleep 60 & echo $! > {pidfile}; exit 3")
    t0 = time.monotonic()
    rc, _ = supervise(cmd, timeout=30.0)
    assert rc == 3
    assert time.monotonic() - t0 < 10
    assert wait_gone(int(pidfile.read_text()))


# -- a whole `uvdma vm run` with a stand-in vng: temporary files, Ctrl-C, SIGTERM ----------

# What the stand-in does, like vng and QEMU: files in $TMPDIR (virtme_ret*, a virtiofsd
# socket), a child in its process group standing in for QEMU, then the guest's marker.
VNG_BODY = """
set -e
echo "$TMPDIR" > {state}/tmpdir
mktemp "${{TMPDIR:-/tmp}}/virtme_retXXXXXXXX" > {state}/files
mktemp "${{TMPDIR:-/tmp}}/virtmeXXXXXXXX" >> {state}/files
for a in "$@"; do case "$a" in --qemu-opts=*) echo "$a" > {state}/qemu-opts;; esac; done
sleep 60 &
echo $! > {state}/qemu
echo booting
{after_boot}
"""


@pytest.fixture
def temp_parent(tmp_path: Path) -> Iterator[Path]:
    """A private temporary directory standing in for /tmp, for the run's files."""
    parent = tmp_path / "tmp"
    parent.mkdir()
    old = tempfile.tempdir
    tempfile.tempdir = str(parent)
    try:
        yield parent
    finally:
        tempfile.tempdir = old


def stand_in(tmp_path: Path, after_boot: str) -> tuple[str, Path]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    body = VNG_BODY.format(state=state, after_boot=after_boot)
    return fake_vng(tmp_path, body)[0], state


def patch_tools(monkeypatch: pytest.MonkeyPatch, vng: str) -> None:
    monkeypatch.setattr(vm, "find_tools", lambda accel: vng)
    monkeypatch.setattr(vm, "find_kernel", lambda: Path("/boot/vmlinuz-test"))


def assert_all_cleaned(state: Path, parent: Path) -> None:
    assert wait_gone(int((state / "qemu").read_text())), "the VM outlived the run"
    files = (state / "files").read_text().split()
    assert files and all(not Path(f).exists() for f in files), files
    assert list(parent.iterdir()) == [], "files left in the temporary directory"


def test_files_of_vng_are_made_in_the_run_directory_and_removed(
    tmp_path: Path, temp_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vng, state = stand_in(tmp_path, f"echo '{vm.READY_MARKER}'; echo done; exit 0")
    patch_tools(monkeypatch, vng)
    out = io.StringIO()
    assert vm.run(config(kernel="stock", command=["true"]), out) == 0
    assert out.getvalue() == "booting\ndone\n"
    assert (state / "tmpdir").read_text().strip().startswith(str(temp_parent / "uvdma-vm-"))
    assert_all_cleaned(state, temp_parent)


def test_a_boot_timeout_leaves_no_vm_and_no_file(
    tmp_path: Path, temp_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vng, state = stand_in(tmp_path, "sleep 60")
    patch_tools(monkeypatch, vng)
    with pytest.raises(VmTimeoutError, match="boot timeout"):
        vm.run(config(kernel="stock", command=["true"], boot_timeout=1.5), io.StringIO())
    assert_all_cleaned(state, temp_parent)


def test_an_interrupt_leaves_no_vm_and_no_file(
    tmp_path: Path, temp_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vng, state = stand_in(tmp_path, f"echo '{vm.READY_MARKER}'; sleep 60")

    class Interrupting(io.StringIO):
        def write(self, s: str) -> int:
            if "booting" in s:
                raise KeyboardInterrupt  # as Ctrl-C would, while the VM runs
            return super().write(s)

    patch_tools(monkeypatch, vng)
    with pytest.raises(KeyboardInterrupt):
        vm.run(config(kernel="stock", command=["true"]), Interrupting())
    assert_all_cleaned(state, temp_parent)


def test_a_closed_output_pipe_stops_the_vm_and_cleans_up(
    tmp_path: Path, temp_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vng, state = stand_in(tmp_path, f"echo '{vm.READY_MARKER}'; sleep 60")

    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    patch_tools(monkeypatch, vng)
    with pytest.raises(BrokenPipeError):
        vm.run(config(kernel="stock", command=["true"]), Closed())
    assert_all_cleaned(state, temp_parent)


RUNNER = """
import sys, tempfile
from pathlib import Path
tempfile.tempdir = {parent!r}
try:
    from uvdma.vm import runner
except ImportError:  # the runner before it became a package, to show what it left behind
    from uvdma import vm as runner
runner.find_tools = lambda accel: {vng!r}
runner.find_kernel = lambda: Path("/boot/vmlinuz-test")
from uvdma.cli import main
sys.exit(main(["vm", "run", "--nvme", "1", "--", "true"]))
"""


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_ctrl_c_sigterm_and_sighup_stop_the_vm_and_remove_its_files(
    tmp_path: Path, temp_parent: Path, signum: int, code: int
) -> None:
    """`uvdma vm run` as a user runs it, stopped by a signal in the middle of the run."""
    vng, state = stand_in(tmp_path, f"echo '{vm.READY_MARKER}'; echo guest-running; sleep 60")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER.format(parent=str(temp_parent), vng=vng)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "booting\n"
    assert proc.stdout.readline() == "guest-running\n"
    proc.send_signal(signum)
    rc = proc.wait(timeout=20)
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == code, err
    assert f"uvdma: interrupted ({signal.Signals(signum).name})" in err
    assert "Traceback" not in err
    assert_all_cleaned(state, temp_parent)


def test_interrupts_are_held_back_during_a_critical_section() -> None:
    from uvdma.vm._signals import interrupts_deferred  # noqa: PLC0415

    done = []
    with pytest.raises(Interrupted) as info, interrupts_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        done.append("the critical section finished")
    assert done == ["the critical section finished"]
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# -- run directories of runs that were killed outright ---------------------------------------


def test_the_next_run_removes_the_directory_of_a_killed_run(tmp_path: Path) -> None:
    # A run killed with SIGKILL cannot clean up: its lock is released by the kernel.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from pathlib import Path
                from uvdma.vm import runner
                with runner.run_dir(Path({str(tmp_path)!r})) as d:
                    (d / "nvme0.img").write_bytes(b"x")
                    print(d, flush=True)
                    time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    killed = Path(child.stdout.readline().strip())
    with vm.run_dir(tmp_path) as alive:
        foreign = tmp_path / "uvdma-vm-notours"
        foreign.mkdir()  # no owner.lock: not a run directory of this kind
        assert vm.sweep_stale_run_dirs(tmp_path) == []  # the killed one still lives
        child.kill()
        child.wait()
        assert vm.sweep_stale_run_dirs(tmp_path) == [killed]
        assert not killed.exists()
        assert alive.exists() and foreign.exists()
    assert not alive.exists()


def test_run_directory_is_locked_while_in_use(tmp_path: Path) -> None:
    with vm.run_dir(tmp_path) as d:
        fd = os.open(d / "owner.lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_an_unwritable_temporary_directory_is_a_clear_error(
    tmp_path: Path, temp_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vng, _ = stand_in(tmp_path, "exit 0")
    patch_tools(monkeypatch, vng)

    def full(self: Path, *a: object, **kw: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "open", full)
    monkeypatch.setattr(subprocess, "Popen", no_boot)
    with pytest.raises(VmError, match="No space left on device; free space in"):
        vm.run(config(kernel="stock", command=["true"]), io.StringIO())
    assert list(temp_parent.iterdir()) == []


def test_a_full_or_read_only_temporary_directory_is_a_clear_error(tmp_path: Path) -> None:
    with (
        pytest.raises(VmError, match=r"creating the VM's directory in .*point TMPDIR"),
        vm.run_dir(tmp_path / "missing"),
    ):
        pass


def test_a_second_signal_does_not_cut_short_the_clean_up_of_the_first() -> None:
    # `kill -TERM -- -PGID` on `timeout uvdma vm run`: the runner gets SIGTERM twice (from the
    # group kill and from timeout forwarding its own); the second must not interrupt the
    # except clause that kills the VM (it did: QEMU was left running)
    from uvdma.vm._signals import signals_as_interrupts  # noqa: PLC0415

    cleaned = False
    with pytest.raises(Interrupted), signals_as_interrupts():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises before this ends
        except Interrupted:
            os.kill(os.getpid(), signal.SIGTERM)  # the second one, during the clean-up
            time.sleep(0.05)
            cleaned = True
            raise
    assert cleaned
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored afterwards
