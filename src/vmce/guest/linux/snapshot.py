"""Boot Linux once, snapshot it when every CPU has initialised MCA, restore it per test.

On kvm_pvm a boot takes minutes, a restore a second. The snapshot is cached beside the guest
material, keyed by everything that shapes the booted state (kernel, initramfs, host profile,
guest CPU, vCPUs, memory, command line, vmce's snapshot format); a key mismatch means a new
boot. A snapshot is written to a temporary name and renamed when complete, and one that does
not restore is deleted and rebuilt: a stale or broken snapshot is never half-used.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmce.guest.linux.guest import LinuxConfig, LinuxGuest
from vmce.guest.linux.material import Material, linux_cache
from vmce.kvm.persist import Snapshot
from vmce.kvm.vmcevm import MsrAccess

#: Bumped when what a snapshot contains changes meaning.
SNAPSHOT_FORMAT = 1
#: The console line after which every CPU has run mcheck_cpu_init().
SMP_DONE = "smpboot: Total of"
MC1_STATUS = 0x405


@dataclass(frozen=True)
class BootTimes:
    """Seconds from start to each boot milestone, and the snapshot's own cost."""

    milestones: dict[str, float]
    mca_ready: float
    snapshot_save: float


MILESTONES = ("Linux version", "smpboot: CPU0:", SMP_DONE)


def snapshot_key(config: LinuxConfig, material: Material) -> str:
    cpu = config.cpu
    parts = {
        "format": SNAPSHOT_FORMAT,
        "material": material.key,
        "vendor": config.profile.vendor.value,
        "lmce": config.profile.lmce,
        "cpu": [cpu.vendor.value, cpu.family, cpu.model, cpu.stepping] if cpu else None,
        "vcpus": config.vcpus,
        "memory": config.memory_mib,
        "cmdline": config.cmdline(),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def snapshot_path(config: LinuxConfig, material: Material) -> Path:
    return linux_cache() / "snapshots" / f"{snapshot_key(config, material)}.xen"


def boot_and_snapshot(
    config: LinuxConfig,
    material: Material,
    path: Path,
    *,
    timeout: float = 900.0,
    on_line: Callable[[str], None] | None = None,
) -> BootTimes:
    """Boot, wait until every vCPU has initialised MCA (it cleared MC1_STATUS in
    ``__mcheck_cpu_init_clear_banks``) and SMP bring-up is done, then save the snapshot."""
    ready: dict[int, float] = {}
    all_ready = threading.Event()

    def trace(a: MsrAccess) -> None:
        if a.write and a.msr == MC1_STATUS and a.vcpu_id not in ready:
            ready[a.vcpu_id] = a.time
            if len(ready) == config.vcpus:
                all_ready.set()

    with LinuxGuest(config, material, on_line=on_line) as g:
        g.vm.msr_trace = trace
        g.start()
        g.wait_for_line(SMP_DONE, timeout)
        if not all_ready.wait(max(1.0, timeout - (time.monotonic() - g.started_at))):
            raise TimeoutError(f"only vCPUs {sorted(ready)} initialised MCA")
        g.vm.msr_trace = None
        milestones = {}
        for m in MILESTONES:
            t = next((t for ln, t in zip(g.lines, g.times, strict=True) if m in ln), None)
            if t is not None:
                milestones[m] = t - g.started_at
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        t0 = time.monotonic()
        Snapshot.take(g.vm, tmp, resume=False)
        save_s = time.monotonic() - t0
        os.replace(tmp, path)
    return BootTimes(milestones, max(ready.values()) - g.started_at, save_s)


def restore_guest(
    config: LinuxConfig,
    material: Material,
    path: Path,
    on_line: Callable[[str], None] | None = None,
) -> LinuxGuest:
    """A new guest continuing the snapshot (not started)."""
    snap = Snapshot(path, profile=config.profile)
    return LinuxGuest(
        config, material, on_line, restore_from=lambda cb: snap.restore(on_serial_line=cb)
    )


def booted_guest(
    config: LinuxConfig,
    material: Material,
    on_line: Callable[[str], None] | None = None,
    on_boot_line: Callable[[str], None] | None = None,
) -> tuple[LinuxGuest, BootTimes | None]:
    """A restored, booted guest: from the cached snapshot, or after booting one (then the
    boot's timings are returned too)."""
    path = snapshot_path(config, material)
    times = None
    if not path.exists():
        times = boot_and_snapshot(config, material, path, on_line=on_boot_line)
    try:
        return restore_guest(config, material, path, on_line), times
    except Exception:
        path.unlink(missing_ok=True)  # a snapshot that does not restore is rebuilt
        times = boot_and_snapshot(config, material, path, on_line=on_boot_line)
        return restore_guest(config, material, path, on_line), times
