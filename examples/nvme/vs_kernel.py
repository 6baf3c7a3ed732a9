"""uvdma's NVMe driver side by side with the kernel's, on two identical controllers.

Run in the test VM by ``tools/bench-nvme``: the first controller is driven by perf.py
(polled, from Python), the second by the guest kernel's nvme driver with fio
(4 KiB random reads, O_DIRECT, libaio), at queue depths 1 and 32, one after the other.

    python examples/nvme/vs_kernel.py [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from uvdma import pci

HERE = Path(__file__).resolve().parent


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


def fio(dev: str, qd: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "fio",
            "--name=randread",
            f"--filename={dev}",
            "--rw=randread",
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
    read = json.loads(out)["jobs"][0]["read"]
    lat = read["lat_ns"]
    return {
        "iops": read["iops"],
        "mean_us": lat["mean"] / 1000,
        "p99_us": lat["percentile"]["99.000000"] / 1000,
    }


def uvdma_perf(address: str, qd: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "perf.py"),
            "--device",
            address,
            "--rw",
            "randread",
            "--qd",
            str(qd),
            "--seconds",
            str(seconds),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    r = json.loads(out)
    return {"iops": r["iops"], "mean_us": r["lat_us"]["mean"], "p99_us": r["lat_us"]["p99"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ours, theirs = (str(d.address) for d in pci.nvme_controllers()[:2])
    rows: list[tuple[int, dict[str, float], dict[str, float]]] = []  # (qd, uvdma, kernel)
    dev = kernel_block_device(theirs)
    try:
        for qd in (1, 32):
            print(f"QD{qd}: uvdma on {ours} ...", file=sys.stderr, flush=True)
            u = uvdma_perf(ours, qd, args.seconds)
            print(f"QD{qd}: kernel nvme + fio on {dev} ...", file=sys.stderr, flush=True)
            k = fio(dev, qd, args.seconds)
            rows.append((qd, u, k))
    finally:
        pci.bind(theirs)
    if args.json:
        report = [
            {"qd": qd, "uvdma": u, "kernel": k, "iops_ratio": u["iops"] / k["iops"]}
            for qd, u, k in rows
        ]
        print(json.dumps(report, indent=2))
        return 0
    print(
        "| QD | uvdma IOPS | kernel IOPS | ratio | uvdma mean / p99 (us) | kernel mean / p99 (us) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for qd, u, k in rows:
        print(
            f"| {qd} | {u['iops']:.0f} | {k['iops']:.0f} | {u['iops'] / k['iops']:.2f}x | "
            f"{u['mean_us']:.0f} / {u['p99_us']:.0f} | {k['mean_us']:.0f} / {k['p99_us']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
