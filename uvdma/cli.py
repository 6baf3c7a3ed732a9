"""The ``uvdma`` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from uvdma import __version__, doctor, pci
from uvdma._args import int_arg, seconds_arg
from uvdma.errors import UvdmaError
from uvdma.memory import hugepages
from uvdma.vm import kernel as vm_kernel
from uvdma.vm import runner as vm


def _cmd_vm_run(args: argparse.Namespace) -> int:
    return vm.run(vm.config_from_args(args))


def _cmd_vm_kernel(args: argparse.Namespace) -> int:
    image = vm_kernel.cached_kernel()
    if image is None and args.check:
        print(
            "uvdma: the guest kernel is not built yet: `uvdma vm kernel` builds it "
            f"(once: about {vm_kernel.BUILD_MINUTES} minutes on 2 idle cores)",
            file=sys.stderr,
        )
        return 1
    if image is None:
        image = vm_kernel.build(sys.stderr, jobs=args.jobs)
    print(image)
    return 0


def _cmd_bench_genalloc(args: argparse.Namespace) -> int:
    from uvdma.bench import genalloc as bench_genalloc  # noqa: PLC0415 - numpy: slow to import

    return bench_genalloc.main(
        json_out=args.json, quick=args.quick, granules=args.granules, fills=args.fills
    )


def _group_viable(dev: pci.PciDevice) -> bool | None:
    group = dev.iommu_group
    return None if group is None else not pci.group_blockers(group)


def _cmd_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for dev in pci.list_devices():
        rows.append(
            {
                "address": str(dev.address),
                "vendor": f"{dev.vendor:04x}",
                "device": f"{dev.device:04x}",
                "class": f"{dev.class_code:06x}",
                "driver": dev.driver,
                "iommu_group": dev.iommu_group,
                "group_viable": _group_viable(dev),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'address':<13} {'id':<10} {'class':<7} {'driver':<12} {'group':>5}  vfio")
    for r in rows:
        viable = {True: "viable", False: "not viable", None: "no IOMMU"}[r["group_viable"]]
        group = "-" if r["iommu_group"] is None else r["iommu_group"]
        print(
            f"{r['address']:<13} {r['vendor']}:{r['device']:<5} {r['class']:<7} "
            f"{r['driver'] or '-':<12} {group:>5}  {viable}"
        )
    return 0


def _cmd_bind(args: argparse.Namespace) -> int:
    dev = pci.device(args.address)
    previous = pci.bind(dev.address, force=args.force)
    print(f"{dev.address}: {previous or 'no driver'} -> vfio-pci (group {dev.iommu_group})")
    return 0


def _cmd_unbind(args: argparse.Namespace) -> int:
    from uvdma.vm._signals import signals_as_interrupts  # noqa: PLC0415

    dev = pci.device(args.address)

    def progress(line: str) -> None:
        print(f"uvdma: {line}", file=sys.stderr, flush=True)

    with signals_as_interrupts():  # SIGTERM and SIGHUP too: say where the unbind stands
        now = pci.unbind(dev.address, wait=args.wait, progress=progress)
    print(f"{dev.address}: vfio-pci -> {now or 'no driver'}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    return doctor.main(args.address)


def _cmd_hugepages(args: argparse.Namespace) -> int:
    size = {"2M": hugepages.PAGE_2M, "1G": hugepages.PAGE_1G}[args.size]
    if args.count is not None:
        got = hugepages.reserve_hugepages(size, args.count, force=args.force)
        if got.total < args.count:
            print(
                f"asked for {args.count} {args.size} hugepages, the kernel reserved {got.total} "
                "(memory is short or fragmented; reserve at boot with hugepages= for more)",
                file=sys.stderr,
            )
    for p in sorted(hugepages.hugepage_pools().values(), key=lambda p: p.page_size):
        print(f"{hugepages.size_name(p.page_size):>3}: {p.total} reserved, {p.free} free")
    return 0


def _cmd_bench_dma(args: argparse.Namespace) -> int:
    from uvdma.bench import dma as bench_dma  # noqa: PLC0415 - numpy: slow to import

    return bench_dma.main(args.device, json_out=args.json, plot_path=args.plot, quick=args.quick)


def _cmd_bench_map(args: argparse.Namespace) -> int:
    from uvdma.bench import map as bench_map  # noqa: PLC0415 - numpy: slow to import

    return bench_map.main(args.device, json_out=args.json, budget_s=args.seconds)


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
    kernel_p = vm_sub.add_parser(
        "kernel",
        help="build uvdma's guest kernel (iommufd, VFIO cdev, no-IOMMU) if missing; print its path",
        description="Build, once, a guest kernel with iommufd, VFIO cdev and VFIO no-IOMMU "
        "mode from Debian's linux-source-6.12 (installing the packages it needs, as root) "
        "and print the path of its bzImage. Cached under ~/.cache/uvdma/kernel; the first "
        f"build takes about {vm_kernel.BUILD_MINUTES} minutes on 2 idle cores.",
    )
    kernel_p.add_argument(
        "--check", action="store_true", help="only print the path if built; exit 1 if not"
    )
    kernel_p.add_argument(
        "--jobs", type=int_arg(1, 1024), help="make -j (default: the CPUs this may use)"
    )
    kernel_p.set_defaults(func=_cmd_vm_kernel)

    list_p = sub.add_parser("list", help="PCI devices, their drivers and IOMMU groups")
    list_p.add_argument("--json", action="store_true")
    list_p.set_defaults(func=_cmd_list)
    bind_p = sub.add_parser(
        "bind",
        help="bind a device to vfio-pci (root)",
        description="Bind a device to vfio-pci. Refused, changing nothing, while one of its "
        "block devices is mounted, used as swap, held by device-mapper/md/LVM or open in a "
        "process (each use is named), unless --force.",
    )
    bind_p.add_argument("address", metavar="BDF")
    bind_p.add_argument(
        "--force",
        action="store_true",
        help="take the device even if its block devices are in use (their users get I/O errors)",
    )
    bind_p.set_defaults(func=_cmd_bind)
    unbind_p = sub.add_parser(
        "unbind",
        help="give a device bound to vfio-pci back to the driver it had (root)",
        description="Give a device bound to vfio-pci back to the driver it had before "
        "`uvdma bind` (else to the kernel's choice). A process holding the device is asked "
        "to let go (VFIO's device request); if it has not within --wait seconds, they are "
        "named and the command exits 1, and the device goes back to its driver as soon as "
        "they do (the work goes on in the background; Ctrl-C does not stop it). A device "
        "bound to any other driver is refused and nothing changes.",
    )
    unbind_p.add_argument("address", metavar="BDF")
    unbind_p.add_argument(
        "--wait",
        type=int_arg(0, 86400),
        default=int(pci.UNBIND_WAIT),
        metavar="SECONDS",
        help=f"how long to wait for the holders (default {int(pci.UNBIND_WAIT)})",
    )
    unbind_p.set_defaults(func=_cmd_unbind)
    doc_p = sub.add_parser("doctor", help="check that this machine is ready, and say the fixes")
    doc_p.add_argument("address", metavar="BDF", nargs="?")
    doc_p.set_defaults(func=_cmd_doctor)
    huge_p = sub.add_parser("hugepages", help="show, or reserve (root), hugepages")
    huge_p.add_argument("--size", choices=["2M", "1G"], default="2M")
    huge_p.add_argument("--count", type=int_arg(0, 1 << 40), help="how many to reserve (root)")
    huge_p.add_argument(
        "--force",
        action="store_true",
        help="allow leaving less than a quarter of memory available (down to a sixteenth)",
    )
    huge_p.set_defaults(func=_cmd_hugepages)

    bench_p = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench_p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    ga_p = bench_sub.add_parser(
        "genalloc", help="alloc+free latency of each gen_pool algorithm beside a no-op anchor"
    )
    ga_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ga_p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    from uvdma.bench import genalloc as bench_genalloc  # noqa: PLC0415 - its argument types

    ga_p.add_argument(
        "--granules",
        type=bench_genalloc.granules_arg,
        default=bench_genalloc.GRANULES,
        metavar="LIST",
        help="pool sizes in granules, comma-separated (default: 65536,1048576)",
    )
    ga_p.add_argument(
        "--fills",
        type=bench_genalloc.fills_arg,
        default=bench_genalloc.FILLS,
        metavar="LIST",
        help="fills in percent, comma-separated (default: 0,50,90)",
    )
    ga_p.set_defaults(func=_cmd_bench_genalloc)
    map_p = bench_sub.add_parser("map", help="IOMMU map+unmap latency beside a null ioctl")
    map_p.add_argument("--device", metavar="BDF", help="default: the first vfio-pci device")
    map_p.add_argument("--json", action="store_true")
    map_p.add_argument(
        "--seconds", type=seconds_arg(3600), default=2.0, help="time budget per size"
    )
    map_p.set_defaults(func=_cmd_bench_map)
    dma_p = bench_sub.add_parser("dma", help="DMA API latencies beside a no-op anchor")
    dma_p.add_argument("--device", metavar="BDF", help="default: the first vfio-pci device")
    dma_p.add_argument("--json", action="store_true")
    dma_p.add_argument("--plot", metavar="FILE.png", help="write a latency histogram")
    dma_p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    dma_p.set_defaults(func=_cmd_bench_dma)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``uvdma`` console script.

    Errors are one line on stderr, never a traceback (set UVDMA_TRACEBACK=1 to see one
    for an unexpected error); a closed output pipe ends the command quietly (exit 141,
    as SIGPIPE would); an interrupt exits 128 + the signal's number.
    """
    try:
        args = build_parser().parse_args(argv)
        rc: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except UvdmaError as e:
        print(f"uvdma: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"uvdma: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except OSError as e:
        print(f"uvdma: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("UVDMA_TRACEBACK") == "1":
            traceback.print_exc()
        print(
            f"uvdma: unexpected error (a bug: please report it with the command): "
            f"{type(e).__name__}: {e} (UVDMA_TRACEBACK=1 shows where)",
            file=sys.stderr,
        )
        return 1
    return rc


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
