"""`uvdma vm kernel`: the config fragment, the cache, and the build's orchestration.

The orchestration runs for real (tar, the lock, the process groups, the progress line,
the publication of the result) with stand-ins for dpkg-query, apt-get and make on PATH,
so failures, interrupts and concurrent builds are the real code paths.  That the fragment
builds a kernel that boots with iommufd and no-IOMMU mode is proven by booting it
(tests/vm, `uvdma vm run --kernel built`).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from uvdma.errors import KernelBuildError
from uvdma.vm import kernel
from uvdma.vm.kernel import KernelSource

FRAGMENT = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S="-uvdma"\n'

# -- the fragment -------------------------------------------------------------------------


def test_merge_sets_every_option_of_the_fragment() -> None:
    base = "CONFIG_A=m\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=y\n"
    merged = kernel.merge_config(base, FRAGMENT)
    assert merged == (
        '# CONFIG_C is not set\nCONFIG_D=y\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S="-uvdma"\n'
    )


def test_mismatches_name_what_kconfig_dropped() -> None:
    final = "CONFIG_A=y\nCONFIG_B=y\n"
    assert kernel.config_mismatches(final, FRAGMENT) == [
        "CONFIG_B=n (the config has y)",
        'CONFIG_S="-uvdma" (the config has not set)',
    ]
    assert kernel.config_mismatches('CONFIG_A=y\nCONFIG_S="-uvdma"\n', FRAGMENT) == []


def test_the_shipped_fragment_asks_for_what_the_stock_kernels_lack() -> None:
    options = kernel.fragment_options(kernel.fragment_text())
    for name in (
        "IOMMUFD",
        "VFIO",
        "VFIO_GROUP",
        "VFIO_CONTAINER",
        "VFIO_IOMMU_TYPE1",
        "VFIO_DEVICE_CDEV",
        "VFIO_NOIOMMU",
        "VFIO_PCI",
        "INTEL_IOMMU",
        "IRQ_REMAP",
        "BLK_DEV_NVME",
        "HUGETLBFS",
        "NET_9P_VIRTIO",
        "9P_FS",
    ):
        assert options[f"CONFIG_{name}"] == "y", name
    for name in ("IOMMUFD_VFIO_CONTAINER", "MODULES", "DRM", "SOUND", "USB_SUPPORT", "EFI"):
        assert options[f"CONFIG_{name}"] == "n", name


def test_cache_key_follows_the_source_version_and_the_fragment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel.cache_root() == tmp_path / "uvdma" / "kernel"
    assert kernel.cache_key("6.12.117-1~deb12u1", "abc") == "linux-6.12.117-1_deb12u1-abc"
    assert kernel.fragment_hash("x") != kernel.fragment_hash("y")
    assert len(kernel.fragment_hash()) == 12


# -- the build, with stand-ins for dpkg-query, apt-get and make ----------------------------

FAKE_DPKG_QUERY = """#!/bin/sh
for a; do pkg="$a"; done
grep -qx "$pkg" "$FAKE_STATE/installed" 2>/dev/null || exit 1
printf 'install ok installed\\t6.12.117-1~deb12u1'
"""

FAKE_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$FAKE_STATE/apt.calls"
[ -f "$FAKE_STATE/apt-fails" ] && { echo "E: Unable to locate package $*"; exit 100; }
if [ "$3" = install ]; then
    for a; do case "$a" in -*|install) ;; *) echo "$a" >> "$FAKE_STATE/installed";; esac; done
fi
exit 0
"""

FAKE_MAKE = """#!/bin/sh
for a; do case "$a" in -j*) ;; *) target="$a";; esac; done
echo "make $target $$" >> "$FAKE_STATE/make.calls"
case "$target" in
x86_64_defconfig) printf 'CONFIG_A=m\\nCONFIG_B=y\\nCONFIG_Z=y\\n' > .config ;;
olddefconfig) [ -f "$FAKE_STATE/drop" ] && sed -i "/$(cat "$FAKE_STATE/drop")/d" .config; true ;;
bzImage)
    echo $$ > "$FAKE_STATE/make.pid"
    mktemp "${TMPDIR:-/tmp}/ccXXXXXX.s" > "$FAKE_STATE/cc.tmp"  # as gcc -pipe-less does
    [ -f "$FAKE_STATE/make-fails" ] && { cat "$FAKE_STATE/make-fails"; exit 2; }
    i=0
    while [ $i -lt "${FAKE_STEPS:-4}" ]; do
        echo "  CC      kernel/f$i.o"; i=$((i + 1)); sleep "${FAKE_SLEEP:-0}"
    done
    mkdir -p arch/x86/boot && echo "bzImage of $$" > arch/x86/boot/bzImage ;;
*) echo "fake make: unknown target $target"; exit 2 ;;
esac
"""


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A machine with stand-in build tools; returns the state directory."""
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("dpkg-query", FAKE_DPKG_QUERY),
        ("apt-get", FAKE_APT_GET),
        ("make", FAKE_MAKE),
    ):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    src = tmp_path / "src"
    (src / "linux-source-6.12").mkdir(parents=True)
    (src / "linux-source-6.12/Makefile").write_text("# the kernel's\n")
    tarball = tmp_path / "linux-source-6.12.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(src / "linux-source-6.12", arcname="linux-source-6.12")
    (state / "installed").write_text("\n".join(KernelSource().build_packages) + "\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STATE", str(state))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel, "SOURCE", KernelSource(tarball=tarball))
    monkeypatch.setattr(kernel, "fragment_text", lambda: FRAGMENT)
    monkeypatch.setattr(kernel, "EXPECTED_STEPS", 4)
    yield state


def root(state: Path) -> Path:
    return state.parent / "cache/uvdma/kernel"


def make_calls(state: Path) -> list[str]:
    path = state / "make.calls"
    return [ln.rsplit(" ", 1)[0] for ln in path.read_text().splitlines()] if path.exists() else []


def test_builds_once_then_uses_the_cache(fake_build: Path) -> None:
    out = io.StringIO()
    image = kernel.build(out)
    r = root(fake_build)
    key = kernel.cache_key("6.12.117-1~deb12u1", kernel.fragment_hash(FRAGMENT))
    assert image == r / key / "bzImage"
    assert image.read_text().startswith("bzImage of ")
    assert kernel.fragment_options((image.parent / "config").read_text()) == {
        "CONFIG_Z": "y",
        "CONFIG_A": "y",
        "CONFIG_B": "n",
        "CONFIG_S": '"-uvdma"',
    }
    assert "make bzImage" in (image.parent / "build.log").read_text()
    assert sorted(p.name for p in r.iterdir()) == [".lock", key]  # no tree, no stray log
    assert make_calls(fake_build) == ["make x86_64_defconfig", "make olddefconfig", "make bzImage"]
    text = out.getvalue()
    assert "building the guest kernel from linux-source-6.12 6.12.117-1~deb12u1" in text
    assert "compiling:" in text and f"built {image}" in text
    assert kernel.cached_kernel() == image
    assert kernel.ensure_built(io.StringIO()) == image
    assert kernel.build(io.StringIO()) == image
    assert len(make_calls(fake_build)) == 3  # nothing built again


def test_a_new_fragment_builds_anew(fake_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = kernel.build(io.StringIO())
    monkeypatch.setattr(kernel, "fragment_text", lambda: FRAGMENT + "CONFIG_Z=y\n")
    assert kernel.cached_kernel() is None
    second = kernel.build(io.StringIO())
    assert second != first and first.exists() and second.exists()


def test_progress_on_a_pipe_is_a_line_every_so_often(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STEPS", "6")
    monkeypatch.setenv("FAKE_SLEEP", "0.2")
    monkeypatch.setattr(kernel, "PROGRESS_EVERY", 0.5)
    out = io.StringIO()
    kernel.build(out)
    lines = [ln for ln in out.getvalue().splitlines() if "compiling" in ln]
    assert 1 <= len(lines) <= 4, lines  # 1.2 s of compiling, a line at most every 0.5 s
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("uvdma vm kernel: compiling: 1 steps (about 25%), 0:0")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line(fake_build: Path) -> None:
    out = Tty()
    kernel.build(out)
    text = out.getvalue()
    assert "\r\033[Kuvdma vm kernel: unpacking the source" in text
    assert "\nuvdma vm kernel: built " in text  # the status line is ended first


def test_a_failed_make_says_so_keeps_its_log_and_nothing_else(fake_build: Path) -> None:
    (fake_build / "make-fails").write_text("kernel/fork.c:42: error: expected ';'\n")
    with pytest.raises(KernelBuildError) as info:
        kernel.build(io.StringIO())
    msg = str(info.value)
    assert msg.startswith("make bzImage failed (exit 2):")
    assert "kernel/fork.c:42: error: expected ';'" in msg
    assert "report it with the log" in msg
    logs = list(root(fake_build).glob("*.log"))
    assert len(logs) == 1 and f"the whole log: {logs[0]}" in msg
    assert not list(root(fake_build).glob("*.partial"))
    assert kernel.cached_kernel() is None
    (fake_build / "make-fails").unlink()
    assert kernel.build(io.StringIO()).is_file()  # and the next try builds


def test_a_full_disk_during_the_build_says_what_to_free(fake_build: Path) -> None:
    (fake_build / "make-fails").write_text(
        "  CC      fs/ext4/inode.o\nfs/ext4/inode.o: No space left on device\n"
    )
    with pytest.raises(KernelBuildError, match=r"the disk is full: free about 3 GB in .*XDG_"):
        kernel.build(io.StringIO())
    assert not list(root(fake_build).glob("*.partial"))


def test_too_little_space_is_refused_before_starting(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    with pytest.raises(KernelBuildError, match=r"needs about 3 GB free in .* which has 0.0 GB"):
        kernel.build(io.StringIO())
    assert make_calls(fake_build) == []


def test_an_option_kconfig_drops_is_an_error(fake_build: Path) -> None:
    (fake_build / "drop").write_text("CONFIG_A")
    with pytest.raises(KernelBuildError, match=r"dropped options .*: CONFIG_A=y \(the config"):
        kernel.build(io.StringIO())


def test_missing_packages_are_installed_as_root(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_build / "installed").write_text("build-essential\nbc\n")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    out = io.StringIO()
    kernel.build(out)
    calls = (fake_build / "apt.calls").read_text().splitlines()
    assert calls == [
        "apt-get -o DPkg::Lock::Timeout=600 update -q",
        "apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "
        "linux-source-6.12 flex bison libelf-dev libssl-dev",
    ]
    assert "installing Debian packages: linux-source-6.12 flex bison" in out.getvalue()


def test_missing_packages_without_root_name_the_command(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_build / "installed").write_text("build-essential\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(KernelBuildError, match=r"as root \(`apt-get install linux-source-6.12"):
        kernel.build(io.StringIO())
    assert not (fake_build / "apt.calls").exists()


def test_a_failed_apt_get_is_an_error_with_its_output(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_build / "installed").write_text("")
    (fake_build / "apt-fails").write_text("")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(KernelBuildError) as info:
        kernel.build(io.StringIO())
    assert str(info.value).startswith("apt-get update failed (exit 100):")
    assert "E: Unable to locate package" in str(info.value)
    assert "check the network" in str(info.value)
    assert make_calls(fake_build) == []


def test_a_missing_tool_is_named(tmp_path: Path) -> None:
    with (
        (tmp_path / "log").open("wb") as log,
        pytest.raises(
            KernelBuildError, match=r"^uvdma-no-such-tool is not installed: `apt-get install"
        ),
    ):
        kernel._run_logged(["uvdma-no-such-tool", "bzImage"], log)


def test_an_unwritable_cache_is_a_clear_error(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = fake_build.parent / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(KernelBuildError, match=r"creating the kernel cache .*XDG_CACHE_HOME"):
        kernel.build(io.StringIO())


def test_a_killed_build_leaves_a_tree_the_next_build_removes(fake_build: Path) -> None:
    r = root(fake_build)
    r.mkdir(parents=True)
    stale = r / "linux-6.12.117-1_deb12u1-0123456789ab.partial"
    (stale / "linux-source-6.12").mkdir(parents=True)
    kernel.build(io.StringIO())
    assert not stale.exists()


# -- as a user runs it: two at once, Ctrl-C -------------------------------------------------

CLI = """
import sys
from pathlib import Path
from types import SimpleNamespace
from uvdma.vm import kernel
kernel.SOURCE = kernel.KernelSource(tarball=Path({tarball!r}))
kernel.fragment_text = lambda: {fragment!r}
kernel.EXPECTED_STEPS = 4
kernel.PROGRESS_EVERY = 0.2
from uvdma.cli import main
sys.exit(main(["vm", "kernel"]))
"""


def spawn(state: Path) -> subprocess.Popen[str]:
    code = CLI.format(tarball=str(state.parent / "linux-source-6.12.tar.xz"), fragment=FRAGMENT)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_at_once_build_once_and_both_print_the_kernel(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STEPS", "10")
    monkeypatch.setenv("FAKE_SLEEP", "0.2")
    first = spawn(fake_build)
    wait_for(fake_build / "make.pid")
    second = spawn(fake_build)
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert out1 == out2 and out1.strip().endswith("/bzImage")
    assert "is building the guest kernel; waiting for it to finish" in err2
    assert f"(pid {first.pid})" in err2
    assert [c for c in make_calls(fake_build) if c == "make bzImage"] == ["make bzImage"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_build_stops_make_and_leaves_nothing_half_made(
    fake_build: Path, monkeypatch: pytest.MonkeyPatch, signum: int, code: int
) -> None:
    monkeypatch.setenv("FAKE_STEPS", "200")
    monkeypatch.setenv("FAKE_SLEEP", "0.1")
    proc = spawn(fake_build)
    wait_for(fake_build / "make.pid")
    time.sleep(0.3)
    make_pid = int((fake_build / "make.pid").read_text())
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert f"uvdma: interrupted ({signal.Signals(signum).name})" in err
    assert "stopped: removing the partial build tree" in err
    assert "Traceback" not in err
    with pytest.raises(ProcessLookupError):
        os.kill(make_pid, 0)
    compiler_tmp = Path((fake_build / "cc.tmp").read_text().strip())
    assert compiler_tmp.name.startswith("cc") and not compiler_tmp.exists()
    r = root(fake_build)
    assert not list(r.glob("*.partial"))
    assert kernel.cached_kernel() is None
    monkeypatch.setenv("FAKE_STEPS", "2")
    monkeypatch.setenv("FAKE_SLEEP", "0")
    assert kernel.build(io.StringIO()).is_file()  # the lock was released
