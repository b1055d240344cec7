"""The vmce test guest on real KVM vCPUs: the seed's design as a guest kernel experiences it.

Every test drives a real guest through the VMM and asserts on what the guest reported.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator

import pytest

from vmce.guest.testguest import (
    ExitCode,
    Flags,
    GuestConfig,
    Mode,
    Probe,
    ProbeOp,
    TestGuest,
    Work,
)
from vmce.kvm.stop import StopKind
from vmce.mca.msr import VMCE_ROUTED_RANGES
from vmce.vmce import BankRecord, Domain, HostProfile, InjectionPolicy

pytestmark = pytest.mark.kvm

SRAO = BankRecord(0xBD000000000000C0, 0x3000000, 0x86)
SRAR = BankRecord(0xBD80000000000134, 0x3000000, 0x86)
ROUTED = [m for first, count in VMCE_ROUTED_RANGES for m in range(first, first + count)]
TIMEOUT_PANIC = "Timeout: Not all CPUs entered broadcast exception handler"


@pytest.fixture
def guests() -> Iterator[list[TestGuest]]:
    made: list[TestGuest] = []
    yield made
    for g in made:
        g.close()


def start(guests: list[TestGuest], config: GuestConfig, **kw: object) -> TestGuest:
    g = TestGuest(config, **kw)  # type: ignore[arg-type]
    guests.append(g)
    g.boot()
    return g


# -- the MSR interface seen from inside the guest ------------------------------------------

WRITES = [
    (0x17A, 0),
    (0x17A, 0x5),
    (0x17A, 0),
    (0x405, 1),
    (0x405, 0),
    (0x400, 0),
    (0x409, 5),
    (0x281, 0x40000001),
    (0x280, 0x7FFF),
    (0x282, 3),
    (0x4D0, 1),
    (0x4D0, 0),
    (0x179, 0x1FF),
    (0x17B, 0),
    (0x0, 5),
    (0x1, 5),
    (0x403, 0xFFFF),
    (0x47F, 1),
]


def probes() -> list[Probe]:
    ops = [Probe(ProbeOp.RDMSR, m) for m in ROUTED]
    for msr, value in WRITES:
        ops.append(Probe(ProbeOp.WRMSR, msr, value))
        ops.append(Probe(ProbeOp.RDMSR, msr))
    return ops


def shadow(profile: HostProfile) -> Domain:
    """A model in the state the guest's boot leaves vCPU 0 in (it claims both CMCI banks)."""
    d = Domain(profile, 1)
    if profile.is_intel:
        d.wrmsr(0, 0x280, 0x40000001)
        d.wrmsr(0, 0x281, 0x40000001)
    return d


def expected(model: Domain, p: Probe) -> tuple[str, int | None]:
    if p.op == ProbeOp.RDMSR:
        v = model.rdmsr(0, p.msr)
        return ("gp", None) if v is None else ("ok", v)
    return ("ok" if model.wrmsr(0, p.msr, p.value) else "gp", None)


def run_probes(guests: list[TestGuest], profile: HostProfile, ops: list[Probe]) -> None:
    g = TestGuest(GuestConfig(ncpus=1, mode=Mode.PROBE, probes=ops), profile=profile)
    guests.append(g)
    g.start()
    stop = g.vm.wait(60)
    assert stop is not None and stop.exit_code == ExitCode.DONE, (stop, g.text()[-2000:])
    seen = {e.int("index"): e for e in g.find("probe")}
    assert len(seen) == len(ops)
    model = shadow(profile)
    for i, p in enumerate(ops):
        result, value = expected(model, p)
        ev = seen[i]
        assert ev.str("result") == result, (i, hex(p.msr), ev.line)
        if value is not None:
            assert ev.int("value") == value, (i, hex(p.msr), ev.line)


@pytest.mark.parametrize("profile", [HostProfile.intel(), HostProfile.amd()], ids=["intel", "amd"])
def test_probe_matrix_equals_the_model(guests: list[TestGuest], profile: HostProfile) -> None:
    run_probes(guests, profile, probes())


@pytest.mark.parametrize("profile", [HostProfile.intel(), HostProfile.amd()], ids=["intel", "amd"])
def test_probe_matrix_spot_values(guests: list[TestGuest], profile: HostProfile) -> None:
    """A few rows of the reference, written out, as the guest reads them."""
    ops = [Probe(ProbeOp.RDMSR, m) for m in (0x179, 0x17B, 0x4D0, 0x400, 0x404, 0x408, 0x405)]
    g = TestGuest(GuestConfig(ncpus=1, mode=Mode.PROBE, probes=ops), profile=profile)
    guests.append(g)
    g.start()
    g.vm.wait(60)
    got = {e.int("msr"): (e.str("result"), e.fields.get("value")) for e in g.find("probe")}
    cap = 0x1000C02 if profile.is_intel else 0x2
    assert got[0x179] == ("ok", cap)
    assert got[0x17B] == ("ok", 0)
    assert got[0x4D0] == ("gp", None)
    assert got[0x400] == got[0x404] == ("ok", (1 << 64) - 1)
    assert got[0x408] == ("ok", 0)
    assert got[0x405] == ("ok", 0)


def test_guest_msr_fuzz_never_harms_the_vmm(guests: list[TestGuest]) -> None:
    """Random values to every MCA MSR from inside a vCPU: answered as the model says, and the
    guest runs to its end (the VMM neither crashes nor stops it)."""
    rng = random.Random(0x5EED)
    ops = []
    for _ in range(120):
        msr = rng.choice(ROUTED)
        value = rng.choice([0, 1, rng.getrandbits(64), (1 << 64) - 1, 1 << rng.randrange(64)])
        ops += [Probe(ProbeOp.WRMSR, msr, value), Probe(ProbeOp.RDMSR, msr)]
    ops += [Probe(ProbeOp.RDMSR, 0x179)]
    for profile in (HostProfile.intel(), HostProfile.amd()):
        run_probes(guests, profile, ops[:256])
        assert guests[-1].vm.domain.vcpus[0].mcg_cap == profile.default_mcg_cap


# -- delivery ------------------------------------------------------------------------------


@pytest.mark.parametrize("ncpus", [1, 2, 4, 8])
def test_broadcast_srao_recovers(guests: list[TestGuest], ncpus: int) -> None:
    work = [Work.KERNEL, Work.USER, Work.IDLE] * 3
    g = start(guests, GuestConfig(ncpus=ncpus, work=work[:ncpus]))
    d = g.vm.inject(SRAO, 0x5)
    assert d.ok and d.inject is not None and d.inject.pending == tuple(range(ncpus))
    exits = g.wait_for("mce-exit", count=ncpus, timeout=30)
    assert sorted(e.int("cpu") for e in exits) == list(range(ncpus))
    mf = g.wait_for("memory-failure")[0]
    assert mf.int("pfn") == 0x3000 and mf.str("result") == "Recovered"
    assert "Memory failure: 0x3000: recovery action for free buddy page: Recovered" in g.lines
    assert g.vm.machine.stop_reason is None  # the guest goes on
    assert all(x.accepted for x in g.vm.deliveries)
    assert all(v.mcg_status == 0 for v in g.vm.domain.vcpus)  # every handler cleared MCIP


def test_vcpu0_only_panics_on_the_rendezvous_timeout(guests: list[TestGuest]) -> None:
    cfg = GuestConfig(
        ncpus=4, work=[Work.KERNEL, Work.USER, Work.IDLE, Work.USER], monarch_timeout_us=200_000
    )
    g = start(guests, cfg, policy=InjectionPolicy.VCPU0)
    d = g.vm.inject(SRAO, 0x5)
    assert d.inject is not None and d.inject.pending == (0,)
    panic = g.wait_for("panic", timeout=30)[0]
    assert panic.str("msg") == TIMEOUT_PANIC
    assert (
        "mce: CPUs not responding to MCE broadcast (may include false positives): 1,2,3" in g.lines
    )
    stop = g.vm.wait(10)
    assert stop is not None and stop.exit_code == ExitCode.PANIC


def test_vcpu0_only_is_fine_on_one_vcpu(guests: list[TestGuest]) -> None:
    g = start(guests, GuestConfig(ncpus=1), policy=InjectionPolicy.VCPU0)
    g.vm.inject(SRAO, 0x5)
    assert g.wait_for("memory-failure")[0].str("result") == "Recovered"


def test_mc_while_mcip_set_shuts_down_and_the_vmm_survives(guests: list[TestGuest]) -> None:
    g = start(guests, GuestConfig(ncpus=2, flags=Flags.KEEP_MCIP))
    assert g.vm.inject(SRAO, 0x5).ok
    g.wait_for("mce-exit", count=2)
    second = g.vm.inject(SRAO, 0x5)
    assert not second.ok and second.crash is not None and "MCIP" in second.crash.reason
    stop = g.vm.wait(10)
    assert stop is not None and stop.kind is StopKind.SHUTDOWN_REQUESTED
    assert "MCIP" in stop.message and "triple fault" in stop.message
    # The VMM keeps running: a new guest boots and recovers.
    g2 = start(guests, GuestConfig(ncpus=2))
    g2.vm.inject(SRAO, 0x5)
    assert g2.wait_for("memory-failure")[0].str("result") == "Recovered"


def test_cr4_mce_clear_brings_the_guest_down(guests: list[TestGuest]) -> None:
    """Seed point 6: the hypervisor always injects; a guest that cannot take #MC dies."""
    g = start(guests, GuestConfig(ncpus=2, flags=Flags.NO_CR4_MCE))
    mca = g.find("mca")
    assert all(e.int("cr4_mce") == 0 for e in mca)
    d = g.vm.inject(SRAO, 0x5)
    assert d.ok  # no readiness check: injected regardless
    stop = g.vm.wait(10)
    assert stop is not None and stop.kind is StopKind.SHUTDOWN_REQUESTED
    assert "CR4.MCE clear" in stop.message
    assert not g.find("mce-enter")


def test_srar_in_user_code_kills_the_task_and_the_guest_goes_on(guests: list[TestGuest]) -> None:
    g = start(guests, GuestConfig(ncpus=2, work=[Work.USER, Work.KERNEL]))
    g.wait_for("work", lambda e: e.int("cpu") == 0)
    moving = threading.Event()
    for _ in range(500):  # the work line is printed just before the drop to CPL3
        if g.counter(0) > 0:
            moving.set()
            break
        moving.wait(0.01)
    assert moving.is_set(), "vCPU 0 never reached its user task"
    g.vm.inject(SRAR, 0x7)
    mce = g.wait_for("mce", lambda e: e.int("cpu") == 0)[0]
    assert mce.str("sev") == "AR" and mce.str("ctx") == "user"
    assert mce.str("msg") == "Action required: data load error in a user process"
    kill = g.wait_for("kill")[0]
    assert kill.int("cpu") == 0
    task = g.wait_for("task")[0]
    assert task.int("generation") == 1
    g.wait_for("mce-exit", count=2)
    before = g.counter(0)
    deadline_ok = threading.Event()
    for _ in range(200):
        if g.counter(0) > before:
            deadline_ok.set()
            break
        deadline_ok.wait(0.01)
    assert deadline_ok.is_set(), "the restarted user task does not run"
    assert g.vm.machine.stop_reason is None


def test_srar_in_kernel_code_panics(guests: list[TestGuest]) -> None:
    g = start(guests, GuestConfig(ncpus=1, work=[Work.KERNEL]))
    g.vm.inject(SRAR, 0x7)
    panic = g.wait_for("panic")[0]
    assert panic.str("msg") == "Fatal machine check"
    assert "mce: [Hardware Error]: Machine check: Data load in unrecoverable area of kernel" in (
        g.lines
    )


def test_amd_guest_has_no_recovery(guests: list[TestGuest]) -> None:
    g = start(
        guests, GuestConfig(ncpus=2, work=[Work.KERNEL, Work.USER]), profile=HostProfile.amd()
    )
    assert all(e.str("vendor") == "amd" and e.int("monarch_timeout_us") == 0 for e in g.find("mca"))
    g.vm.inject(SRAO, 0x5)
    assert g.wait_for("panic")[0].str("msg") == "Fatal local machine check"
    assert "mce: [Hardware Error]: Machine check: Uncorrected error without MCA Recovery" in (
        g.lines
    )


def test_host_memory_error_reaches_the_guest_at_its_own_address(guests: list[TestGuest]) -> None:
    g = start(guests, GuestConfig(ncpus=2))
    report = g.vm.memory_error(0x2567123, 0xBD000000004000CF)
    assert not report.host_panics and report.banks[0].guest_addr == 0x2567123
    mce = g.wait_for("mce")[0]
    assert mce.int("status") == 0xBD000000000000CF  # MSCOD masked
    assert mce.int("addr") == 0x2567100  # the guest masks below MISC's LSB (6)
    assert g.wait_for("memory-failure")[0].int("pfn") == 0x2567


# -- endurance -----------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def test_1000_injections_no_leak_no_hang(guests: list[TestGuest]) -> None:
    fds, threads, rss = _fds(), threading.active_count(), _rss_mib()
    g = start(guests, GuestConfig(ncpus=1, work=[Work.USER]))
    for i in range(1, 1001):
        d = g.vm.inject(BankRecord(0xBD000000000000C0, (0x1000 + i % 64) << 12, 0x86), 0x5)
        assert d.ok, (i, d.describe())
        g.wait_for("mce-exit", count=i, timeout=20)
    assert len(g.vm.deliveries) == 1000 and all(x.accepted for x in g.vm.deliveries)
    assert g.vm.machine.stop_reason is None
    g.close()
    guests.remove(g)
    assert _fds() == fds
    assert threading.active_count() == threads
    assert _rss_mib() - rss < 32, "resident memory grew by more than 32 MiB over 1000 #MCs"


def test_vmce_demo_end_to_end() -> None:
    """The README's first command, as a user runs it."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "vmce.cli.main", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All three guests behaved as the seed's design says" in " ".join(r.stdout.split())
    j = subprocess.run(
        [sys.executable, "-m", "vmce.cli.main", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    data = __import__("json").loads(j.stdout)
    assert data["as_designed"] is True
    broadcast, vcpu0, no_mce = data["guests"]
    assert broadcast["verdict"] == "recovered"
    assert broadcast["reason"] == (
        "Memory failure: 0x3000: recovery action for free buddy page: Recovered"
    )
    assert vcpu0["verdict"] == "panic"
    assert vcpu0["reason"] == "Timeout: Not all CPUs entered broadcast exception handler"
    assert no_mce["verdict"] == "shutdown" and "CR4.MCE clear" in no_mce["reason"]


def test_vmce_run_cli() -> None:
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmce.cli.main",
            "run",
            "--vcpus",
            "2",
            "--inject",
            "srao",
            "--via-host",
            "--addr",
            "0x2345678",
            "--timeout",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["verdict"] == "recovered"
    mces = [e for e in data["events"] if e["kind"] == "mce"]
    assert mces[0]["addr"] == 0x2345640  # the guest's own address, masked to MISC's LSB
    assert len(data["deliveries"]) == 2 and all(d["accepted"] for d in data["deliveries"])
    bad = subprocess.run(
        [sys.executable, "-m", "vmce.cli.main", "run", "--inject", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "unknown error 'nope'" in bad.stderr


def test_vmce_while_paused_waits_for_resume(guests: list[TestGuest]) -> None:
    """An injection into a paused VM stays pending in the model and is taken on resume."""
    g = start(guests, GuestConfig(ncpus=2))
    assert g.vm.pause()
    d = g.vm.inject(SRAO, 0x5)
    assert d.ok
    assert g.vm.deliveries == []  # nothing went into KVM while paused
    assert all(v.mce_pending for v in g.vm.domain.vcpus)
    g.vm.resume()
    g.wait_for("mce-exit", count=2)
    assert g.wait_for("memory-failure")[0].str("result") == "Recovered"
    assert len(g.vm.deliveries) == 2 and all(x.accepted for x in g.vm.deliveries)
