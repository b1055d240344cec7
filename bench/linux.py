"""Linux guest benchmark: boot milestones, snapshot save and restore, injection to verdict.

It boots the Debian kernel once from scratch (a few minutes on kvm_pvm, where guest kernel
code is emulated), saves a snapshot to a temporary file, restores it several times, and runs
the broadcast and vCPU0-only scenarios from it. Baselines in the same run: the cold boot
against the snapshot restore.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vmce.guest.linux.guest import LinuxConfig
from vmce.guest.linux.material import prepare
from vmce.guest.linux.scenarios import Scenario, run
from vmce.guest.linux.snapshot import boot_and_snapshot, restore_guest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer restores")
    args = ap.parse_args(argv)
    material = prepare()
    config = LinuxConfig()
    with tempfile.TemporaryDirectory() as d:
        snap = Path(d) / "booted.xen"
        t0 = time.monotonic()
        times = boot_and_snapshot(config, material, snap)
        boot = time.monotonic() - t0
        print(f"cold boot of {material.manifest.kernel_package} on {config.vcpus} vCPUs:")
        for name, t in times.milestones.items():
            print(f"  {name!r:<24} at {t:7.1f} s")
        print(f"  every CPU has initialised MCA at {times.mca_ready:7.1f} s")
        print(
            f"  snapshot save: {times.snapshot_save * 1000:.0f} ms "
            f"({snap.stat().st_size >> 20} MiB file)"
        )
        restores = []
        for _ in range(2 if args.quick else 5):
            t1 = time.monotonic()
            g = restore_guest(config, material, snap)
            restores.append(time.monotonic() - t1)
            g.close()
        r = statistics.median(restores)
        print(
            f"snapshot restore (median of {len(restores)}): {r * 1000:.0f} ms = "
            f"{boot / r:.0f}x faster than the cold boot ({boot:.0f} s)"
        )
        for scenario in (Scenario.BROADCAST_SRAO, Scenario.VCPU0_SRAO):
            with restore_guest(config, material, snap) as g:
                res = run(scenario, g, timeout=120)
            print(
                f"injection to verdict, {scenario.value}: {res.seconds_to_verdict:.2f} s "
                f"({res.verdict.outcome.value}; mce={res.monarch_timeout_us})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
