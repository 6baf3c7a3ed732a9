"""The `uvdma` command as a user meets it: nonsense arguments, closed pipes, interrupts,
unexpected errors and the hugepage reservation limits.  No input prints a traceback.

Hugepage reservations run against a stand-in sysfs and /proc/meminfo; that the real
kernel is protected the same way is proven in tests/vm/test_cli_robust.py.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from uvdma import cli, doctor
from uvdma.errors import UvdmaError, UvdmaOSError
from uvdma.memory import hugepages as hp

MiB = 1 << 20


def uvdma(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uvdma.cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        timeout=120,
    )


def no_boot(*args: object, **kw: object) -> None:
    raise AssertionError(f"a process was started: {args}")


# -- argument checking: refused before anything starts ------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["vm", "run", "--hugepages", "-5"], "--hugepages: must be between 0 and"),
        (["vm", "run", "--cpus", "0"], "--cpus: must be between 1 and 64, not 0"),
        (["vm", "run", "--cpus", "two"], "--cpus: 'two' is not a whole number"),
        (["vm", "run", "--nvme", "-1"], "--nvme: must be between 0 and 8, not -1"),
        (["vm", "run", "--nvme", "1e3"], "--nvme: '1e3' is not a whole number"),
        (["vm", "run", "--memory", "1"], "--memory: must be between 512M"),
        (["vm", "run", "--memory", "64T"], "--memory: must be between 512M and 1024G"),
        (["vm", "run", "--memory", "lots"], "--memory: cannot read the size 'lots'"),
        (["vm", "run", "--nvme-size", "1P"], "--nvme-size: must be between 1M and 1024G, not 1P"),
        (["vm", "run", "--nvme-size", "4K"], "--nvme-size: must be between 1M"),
        (["vm", "run", "--boot-timeout", "nan"], "--boot-timeout: must be more than 0"),
        (["vm", "run", "--timeout", "inf"], "--timeout: must be more than 0"),
        (["vm", "run", "--timeout", "-1"], "--timeout: must be more than 0"),
        (["vm", "run", "--timeout", "soon"], "--timeout: 'soon' is not a number of seconds"),
        (["vm", "run", "--iommu", "amd"], "--iommu: invalid choice: 'amd'"),
        (["vm", "kernel", "--jobs", "0"], "--jobs: must be between 1 and"),
        (["hugepages", "--count", "abc"], "--count: 'abc' is not a whole number"),
        (["hugepages", "--count", "-1"], "--count: must be between 0 and"),
        (["hugepages", "--count", "1e3"], "--count: '1e3' is not a whole number"),
        (["hugepages", "--count", "9" * 23], "--count: must be between 0 and"),
        (["hugepages", "--count", "9" * 100], "--count: '99999"),
        (["bench", "map", "--seconds", "-1"], "--seconds: must be above 0 and at most 3600"),
        (["bench", "map", "--seconds", "1e309"], "--seconds: must be above 0"),
        (["bench", "map", "--seconds", "soon"], "--seconds: 'soon' is not a number of seconds"),
    ],
)
def test_nonsense_arguments_are_refused_with_a_message(
    argv: list[str],
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(subprocess, "Popen", no_boot)
    monkeypatch.setattr(hp, "reserve_hugepages", no_boot)
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--", "true"] if argv[0] == "vm" and argv[1] == "run" else argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--nvme", "2", "--nvme-iops", "1,2,3"], "lists 3 values for 2 controllers"),
        (["--nvme-iops", "fast"], "--nvme-iops takes whole numbers"),
        (["--nvme", "0", "--nvme-iops", "5"], "--nvme 0 asks for none"),
        (["--hugepages", "2000"], "raise --memory to at least"),
        (["--memory", "600M", "--hugepages", "64"], "raise --memory to at least 640M"),
        (["--env", "A B=1"], "not a variable name"),
        (["--env", "novalue"], "--env takes KEY=VALUE"),
        (["--kernel", "/nonexistent/bzImage"], "no such file"),
    ],
)
def test_impossible_vm_settings_are_refused_before_booting(
    argv: list[str],
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(subprocess, "Popen", no_boot)
    assert cli.main(["vm", "run", *argv, "--", "true"]) == 1
    err = capsys.readouterr().err
    assert words in err
    assert err.count("\n") == 1  # one line, no traceback


# -- closed pipes, interrupts and the unexpected --------------------------------------------


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    # `uvdma list --json | head -c 1`, with the reader gone before the first write.
    r, w = os.pipe()
    os.close(r)
    try:
        got = uvdma("list", "--json", stdout=w)
    finally:
        os.close(w)
    assert got.returncode == 128 + signal.SIGPIPE
    assert got.stderr == ""


def test_a_real_pipeline_to_head_prints_no_traceback() -> None:
    shell = f"{sys.executable} -m uvdma.cli list --json | head -c 1"
    got = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, check=False, timeout=120
    )
    assert got.stdout in ("", "[")
    assert got.stderr == ""


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (KeyboardInterrupt(), 130, "uvdma: interrupted (SIGINT)"),
        (UvdmaError("the device is gone: rebind it"), 1, "uvdma: the device is gone: rebind it"),
        (OSError(errno.EIO, "Input/output error"), 1, "uvdma: [Errno 5] Input/output error"),
        (ValueError("oops"), 1, "unexpected error (a bug: please report it"),
    ],
)
def test_errors_are_one_line_never_a_traceback(
    exc: BaseException,
    code: int,
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def boom(address: str | None) -> int:
        raise exc

    monkeypatch.delenv("UVDMA_TRACEBACK", raising=False)
    monkeypatch.setattr(doctor, "main", boom)
    assert cli.main(["doctor"]) == code
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err


def test_sigterm_interrupt_exits_143(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from uvdma.vm._signals import Interrupted  # noqa: PLC0415

    def stopped(address: str | None) -> int:
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(doctor, "main", stopped)
    assert cli.main(["doctor"]) == 143
    assert "uvdma: interrupted (SIGTERM)" in capsys.readouterr().err


def test_vm_kernel_check_says_how_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "Popen", no_boot)
    monkeypatch.setattr("uvdma.vm.kernel.installed_version", lambda package: "6.12.117-1")
    assert cli.main(["vm", "kernel", "--check"]) == 1
    assert "`uvdma vm kernel` builds it" in capsys.readouterr().err


# -- hugepage reservations: never so many that the machine cannot go on -------------------


def fake_machine(tmp_path: Path, *, total_mib: int, available_mib: int, nr: int = 0) -> Path:
    d = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    d.mkdir(parents=True)
    (d / "nr_hugepages").write_text(f"{nr}\n")
    (d / "free_hugepages").write_text(f"{nr}\n")
    (tmp_path / "meminfo").write_text(
        f"MemTotal:       {total_mib * 1024} kB\n"
        f"MemFree:        {available_mib * 1024} kB\n"
        f"MemAvailable:   {available_mib * 1024} kB\n"
        "HugePages_Total:       0\n"
    )
    return d / "nr_hugepages"


def reserve(tmp_path: Path, count: int, force: bool = False) -> hp.HugepagePool:
    return hp.reserve_hugepages(
        hp.PAGE_2M, count, tmp_path / "sys", force=force, meminfo=tmp_path / "meminfo"
    )


def test_a_count_leaving_less_than_a_quarter_is_refused_and_nothing_changes(
    tmp_path: Path,
) -> None:
    nr = fake_machine(tmp_path, total_mib=2048, available_mib=1800)
    # 1800 - 512 (a quarter) = 1288 MiB may go to hugepages: 644 pages of 2 MiB.
    with pytest.raises(UvdmaError, match=r"less than a quarter: ask for at most 644, or pass"):
        reserve(tmp_path, 645)
    with pytest.raises(UvdmaError, match=r"ask for at most 644"):
        reserve(tmp_path, 100_000_000_000)
    assert nr.read_text() == "0\n"
    assert reserve(tmp_path, 644).total == 644


def test_force_goes_down_to_a_sixteenth_and_no_further(tmp_path: Path) -> None:
    nr = fake_machine(tmp_path, total_mib=2048, available_mib=1800, nr=10)
    # with 10 reserved: 10 + (1800 - 128) / 2 = 846
    with pytest.raises(UvdmaError, match=r"less than a sixteenth: ask for at most 846$"):
        reserve(tmp_path, 100_000_000_000, force=True)
    assert nr.read_text() == "10\n"
    assert reserve(tmp_path, 846, force=True).total == 846


def test_lowering_the_count_is_always_allowed(tmp_path: Path) -> None:
    fake_machine(tmp_path, total_mib=2048, available_mib=100, nr=900)
    assert reserve(tmp_path, 10).total == 10


def test_a_kernel_refusal_is_an_error_with_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_machine(tmp_path, total_mib=2048, available_mib=1800)

    def erange(self: Path, data: str) -> int:
        raise OSError(errno.ERANGE, "Numerical result out of range")

    monkeypatch.setattr(Path, "write_text", erange)
    with pytest.raises(UvdmaOSError, match="reserving 5 2M hugepages through") as info:
        reserve(tmp_path, 5)
    assert info.value.errno == errno.ERANGE


def test_negative_counts_are_refused(tmp_path: Path) -> None:
    fake_machine(tmp_path, total_mib=2048, available_mib=1800)
    with pytest.raises(UvdmaError, match="must be 0 or more"):
        reserve(tmp_path, -1)


def test_cli_refuses_an_absurd_count_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nr = fake_machine(tmp_path, total_mib=2048, available_mib=1800)
    fake = functools.partial(
        hp.reserve_hugepages, sysfs=tmp_path / "sys", meminfo=tmp_path / "meminfo"
    )
    monkeypatch.setattr(hp, "reserve_hugepages", fake)
    pools = hp.hugepage_pools
    monkeypatch.setattr(hp, "hugepage_pools", lambda sysfs=tmp_path / "sys": pools(sysfs))
    assert cli.main(["hugepages", "--count", "100000000000"]) == 1
    err = capsys.readouterr().err
    assert "ask for at most 644, or pass --force" in err and err.count("\n") == 1
    assert cli.main(["hugepages", "--count", "100000000000", "--force"]) == 1
    assert "ask for at most 836" in capsys.readouterr().err
    assert nr.read_text() == "0\n"
    assert cli.main(["hugepages", "--count", "700", "--force"]) == 0
    assert nr.read_text() == "700"
    assert "2M: 700 reserved" in capsys.readouterr().out
