"""Identify an NVMe controller and its namespaces: what a person wants to know about a drive.

python examples/nvme/identify.py --device 0000:01:00.0   (bound to vfio-pci; root)
python examples/nvme/identify.py --device sim            (the software controller)
"""

from __future__ import annotations

import argparse
import sys

from uvdma.errors import UvdmaError
from uvdma_nvme import NvmeError
from uvdma_nvme.bench import open_controller


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", required=True, metavar="BDF", help="a PCI address, or 'sim' (software)"
    )
    args = parser.parse_args()
    try:
        with open_controller(args.device) as (ctrl, _sim):
            major, minor, _ = ctrl.version
            print(f"controller {args.device}: {ctrl.model}")
            print(f"  serial {ctrl.serial}, firmware {ctrl.firmware}")
            print(f"  NVMe {major}.{minor}, queues of up to {ctrl.mqes} entries")
            print(f"  largest transfer (MDTS) {ctrl.max_transfer // 1024} KiB")
            print(f"  namespaces: {ctrl.nn} supported, active {ctrl.active_namespaces()}")
            for nsid in ctrl.active_namespaces():
                ns = ctrl.namespace(nsid)
                mib = ns.size / 2**20
                print(
                    f"  namespace {nsid}: {ns.blocks} blocks of {ns.lba_size} bytes = {mib:.1f} MiB"
                )
            smart = ctrl.health()
            celsius = smart["temperature_k"] - 273
            print(
                f"  health: {celsius} C, spare {smart['available_spare_pct']}%, "
                f"used {smart['percentage_used']}%, critical warning {smart['critical_warning']:#x}"
            )
            errors = ctrl.error_log()
            print(f"  error log: {len(errors)} entries")
    except (NvmeError, UvdmaError, TimeoutError) as e:
        print(f"identify: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the driver waited for the device before letting this through
        print("identify: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
