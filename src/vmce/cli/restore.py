"""``vmce restore``: continue a saved VM (e.g. the test guest) and print its console."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vmce.cli.output import console, emit_json, fail
from vmce.cli.run import profile_for
from vmce.guest.testguest import identify
from vmce.kvm.persist import RestoreFailed, restore_vm_report
from vmce.kvm.stop import StopKind
from vmce.kvm.vmcevm import VmceVm
from vmce.save.stream import StreamError

#: The test guest's "done" exit code (guests/testguest/kernel.h EXIT_DONE).
GUEST_DONE = 0x01


def _work_counters(vm: VmceVm) -> Callable[[], list[int]] | None:
    """A reader of the test guest's per-CPU work counters, if the VM runs the test guest."""
    try:
        elf, config = identify(vm)
    except ValueError:
        return None
    base = elf.symbols["work_counter"]
    mem = vm.machine.memory
    return lambda: [mem.read_u64(base + 8 * i) for i in range(config.ncpus)]


def restore(
    file: Annotated[Path, typer.Argument(help="a stream saved by vmce (save_vm, vmce-save)")],
    timeout: Annotated[float, typer.Option(help="seconds to run the restored guest", min=0)] = 3.0,
    vendor: Annotated[
        str | None,
        typer.Option(help="this host's vMCE profile: intel or amd (default: the saving host's)"),
    ] = None,
    cow: Annotated[
        bool, typer.Option(help="map guest RAM copy-on-write from the file instead of copying")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary at the end")] = (
        False
    ),
) -> None:
    """Restore a saved VM and let it run on, printing its console as it goes.

    The whole stream is checked before anything is applied; a stream vmce refuses ends the
    command with one line naming the record and its offset, and exit status 2.
    """
    profile = profile_for(vendor) if vendor is not None else None

    def show(line: str) -> None:
        if not as_json:
            console.print(line, markup=False, soft_wrap=True, highlight=False)

    lines: list[str] = []

    def collect(line: str) -> None:
        lines.append(line)
        show(line)

    try:
        vm, report = restore_vm_report(file, profile=profile, on_serial_line=collect, cow=cow)
    except StreamError as e:
        fail(f"{file}: {e}")
    except RestoreFailed as e:
        fail(f"{file}: {e}")
    except OSError as e:
        fail(f"{file}: {e.strerror or e}")
    with vm:
        c = vm.config
        pages = report.pages
        if not as_json:
            console.print(
                f"vmce restore: {file}: {c.vcpus} vCPUs, {c.memory_size >> 20} MiB, "
                f"restored in {report.total_seconds * 1e3:.1f} ms ({pages.mapped_pages} pages "
                f"mapped, {pages.copied_pages} copied); running {timeout:g} s",
                markup=False,
                soft_wrap=True,
            )
        counters = _work_counters(vm)
        saved = counters() if counters is not None else []
        start = time.monotonic()
        vm.start()
        stop = vm.wait(timeout)
        ran = time.monotonic() - start
        now = counters() if counters is not None else []
        if stop is None:
            vm.stop("vmce restore: time is up")
        ok = stop is None or (stop.kind is StopKind.GUEST_EXIT and stop.exit_code == GUEST_DONE)
        summary: dict[str, Any] = {
            "file": str(file),
            "vcpus": c.vcpus,
            "memory_bytes": c.memory_size,
            "restore_seconds": report.total_seconds,
            "pages_mapped": pages.mapped_pages,
            "pages_copied": pages.copied_pages,
            "ran_seconds": ran,
            "stopped": None if stop is None else stop.message,
            "console_lines": len(lines),
            "work_counters": {"saved": saved, "now": now} if counters is not None else None,
        }
        if as_json:
            emit_json({**summary, "console": lines})
        else:
            if counters is not None:
                went = ", ".join(
                    f"CPU {i} {a} -> {b}" for i, (a, b) in enumerate(zip(saved, now, strict=True))
                )
                console.print(
                    f"vmce restore: test guest work counters: {went}", markup=False, soft_wrap=True
                )
            if stop is not None:
                console.print(f"vmce restore: the VM stopped: {stop.message}", markup=False)
    if not ok:
        raise typer.Exit(1)
