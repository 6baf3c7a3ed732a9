"""The QEMU test VM (:mod:`uvdma.vm.runner`) and its guest kernel (:mod:`uvdma.vm.kernel`)."""

from __future__ import annotations

from uvdma.vm.runner import (
    READY_MARKER,
    VmConfig,
    add_arguments,
    build_command,
    config_from_args,
    find_kernel,
    find_tools,
    guest_script,
    parse_size,
    run,
)

__all__ = [
    "READY_MARKER",
    "VmConfig",
    "add_arguments",
    "build_command",
    "config_from_args",
    "find_kernel",
    "find_tools",
    "guest_script",
    "parse_size",
    "run",
]
