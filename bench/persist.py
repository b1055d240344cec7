"""Whole-VM save/restore benchmark: one command, figures beside baselines from the same run.

    .venv/bin/python bench/persist.py [--memory-mib 1024] [--repeat 3] [--dir DIR]

* save and restore (copy) of the test guest with ``--memory-mib`` of RAM, all of it touched
  (the host fills it before the save, as a guest that used its memory would), in MB/s beside
  ``cp`` of the same stream file (the limit: the same bytes through the page cache);
* snapshot restore (RAM mapped copy-on-write from the file) beside a cold boot of the same
  guest, both up to the point where the guest's work counters move;
* stream parse throughput: the strict seekable scan a restore uses, and the generic streaming
  reader, beside ``cat FILE > /dev/null``.

Only one guest runs at a time. Files are in the page cache, as right after a save; every
timed write goes to a new file name (the old file is deleted outside the timing, for ``cp``
too) and one untimed round comes first, because on this machine (a Firecracker VM) the first
use of a memory page is several times slower than later ones, whoever makes it.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vmce.guest.testguest import GuestConfig, TestGuest, Work
from vmce.kvm.persist import Snapshot, index_path, restore_vm_report, save_vm
from vmce.save.stream import read_stream

CONFIG = GuestConfig(ncpus=2, work=[Work.USER, Work.KERNEL])
CHUNK = 64 << 20


def median(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("the guest did not make progress")
        time.sleep(0.0005)


def mb_s(size: int, seconds: float) -> float:
    return size / (1 << 20) / seconds


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def x(seconds: float, baseline: float) -> str:
    return f"{seconds / baseline:.2f}x"


def booted_guest(memory: int) -> TestGuest:
    g = TestGuest(CONFIG, memory_size=memory)
    g.boot()
    g.wait_for("work", count=2)
    return g


def fill(g: TestGuest) -> None:
    """Touch all guest RAM above the guest's image, as a guest that used it would."""
    mem = g.vm.machine.memory
    start = 16 << 20
    pattern = bytes(range(256)) * (CHUNK // 256)
    with_pause = g.vm.pause()
    assert with_pause
    for gpa in range(start, mem.size, CHUNK):
        mem.write(gpa, pattern[: min(CHUNK, mem.size - gpa)])
    g.vm.resume()


def cold_boot(memory: int) -> float:
    """Seconds from nothing to a guest whose work counters move."""
    t0 = time.perf_counter()
    g = TestGuest(CONFIG, memory_size=memory)
    g.start()
    g.wait_for("work", count=2)
    wait_until(lambda: g.counter(0) > 0 and g.counter(1) > 0)
    t = time.perf_counter() - t0
    g.close()
    return t


def snapshot_restore(snap: Snapshot) -> tuple[float, float, float]:
    """Seconds to the restored guest's counters moving past the saved values; of which
    building the VmceVm; and mapping RAM plus applying the state."""
    t0 = time.perf_counter()
    g = TestGuest.restore(snap)
    c0, c1 = g.counter(0), g.counter(1)
    g.start()
    wait_until(lambda: g.counter(0) > c0 and g.counter(1) > c1)
    t = time.perf_counter() - t0
    g.close()
    assert snap.last is not None
    return t, snap.last.vm_seconds, snap.last.pages_seconds + snap.last.apply_seconds


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the stream files go")
    args = ap.parse_args()
    memory = args.memory_mib << 20
    work = Path(tempfile.mkdtemp(prefix="vmce-persist-", dir=args.dir))
    stream, copy = work / "guest.xen", work / "copy.xen"
    rows: list[tuple[str, str, str]] = []
    try:
        # -- save and restore beside cp -----------------------------------------------------
        g = booted_guest(memory)
        fill(g)
        saves = []
        for i in range(args.repeat + 1):
            stream.unlink(missing_ok=True)
            report = save_vm(g.vm, stream)
            if i:  # the first round warms the page cache up
                saves.append(report.seconds)
        g.close()
        size = stream.stat().st_size

        def cp() -> float:
            copy.unlink(missing_ok=True)
            return timed(["cp", str(stream), str(copy)])

        cp()
        t_cp = median(cp, args.repeat)
        copy.unlink(missing_ok=True)

        def restore(cow: bool) -> tuple[float, float, float]:
            """Seconds in all; building the VmceVm; putting the pages in place."""
            vm, rep = restore_vm_report(stream, cow=cow)
            vm.close()
            return rep.total_seconds, rep.build.vm_seconds, rep.build.pages_seconds

        def medians(cow: bool) -> tuple[float, float, float]:
            runs = [restore(cow) for _ in range(args.repeat)]
            t, vm, pages = (statistics.median(r[i] for r in runs) for i in range(3))
            return t, vm, pages

        t_save = statistics.median(saves)
        restore(False)
        t_restore, vm_copy, pages_copy = medians(False)
        t_cow, vm_cow, pages_cow = medians(True)
        label = f"{args.memory_mib} MiB guest, {size / (1 << 20):.0f} MiB stream"
        rows.append(
            (f"cp of the stream file (baseline), {label}", f"{mb_s(size, t_cp):.0f} MB/s", "1.00x")
        )
        for name, t in (
            ("save_vm (pause, capture, write)", t_save),
            ("restore_vm, RAM copied", t_restore),
            ("  of which copying the pages into guest RAM", pages_copy),
            ("restore_vm, RAM mapped copy-on-write", t_cow),
        ):
            rows.append((name, f"{mb_s(size, t):.0f} MB/s ({t * 1e3:.0f} ms)", f"{t_cp / t:.2f}x"))
        lazy = f"{ms(pages_cow)} (pages are read when touched)"
        rows.append(("  of which mapping the pages", lazy, f"{pages_cow / t_cp:.4f} of cp's time"))
        vm_build = (vm_copy + vm_cow) / 2
        rows.append(("  building the VmceVm, in both", ms(vm_build), ""))

        # -- parse throughput -----------------------------------------------------------------
        t_cat = median(lambda: timed(["sh", "-c", f"cat '{stream}' > /dev/null"]), args.repeat)

        def scan() -> float:
            t0 = time.perf_counter()
            index_path(stream)
            return time.perf_counter() - t0

        def reader() -> float:
            t0 = time.perf_counter()
            with open(stream, "rb", buffering=io.DEFAULT_BUFFER_SIZE) as f:
                read_stream(f, page_sink=lambda *a: None)
            return time.perf_counter() - t0

        t_scan, t_read = median(scan, args.repeat), median(reader, args.repeat)
        rows.append(("cat FILE > /dev/null (baseline)", f"{mb_s(size, t_cat):.0f} MB/s", "1.00x"))
        rows.append(
            (
                "strict seekable scan (index_stream)",
                f"{mb_s(size, t_scan):.0f} MB/s ({t_scan * 1e3:.0f} ms)",
                f"{t_cat / t_scan:.2f}x",
            )
        )
        rows.append(
            (
                "streaming reader (read_stream)",
                f"{mb_s(size, t_read):.0f} MB/s ({t_read * 1e3:.0f} ms)",
                f"{t_cat / t_read:.2f}x",
            )
        )

        # -- snapshot restore beside a cold boot ------------------------------------------------
        for mib in sorted({64, args.memory_mib}):
            g = booted_guest(mib << 20)
            snap_path = work / f"snap{mib}.xen"
            snap = Snapshot.take(g.vm, snap_path)
            g.close()
            t_boot = median(partial(cold_boot, mib << 20), args.repeat)
            first_running = snapshot_restore(Snapshot(snap_path))[0]
            runs = [snapshot_restore(snap) for _ in range(args.repeat)]
            running = statistics.median(r[0] for r in runs)
            t_vm = statistics.median(r[1] for r in runs)
            own = statistics.median(r[2] for r in runs)
            rows.append(
                (f"cold boot to working counters, {mib} MiB (baseline)", ms(t_boot), "1.00x")
            )
            rows.append(
                (
                    f"snapshot restore to working counters, {mib} MiB",
                    ms(running),
                    x(running, t_boot),
                )
            )
            first = x(first_running, t_boot)
            rows.append(("  first restore of the file (checks it first)", ms(first_running), first))
            rows.append(("  of a restore: building the VmceVm", ms(t_vm), x(t_vm, t_boot)))
            rows.append(("  of a restore: mapping RAM, applying state", ms(own), x(own, t_boot)))
            snap_path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"vmce persist benchmark (median of {args.repeat}), pid {os.getpid()}")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
