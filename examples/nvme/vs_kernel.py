"""uvdma's NVMe driver side by side with the kernel's, on two identical controllers.

Run in the test VM by ``tools/bench-nvme``: the first controller is driven by perf.py (from
Python; polled, and again with --interrupts), the second by the guest kernel's nvme driver
with fio (O_DIRECT, libaio).  4 KiB random reads and random writes at queue depths 1, 32
and 128, each combination --runs times (3 by default), interleaved (kernel, polled,
interrupts, then again) so that a slow moment of the host hits all three alike.  Each run
pairs with the kernel's run of the same round: the table gives min / median / max of the
IOPS ratios, and the depth each side kept in flight (Little's law: IOPS x mean latency).

    python examples/nvme/vs_kernel.py [--seconds 5] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from uvdma import pci

HERE = Path(__file__).resolve().parent
RWS = ("randread", "randwrite")
QDS = (1, 32, 128)


def kernel_block_device(address: str) -> str:
    """Give the controller to the kernel's nvme driver; its /dev/nvmeXn1."""
    pci.unbind(address)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for ctl in (Path("/sys/bus/pci/devices") / address / "nvme").glob("nvme*"):
            for ns in sorted(ctl.glob(f"{ctl.name}n*")):
                if (Path("/dev") / ns.name).exists():
                    return f"/dev/{ns.name}"
        time.sleep(0.2)
    raise RuntimeError(f"the kernel's nvme driver did not bind {address}")


def fio(dev: str, rw: str, qd: int, seconds: float) -> dict[str, float]:
    """The kernel's nvme driver through fio: IOPS, mean and p99 latency, depth in flight."""
    out = subprocess.run(
        [
            "fio",
            f"--name={rw}",
            f"--filename={dev}",
            f"--rw={rw}",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            f"--iodepth={qd}",
            "--time_based",
            f"--runtime={seconds}",
            "--lat_percentiles=1",
            "--output-format=json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    side = json.loads(out)["jobs"][0]["read" if "read" in rw else "write"]
    lat = side["lat_ns"]
    return {
        "iops": side["iops"],
        "mean_us": lat["mean"] / 1000,
        "p99_us": lat["percentile"]["99.000000"] / 1000,
        "mean_qd": side["iops"] * lat["mean"] / 1e9,
    }


def uvdma_perf(address: str, rw: str, qd: int, seconds: float, irq: bool) -> dict[str, float]:
    """perf.py on the controller bound to vfio-pci."""
    cmd = [sys.executable, str(HERE / "perf.py"), "--device", address, "--rw", rw]
    cmd += ["--qd", str(qd), "--seconds", str(seconds), "--json"]
    if irq:
        cmd.append("--interrupts")
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {
        "iops": r["iops"],
        "mean_us": r["lat_us"]["mean"],
        "p99_us": r["lat_us"]["p99"],
        "mean_qd": r["mean_qd"],
    }


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max."""
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ours, theirs = (str(d.address) for d in pci.nvme_controllers()[:2])
    runs: dict[tuple[str, int], dict[str, list[dict[str, float]]]] = {}
    dev = kernel_block_device(theirs)
    try:
        for rw in RWS:
            for qd in QDS:
                cell = runs.setdefault((rw, qd), {"kernel": [], "polled": [], "interrupts": []})
                for n in range(args.runs):
                    print(f"{rw} QD{qd} run {n + 1}/{args.runs}", file=sys.stderr, flush=True)
                    cell["kernel"].append(fio(dev, rw, qd, args.seconds))
                    cell["polled"].append(uvdma_perf(ours, rw, qd, args.seconds, False))
                    cell["interrupts"].append(uvdma_perf(ours, rw, qd, args.seconds, True))
    finally:
        pci.bind(theirs)
    report: list[dict[str, Any]] = []
    for (rw, qd), cell in runs.items():
        row: dict[str, Any] = {"rw": rw, "qd": qd}
        for mode in ("polled", "interrupts"):
            ratios = [
                u["iops"] / k["iops"] for u, k in zip(cell[mode], cell["kernel"], strict=True)
            ]
            row[mode] = {
                "ratio": spread(ratios),
                "iops": spread([u["iops"] for u in cell[mode]]),
                "mean_qd": spread([u["mean_qd"] for u in cell[mode]]),
                "p99_us": spread([u["p99_us"] for u in cell[mode]]),
            }
        row["kernel"] = {
            "iops": spread([k["iops"] for k in cell["kernel"]]),
            "mean_qd": spread([k["mean_qd"] for k in cell["kernel"]]),
            "p99_us": spread([k["p99_us"] for k in cell["kernel"]]),
        }
        report.append(row)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        "| workload | QD | kernel IOPS (median) | polled: ratio min / median / max | "
        "interrupts: ratio min / median / max | depth kept: kernel / polled / interrupts |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in report:
        p, i, k = row["polled"], row["interrupts"], row["kernel"]

        def r3(s: dict[str, float]) -> str:
            return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"

        print(
            f"| {row['rw']} | {row['qd']} | {k['iops']['median']:.0f} | {r3(p['ratio'])} | "
            f"{r3(i['ratio'])} | {k['mean_qd']['median']:.1f} / {p['mean_qd']['median']:.1f}"
            f" / {i['mean_qd']['median']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
