"""The `uvdma` commands in the guest, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from uvdma import pci

pytestmark = pytest.mark.vm


def uvdma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uvdma.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_list_shows_the_controllers_groups_and_viability() -> None:
    r = uvdma("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["address"]: row for row in json.loads(r.stdout)}
    for dev in pci.nvme_controllers():
        row = rows[str(dev.address)]
        assert row["class"] == "010802"
        assert row["driver"] == "vfio-pci"
        assert row["iommu_group"] == dev.iommu_group
        assert row["group_viable"] is True
    table = uvdma("list").stdout
    assert "010802" in table and "viable" in table


def test_doctor_passes_for_a_bound_controller_and_reports_the_iova_space() -> None:
    bdf = str(pci.nvme_controllers()[0].address)
    r = uvdma("doctor", bdf)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "IOMMU active: dmar0" in r.stdout
    assert "usable IOVA ranges (type1): 0x0-0xfedfffff, 0xfef00000-" in r.stdout
    assert "IOVA address width: 39 bits" in r.stdout  # QEMU intel-iommu default aw-bits
    assert "reserved IOVA 0x00000000fee00000-0x00000000feefffff (msi)" in r.stdout
    assert "ready for uvdma" in r.stdout


def test_doctor_names_the_fix_for_an_unbound_device() -> None:
    dev = pci.nvme_controllers()[-1]
    assert uvdma("unbind", str(dev.address)).returncode == 0
    try:
        r = uvdma("doctor", str(dev.address))
        assert r.returncode == 1
        assert f"is bound to nvme\n         fix: uvdma bind {dev.address}" in r.stdout
    finally:
        assert uvdma("bind", str(dev.address)).returncode == 0


def test_unbind_restores_the_driver_the_device_had_and_bind_refuses_nonsense() -> None:
    dev = pci.nvme_controllers()[0]
    r = uvdma("unbind", str(dev.address))
    assert r.returncode == 0 and "vfio-pci -> nvme" in r.stdout
    assert dev.driver == "nvme"
    r = uvdma("bind", str(dev.address))
    assert r.returncode == 0 and "nvme -> vfio-pci" in r.stdout
    assert dev.driver == "vfio-pci"
    bad = uvdma("bind", "0000:00:1f.9")
    assert bad.returncode != 0 and "DDDD:BB:DD.F" in bad.stderr + bad.stdout


def test_hugepages_reserves_and_reports() -> None:
    path = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    before = int(path.read_text())
    try:
        r = uvdma("hugepages", "--size", "2M", "--count", str(before + 4))
        assert r.returncode == 0, r.stderr
        assert f"2M: {before + 4} reserved" in r.stdout
    finally:
        path.write_text(str(before))


def test_bench_map_runs_on_the_emulated_iommu() -> None:
    r = uvdma("bench", "map", "--json", "--seconds", "0.3")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["backend"] == "type1"
    sizes = {x["size"]: x for x in report["results"]}
    assert set(sizes) >= {4096, 65536, 2 << 20}
    for x in sizes.values():
        assert 0 < x["anchor_median_us"] < x["median_us"] <= x["p99_us"]
    assert "skipping 1G" in r.stderr  # no 1 GiB page reserved in this guest


def test_bench_dma_reports_every_case_and_draws_the_histogram(tmp_path: Path) -> None:
    png = tmp_path / "dma.png"
    r = uvdma("bench", "dma", "--json", "--quick", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    cases = {x["case"]: x for x in report["results"]}
    assert set(cases) == {
        "coherent 4K atomic",
        "coherent 4K kernel",
        "coherent 4M kernel (maps)",
        "dma_pool 4K",
        "map_single 4K bounce",
        "map_single 64K direct",
    }
    for x in cases.values():
        assert 0 < x["anchor_ns"] < x["median_ns"] <= x["p99_ns"] * 10
    assert set(report["goals"]) == {"coherent 4K atomic", "dma_pool 4K"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
