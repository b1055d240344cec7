"""Whole-VM save, restore and snapshots on real KVM vCPUs (vmce.kvm.persist).

The running test guest is saved mid-work and continues after a restore (its counters go on
from the saved values, its console goes on, it handles a new #MC); a vMCE in flight at the
save is handled after the restore; snapshots restore copy-on-write and are the starting point
of the other tests here; old VMCE_VCPU formats restore; a stream the host profile cannot take
is refused before anything is built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from stubbuild import BOOT_INFO, CODE_BASE, RAM_SIZE, SCRATCH, kernel_stack

from vmce.guest.testguest import GuestConfig, TestGuest, Work
from vmce.host.memory import P2mType
from vmce.kvm.boot import DirectBoot
from vmce.kvm.persist import Snapshot, index_path, plan_restore, restore_vm, save_vm
from vmce.kvm.vmcevm import VmceVm, VmceVmConfig
from vmce.kvm.vstate import MSR_IA32_TSC, MachineState, capture_machine
from vmce.save.hvmrecords import VmceInflight
from vmce.save.stream import PageType, StreamError
from vmce.vmce import BankRecord, HostProfile

pytestmark = pytest.mark.kvm

SRAO = BankRecord(0xBD000000000000C0, 0x3000000, 0x86)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


@pytest.fixture
def guests() -> Iterator[list[TestGuest]]:
    made: list[TestGuest] = []
    yield made
    for g in made:
        g.close()


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Snapshot, tuple[int, int]]:
    """One boot of the test guest (a CPL3 task on CPU 0, a CPL0 loop on CPU 1), saved while
    it works: the snapshot every other test here starts from."""
    path = tmp_path_factory.mktemp("snap") / "booted.xen"
    with TestGuest(GuestConfig(ncpus=2, work=[Work.USER, Work.KERNEL])) as g:
        g.boot()
        g.wait_for("work", count=2)
        assert wait_until(lambda: g.counter(0) > 1000 and g.counter(1) > 10)
        snap = Snapshot.take(g.vm, path, resume=False)
        counters = (g.counter(0), g.counter(1))
    return snap, counters


def from_snapshot(guests: list[TestGuest], snap: Snapshot) -> TestGuest:
    g = TestGuest.restore(snap)
    guests.append(g)
    return g


def recovers(g: TestGuest, ncpus: int = 2) -> None:
    """The guest handles a fresh broadcast SRAO as a healthy one does."""
    before = len(g.find("mce-exit"))
    assert g.vm.inject(SRAO, 0x5).ok
    g.wait_for("mce-exit", count=before + ncpus, timeout=20)
    mf = g.wait_for("memory-failure", timeout=20)[-1]
    assert mf.int("pfn") == 0x3000 and mf.str("result") == "Recovered"


# -- the running guest -------------------------------------------------------------------------


def test_running_guest_continues_after_save_and_restore(
    guests: list[TestGuest], tmp_path: Path
) -> None:
    g = TestGuest(GuestConfig(ncpus=2, work=[Work.USER, Work.KERNEL]))
    guests.append(g)
    g.boot()
    g.wait_for("work", count=2)
    assert wait_until(lambda: g.counter(0) > 1000 and g.counter(1) > 10)
    path = tmp_path / "mid-work.xen"
    report = g.save(path, resume=False)
    assert report.size == path.stat().st_size and report.paused_seconds < 5
    saved = (g.counter(0), g.counter(1))
    rips = [g.vm.machine.submit(i, lambda v: int(v.get_regs().rip)).result(5) for i in (0, 1)]
    g.close()
    guests.remove(g)

    r = TestGuest.restore(path)
    guests.append(r)
    assert r.config.ncpus == 2 and r.config.work == [Work.USER, Work.KERNEL]
    assert (r.counter(0), r.counter(1)) == saved  # RAM exactly as saved
    assert [int(v.get_regs().rip) for v in r.vm.machine.vcpus] == rips
    r.start()
    assert wait_until(lambda: r.counter(0) > saved[0] + 1000 and r.counter(1) > saved[1] + 10)
    assert not r.find("boot") and not r.find("ready")  # it went on, it did not reboot
    recovers(r)  # its console goes on: the #MC handler's lines arrive
    assert r.vm.machine.stop_reason is None


def test_vmce_state_survives(guests: list[TestGuest], tmp_path: Path) -> None:
    g = TestGuest(GuestConfig(ncpus=1, work=[Work.KERNEL]))
    guests.append(g)
    g.boot()
    v = g.vm.domain.vcpus[0]
    assert v.banks[0].ctl2 == v.banks[1].ctl2 == 0x40000001  # the guest claimed CMCI at boot
    g.save(tmp_path / "v.xen", resume=False)
    r = TestGuest.restore(tmp_path / "v.xen")
    guests.append(r)
    assert r.vm.domain.save_vcpu(0) == g.vm.domain.save_vcpu(0)
    assert r.vm.domain.rdmsr(0, 0x281) == 0x40000001


# -- a vMCE in flight -------------------------------------------------------------------------


def test_mce_injected_before_the_save_is_handled_after_the_restore(
    guests: list[TestGuest], booted: tuple[Snapshot, tuple[int, int]], tmp_path: Path
) -> None:
    """Saved when the #MC is already in KVM (pending in each vCPU's event state) and the model
    holds MCIP and bank 1, as after a delivery that the pause caught before the guest ran;
    the original is dropped; the restored guest takes and handles the #MC."""
    g = from_snapshot(guests, booted[0])
    g.start()
    assert g.vm.pause()
    assert g.vm.domain.fill(SRAO, 0x5).ok  # Xen's fill, without marking anything pending
    for vid in range(2):  # the delivery itself, on each vCPU's thread, while it is parked
        assert g.vm.machine.inject_exception(vid, 18).result(5).accepted
    path = tmp_path / "inflight.xen"
    save_vm(g.vm, path, resume=False)
    assert not g.find("mce-enter")
    g.close()
    guests.remove(g)

    index = index_path(path)
    assert index.inflight[0] == VmceInflight(
        mcg_status=5, bank1_status=0xBD000000000000C0, bank1_addr=0x3000000, bank1_misc=0x86
    )
    assert index.inflight[1] == VmceInflight(mcg_status=5)
    r = TestGuest.restore(path)
    guests.append(r)
    r.start()
    exits = r.wait_for("mce-exit", count=2, timeout=20)
    assert sorted(e.int("cpu") for e in exits) == [0, 1]
    mce = r.wait_for("mce", lambda e: e.int("cpu") == 0)[0]
    assert mce.int("status") == 0xBD000000000000C0 and mce.int("addr") == 0x3000000
    assert r.wait_for("memory-failure")[0].str("result") == "Recovered"
    assert r.vm.deliveries == []  # nothing re-injected: the saved #MC was taken
    assert all(v.mcg_status == 0 for v in r.vm.domain.vcpus)


def test_mce_pending_in_the_model_is_delivered_after_the_restore(
    guests: list[TestGuest], booted: tuple[Snapshot, tuple[int, int]], tmp_path: Path
) -> None:
    """Saved between Xen's inject (mce_pending set) and the delivery: restored, the VMM
    delivers it when the guest starts."""
    g = from_snapshot(guests, booted[0])
    dom = g.vm.domain
    kicks = list(dom.on_pending)
    dom.on_pending.clear()  # hold the delivery back, as if the save came first
    assert dom.deliver(SRAO, 0x5).ok
    dom.on_pending.extend(kicks)
    assert all(v.mce_pending for v in dom.vcpus)
    path = tmp_path / "pending.xen"
    save_vm(g.vm, path)
    g.close()
    guests.remove(g)

    r = TestGuest.restore(path)
    guests.append(r)
    r.start()
    r.wait_for("mce-exit", count=2, timeout=20)
    assert r.wait_for("memory-failure")[0].str("result") == "Recovered"
    assert len(r.vm.deliveries) == 2 and all(d.accepted for d in r.vm.deliveries)


# -- snapshots -------------------------------------------------------------------------------


def test_snapshot_restores_many_times_copy_on_write(
    guests: list[TestGuest], booted: tuple[Snapshot, tuple[int, int]]
) -> None:
    snap, counters = booted
    digest = hashlib.sha256(snap.path.read_bytes()).hexdigest()
    pages = snap.image.memory_size // 4096
    for _ in range(3):
        g = from_snapshot(guests, snap)
        assert snap.last is not None
        assert snap.last.pages.mapped_pages > 0.95 * pages  # mapped, not copied
        assert (g.counter(0), g.counter(1)) == counters  # every restore starts alike
        g.start()
        assert wait_until(lambda g=g: g.counter(0) > counters[0] and g.counter(1) > counters[1])
        recovers(g)  # the guest writes its memory...
        g.close()
        guests.remove(g)
    assert hashlib.sha256(snap.path.read_bytes()).hexdigest() == digest  # ...not the file


def test_old_vmce_formats_restore_into_the_running_guest(
    guests: list[TestGuest], booted: tuple[Snapshot, tuple[int, int]], tmp_path: Path
) -> None:
    for size, ctl2 in ((8, 0), (24, 0x40000001)):
        g = from_snapshot(guests, booted[0])
        path = tmp_path / f"v{size}.xen"
        g.save(path, vmce_size=size)
        r = TestGuest.restore(path)
        guests.append(r)
        v = r.vm.domain.vcpus[0]
        assert v.mcg_cap == 0x1000C02 and v.banks[0].ctl2 == ctl2  # Xen's zero-extension
        r.start()
        recovers(r)


def test_intel_stream_on_an_amd_host_is_refused_before_anything_is_built(
    booted: tuple[Snapshot, tuple[int, int]],
) -> None:
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    with pytest.raises(StreamError) as e:
        restore_vm(booted[0].path, profile=HostProfile.amd())
    assert "HVM restore: unsupported MCA capabilities 0x1000c02 for d1v0 (supported: 0)" in str(
        e.value
    )
    assert len(os.listdir("/proc/self/fd")) == fds and threading.active_count() == threads


def test_broken_page_stays_broken(
    guests: list[TestGuest], booted: tuple[Snapshot, tuple[int, int]], tmp_path: Path
) -> None:
    g = from_snapshot(guests, booted[0])
    g.start()
    g.vm.memory_error(0x2567123, 0xBD000000004000CF)
    g.wait_for("memory-failure", timeout=20)
    path = tmp_path / "broken.xen"
    g.save(path)
    index, image = plan_restore(path)
    assert index.no_data == {0x2567: PageType.BROKEN} and image.broken == {0x2567}
    r = TestGuest.restore(path)
    guests.append(r)
    assert r.vm.host_memory.domains[1].p2m[0x2567].type is P2mType.RAM_BROKEN
    assert r.vm.machine.memory.read(0x2567000, 4096) == bytes(4096)


# -- irqchip, LAPIC and PIT -------------------------------------------------------------------


def test_irqchip_lapic_and_pit_round_trip(stub: Callable[[str], bytes], tmp_path: Path) -> None:
    """A stub spinning at CPL3 with the LAPIC timer armed, on a machine with the in-kernel
    irqchip and PIT: restored, every register, LAPIC page, PIC, IOAPIC and PIT channel equals
    the saved one, and the spin goes on."""
    stacks = [kernel_stack(i) for i in range(2)]
    config = VmceVmConfig(
        boot=DirectBoot(CODE_BASE, BOOT_INFO, stacks),
        vcpus=2,
        memory_size=RAM_SIZE,
        irqchip=True,
        pit=True,
    )
    counter = SCRATCH + 0x100
    with VmceVm(config) as vm:
        vm.machine.memory.write(CODE_BASE, stub("exc"))
        vm.machine.memory.write(BOOT_INFO, (3).to_bytes(8, "little") + (10).to_bytes(8, "little"))
        vm.machine.memory.write(
            BOOT_INFO + 16, (1).to_bytes(8, "little") + (10**9).to_bytes(8, "little")
        )
        vm.start()
        assert wait_until(lambda: vm.machine.memory.read_u64(counter) > 1000)
        path = tmp_path / "irqchip.xen"
        save_vm(vm, path, resume=False)
        saved = capture_machine(vm.machine)
    saved_clock = plan_restore(path)[1].machine.platform.clock.clock
    with restore_vm(path) as r:
        restored = capture_machine(r.machine)
        same_state(saved, restored)
        assert 0 <= restored.platform.clock.clock - saved_clock < 5 * 10**9  # kvmclock goes on
        before = r.machine.memory.read_u64(counter)
        r.start()
        assert wait_until(lambda: r.machine.memory.read_u64(counter) > before + 1000)
        assert r.machine.stop_reason is None


def same_state(a: MachineState, b: MachineState) -> None:
    for x, y in zip(a.vcpus, b.vcpus, strict=True):
        for name in ("regs", "sregs", "xsave", "xcrs", "debugregs", "events"):
            assert getattr(x, name).to_bytes() == getattr(y, name).to_bytes(), name
        assert x.mp_state == y.mp_state and x.halted == y.halted
        assert x.lapic is not None and y.lapic is not None
        lx, ly = bytearray(x.lapic.to_bytes()), bytearray(y.lapic.to_bytes())
        lx[0x390:0x394] = ly[0x390:0x394] = bytes(4)  # the timer's current count runs
        assert lx == ly
        tsc = {MSR_IA32_TSC}
        assert {k: v for k, v in x.msrs.items() if k not in tsc} == {
            k: v for k, v in y.msrs.items() if k not in tsc
        }
        assert 0 <= y.tsc - x.tsc < 10 * x.tsc_khz * 1000  # continues from the saved value
    pa, pb = a.platform, b.platform
    for name in ("pic_master", "pic_slave", "ioapic"):
        assert getattr(pa, name).to_bytes() == getattr(pb, name).to_bytes(), name
    assert pa.pit is not None and pb.pit is not None
    for cx, cy in zip(pa.pit.channels, pb.pit.channels, strict=True):
        for field in ("count", "mode", "rw_mode", "gate", "bcd", "status", "write_state"):
            assert getattr(cx, field) == getattr(cy, field), field


def test_vmce_restore_command_runs_the_saved_guest(
    booted: tuple[Snapshot, tuple[int, int]],
) -> None:
    import json
    import subprocess
    import sys

    args = ["restore", str(booted[0].path), "--timeout=0.3", "--cow", "--json"]
    r = subprocess.run(
        [sys.executable, "-m", "vmce.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stopped"] is None and out["vcpus"] == 2 and out["pages_mapped"] > 15000
    assert out["ran_seconds"] >= 0.3


def test_snapshot_replaced_after_planning_restores_the_new_file(
    guests: list[TestGuest], booted: tuple[Snapshot, tuple[int, int]], tmp_path: Path
) -> None:
    """A snapshot file replaced (renamed over) after it was checked is checked again, never
    mapped with the old file's page offsets."""
    path = tmp_path / "snap.xen"
    shutil.copyfile(booted[0].path, path)
    snap = Snapshot(path)
    assert snap.image is not None  # planned against the first file
    g = from_snapshot(guests, booted[0])
    g.start()
    assert wait_until(lambda: g.counter(0) > booted[1][0] + 1000)
    newer = tmp_path / "newer.xen"
    save_vm(g.vm, newer, resume=False)
    later = g.counter(0)
    os.replace(newer, path)
    r = TestGuest.restore(snap)
    guests.append(r)
    assert r.counter(0) == later  # the replaced file's state, not the planned one's
    r.start()
    recovers(r)


def test_restore_refuses_a_file_that_is_not_the_checked_one(
    booted: tuple[Snapshot, tuple[int, int]],
) -> None:
    from vmce.kvm.persist.restore import FileChanged, restore_from

    index, image = plan_restore(booted[0].path)
    st = os.stat(booted[0].path)
    threads = threading.active_count()
    with pytest.raises(FileChanged):
        restore_from(
            booted[0].path,
            index,
            image,
            cow=True,
            expect=(st.st_size, st.st_ino, st.st_mtime_ns + 1),
        )
    assert threading.active_count() == threads  # nothing was built
