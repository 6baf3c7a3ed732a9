"""`uvdma vm run`: its command line, its checks, and its supervisor with a stand-in vng.

The supervisor is tested with real processes (shell scripts standing in for vng), so
the timeouts, the exit code and the output streaming are the real code paths.  That
the real VM boots is proven by `tools/test` running the whole VM tier in it.
"""

from __future__ import annotations

import io
import os
import shlex
import time
from pathlib import Path

import pytest

from uvdma import vm
from uvdma.cli import main
from uvdma.errors import VmError, VmTimeoutError


def config(**kw: object) -> vm.VmConfig:
    cfg = vm.VmConfig(command=["pytest", "-m", "vm"], kernel=Path("/boot/vmlinuz-test"))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_parse_size() -> None:
    assert vm.parse_size("64M") == 64 << 20
    assert vm.parse_size("2g") == 2 << 30
    assert vm.parse_size("512") == 512
    with pytest.raises(VmError, match="K, M, G or T"):
        vm.parse_size("lots")


def test_command_line_has_the_known_good_shape() -> None:
    images = [Path("/tmp/a.img"), Path("/tmp/b.img")]
    cmd = vm.build_command(config(bind=True), "/venv/bin/vng", images)
    assert cmd[:4] == ["/venv/bin/vng", "-r", "/boot/vmlinuz-test", "--disable-microvm"]
    assert "--disable-kvm" in cmd  # TCG unless asked
    assert cmd[cmd.index("--append") + 1] == "intel_iommu=on hugepagesz=2M hugepages=64"
    qemu = shlex.split(next(a for a in cmd if a.startswith("--qemu-opts=")).split("=", 1)[1])
    assert qemu[:4] == [
        "-machine",
        "q35,kernel-irqchip=split",
        "-device",
        "intel-iommu,intremap=on",
    ]
    assert qemu.count("-drive") == 2
    assert "nvme,serial=uvdma0001,drive=uvdmanvm1" in qemu
    script = cmd[cmd.index("--exec") + 1]
    assert script.startswith(f"echo {shlex.quote(vm.READY_MARKER)}")
    assert "-m uvdma.pci bind-nvme" in script
    assert script.endswith("exec pytest -m vm")


def test_kvm_and_1g_pages_on_request() -> None:
    cmd = vm.build_command(
        config(accel="kvm", hugepage_size="1G", hugepages=1, memory="4G"), "vng", []
    )
    assert "--disable-kvm" not in cmd
    assert "default_hugepagesz=1G hugepagesz=1G hugepages=1" in cmd[cmd.index("--append") + 1]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"command": []}, "no command"),
        ({"nvme": 9}, "between 0 and 8"),
        ({"nvme_size": 4096}, "at least 1M"),
        ({"hugepage_size": "4K"}, "2M or 1G"),
        ({"hugepages": 2, "hugepage_size": "1G"}, "raise --memory"),
        ({"hugepages": 1, "hugepage_size": "1G", "memory": "3G"}, "at least 4096M"),
        ({"hugepages": 1800}, "raise --memory to at least 4112M"),
        ({"accel": "hvf"}, "tcg or kvm"),
        ({"boot_timeout": 0}, "positive"),
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
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_run_timeout_fires_after_boot(tmp_path: Path) -> None:
    cmd = fake_vng(tmp_path, f"echo '{vm.READY_MARKER}'; exec sleep 60")
    with pytest.raises(VmTimeoutError, match="run timeout"):
        supervise(cmd, boot_timeout=30.0, timeout=1.5)


def test_vm_that_dies_before_the_guest_is_an_error(tmp_path: Path) -> None:
    cmd = fake_vng(tmp_path, "echo 'qemu: could not load kernel' >&2; exit 1")
    with pytest.raises(VmError, match=r"exited \(code 1\) before the guest ran"):
        supervise(cmd)


def test_cli_reports_errors_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vm", "run", "--nvme", "12", "--", "true"]) == 1
    assert "between 0 and 8" in capsys.readouterr().err
