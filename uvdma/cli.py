"""The ``uvdma`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from uvdma import __version__, vm
from uvdma.bench import genalloc as bench_genalloc
from uvdma.errors import UvdmaError


def _cmd_vm_run(args: argparse.Namespace) -> int:
    return vm.run(vm.config_from_args(args))


def _cmd_bench_genalloc(args: argparse.Namespace) -> int:
    return bench_genalloc.main(json_out=args.json, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``uvdma`` command."""
    parser = argparse.ArgumentParser(
        prog="uvdma", description="Drive PCIe devices from Python through VFIO."
    )
    parser.add_argument("--version", action="version", version=f"uvdma {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    vm_p = sub.add_parser("vm", help="the QEMU test VM")
    vm_sub = vm_p.add_subparsers(dest="vm_command", required=True, metavar="SUBCOMMAND")
    run_p = vm_sub.add_parser(
        "run",
        help="boot the test VM and run a command in it",
        description="Boot the installed kernel in QEMU (q35, emulated VT-d, emulated NVMe) "
        "with this machine's root filesystem shared read-only, run COMMAND as root in the "
        "current directory, and exit with its code.",
    )
    vm.add_arguments(run_p)
    run_p.set_defaults(func=_cmd_vm_run)

    bench_p = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench_p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    ga_p = bench_sub.add_parser(
        "genalloc", help="alloc+free latency of each gen_pool algorithm beside a no-op anchor"
    )
    ga_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ga_p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    ga_p.set_defaults(func=_cmd_bench_genalloc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``uvdma`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except UvdmaError as e:
        print(f"uvdma: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
