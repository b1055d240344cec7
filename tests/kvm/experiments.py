"""kvm_pvm experiments with the guest stubs; prints the facts recorded in docs/kvm-notes.md.

Run alone on the machine (one guest at a time, nothing else busy on the 2 cores)::

    cd /work/main && PYTHONPATH=src python3 tests/kvm/experiments.py

(i) ways back from CPL3 to CPL0, (ii) #MC injected while at CPL3, (iii) exit round-trip costs
and kick latency, (iv) RDTSC at CPL0 and CPL3.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from excstub import USER_TSC, Mode, Off, UserAction, boot_info, user_counter
from kvmguest import Guest, make_guest
from stubbuild import build, kernel_stack, symbols

from vmce.kvm.pvm import host_is_pvm
from vmce.kvm.runner import RunnerState
from vmce.kvm.vm import MsrRange

OUT = Path(tempfile.mkdtemp(prefix="vmce-stubs-"))


def stub(name: str) -> bytes:
    return build(name, OUT)


def where(rip: int) -> str:
    """``symbol+offset`` of a RIP inside exc.s."""
    best = max(
        ((name, addr) for name, addr in symbols("exc", OUT).items() if addr <= rip),
        key=lambda item: item[1],
    )
    return f"{best[0]}+{rip - best[1]:#x}"


def run_guest(name: str, info: list[int], timeout: float = 10, **kw: Any) -> tuple[Guest, str]:
    g = make_guest(stub(name), 1, info, **kw)
    reason = g.machine.run(timeout)
    return g, str(reason)


def report(g: Guest) -> str:
    if not g.values(Off.VECTOR):
        return "no exception reported"
    rip = g.value64(Off.RIP)
    text = (
        f"vector {g.values(Off.VECTOR)[0]:#x} err {g.values(Off.ERROR_CODE)[0]:#x} "
        f"RIP {where(rip)} CS {g.values(Off.CS)[0]:#x} SS {g.values(Off.SS)[0]:#x} "
        f"RFLAGS {g.values(Off.RFLAGS)[0]:#x} frame top {g.value64(Off.FRAME_TOP):#x}"
    )
    if g.values(Off.VECTOR)[0] == 14:
        text += f" CR2 {g.value64(Off.CR2):#x}"
    return text


def cpl3_ways_back() -> None:
    print("## (i) CPL3 entry (iretq to 0x33/0x2b) and the ways back to CPL0")
    for action in UserAction:
        if action is UserAction.SPIN:
            continue
        irqchip = action is UserAction.TIMER
        info = boot_info(Mode.USER, action, timer=50_000_000)
        g, reason = run_guest("exc", info, irqchip=irqchip)
        extra = ""
        if action is UserAction.RDTSC:
            t0 = g.machine.memory.read_u64(USER_TSC)
            t1 = g.machine.memory.read_u64(USER_TSC + 8)
            extra = f" | user rdtsc {t0:#x} -> {t1:#x} (delta {t1 - t0})"
        if g.values(Off.SYSCALL_CS):
            extra = f" | SYSCALL target saw CS {g.values(Off.SYSCALL_CS)[0]:#x}"
        if g.values(Off.USER_DATA):
            extra += f" | user OUT reached the VMM: {[hex(v) for v in g.values(Off.USER_DATA)]}"
        print(f"- {action.name:10} {reason} | {report(g)}{extra}")
        g.machine.close()
    for mode in (Mode.INT3, Mode.UD2, Mode.INT80_CPL0):
        g, reason = run_guest("exc", boot_info(mode, resume=mode is Mode.INT3))
        fixups = dict(g.machine.fixups.counts)
        print(f"- CPL0 {mode.name:10} {reason} | {report(g)} | fix-ups {fixups}")
        g.machine.close()


def wait_user_spin(g: Guest, index: int = 0) -> None:
    deadline = time.monotonic() + 10
    while g.machine.memory.read_u64(user_counter(index)) == 0:
        if time.monotonic() > deadline:
            raise TimeoutError("user code did not start")
        time.sleep(0.0005)


def mc_at_cpl3() -> None:
    print("\n## (ii) #MC injected with KVM_SET_VCPU_EVENTS while the vCPU runs CPL3 code")
    latencies = []
    for _ in range(20):
        g = make_guest(stub("exc"), 1, boot_info(Mode.USER, UserAction.SPIN))
        g.machine.start()
        wait_user_spin(g)
        t0 = time.perf_counter()
        g.machine.inject_exception(0, 18).result(10)
        assert g.wait_value(Off.VECTOR)
        latencies.append(g.probe.writes[-1].time - t0)
        g.machine.wait(10)
        first = report(g)
        g.machine.close()
    print(f"- {first}; RSP0 (TSS) was {kernel_stack(0):#x}")
    print(f"- inject request -> handler's first OUT: {ms(latencies)}")


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    p90 = s[int(len(s) * 0.9) - 1]
    return (
        f"median {statistics.median(s) * 1e6:.0f} us, p90 {p90 * 1e6:.0f} us, "
        f"max {s[-1] * 1e6:.0f} us (n={len(s)})"
    )


class Msrs:
    def rdmsr(self, vcpu_id: int, index: int) -> int | None:
        return 0x1000C0A

    def wrmsr(self, vcpu_id: int, index: int, value: int) -> bool:
        return True


def exit_costs(iterations: int = 20000, vcpus: int = 1) -> None:
    names = {
        1: "filtered RDMSR -> Python",
        2: "OUT to an unclaimed port -> Python",
        3: "RDMSR IA32_TSC (in kernel)",
        4: "filtered WRMSR -> Python",
        5: "emulated dec/jnz (CPL0), per iteration",
    }
    g = make_guest(
        stub("msr_bench"),
        vcpus,
        [iterations],
        msr_handler=Msrs(),
        filtered_msrs=[MsrRange(0x179, 3), MsrRange(0x400, 0x80)],
    )
    g.machine.start()
    assert g.probe.wait_for(lambda ws: sum(w.value == 6 for w in ws) == vcpus, 120)
    g.machine.stop()
    g.machine.close()
    marks: dict[int, list[float]] = {}
    for w in g.probe.writes:
        marks.setdefault(w.value, []).append(w.time)
    print(f"\n## (iii) exit round trips, {iterations} iterations, {vcpus} vCPU(s) in parallel")
    for phase, name in names.items():
        if vcpus > 1 and phase > 1:
            break  # the vCPUs drift apart after phase 1: later phases overlap differently
        span = max(marks[phase + 1]) - min(marks[phase])
        count = iterations * vcpus * (10 if phase == 5 else 1)
        print(f"- {name}: {count / span / 1e3:.1f} k/s, {span / count * 1e6:.2f} us each")


def kick_latency(samples: int = 200) -> None:
    print("\n## (iii) kick latency: submit() -> the request runs on the vCPU thread")
    cases: list[tuple[str, list[int], dict[str, Any], Callable[[Guest], None]]] = [
        ("CPL3 spinning (native)", boot_info(Mode.USER, UserAction.SPIN), {}, wait_user_spin),
        (
            "CPL0 spinning (emulated)",
            boot_info(Mode.SPIN0),
            {},
            lambda g: g.wait_value(Off.HEARTBEAT) or None,
        ),
        (
            "halted, no irqchip (HLT exit, thread waits)",
            boot_info(Mode.HALT),
            {},
            lambda g: g.machine.runners[0].wait_state({RunnerState.HALTED}, 10) or None,
        ),
        (
            "halted in the in-kernel LAPIC (irqchip)",
            boot_info(Mode.HALT),
            {"irqchip": True},
            lambda g: g.wait_value(Off.READY) or None,
        ),
    ]
    for name, info, kw, ready in cases:
        g = make_guest(stub("exc"), 1, info, **kw)
        g.machine.start()
        ready(g)
        lat = []
        for _ in range(samples):
            t0 = time.perf_counter()
            t1 = g.machine.submit(0, lambda vcpu: time.perf_counter()).result(10)
            lat.append(t1 - t0)
        g.machine.close()
        print(f"- {name}: {ms(lat)}")


def rdtsc(loops: int = 20000) -> None:
    print("\n## (iv) RDTSC")
    g, reason = run_guest("exc", boot_info(Mode.RDTSC0))
    t0, t1 = g.value64(Off.TSC0), g.value64(Off.TSC1)
    print(f"- CPL0: {reason}; {t0:#x} -> {t1:#x} (delta {t1 - t0}, two OUT exits in between)")
    g.machine.close()
    g, reason = run_guest("exc", boot_info(Mode.RDTSC_LOOP0, timer=loops))
    t0, t1 = g.value64(Off.TSC0), g.value64(Off.TSC1)
    print(f"- CPL0 loop of {loops} rdtsc: {reason}; {(t1 - t0) / loops:.0f} TSC ticks each")
    g.machine.close()
    for n in (loops, loops * 100):
        g, reason = run_guest("exc", boot_info(Mode.USER, UserAction.RDTSC_LOOP, timer=n))
        t0 = g.machine.memory.read_u64(USER_TSC)
        t1 = g.machine.memory.read_u64(USER_TSC + 8)
        print(f"- CPL3 loop of {n} rdtsc: {reason}; {(t1 - t0) / n:.1f} TSC ticks each")
        g.machine.close()
    khz = tsc_khz()
    print(f"- guest TSC frequency (KVM_GET_TSC_KHZ): {khz} kHz")


def tsc_khz() -> int:
    from vmce.kvm.abi import Ioctl
    from vmce.kvm.fdio import ioctl

    g = make_guest(stub("exc"), 1, boot_info(Mode.HALT))
    try:
        return ioctl(g.machine.vcpus[0].fd, Ioctl.GET_TSC_KHZ)
    finally:
        g.machine.close()


def main() -> None:
    print(f"# vmce.kvm experiments (kvm_pvm host: {host_is_pvm()})\n")
    parts = sys.argv[1:] or ["cpl3", "mc", "exits", "kick", "rdtsc"]
    if "cpl3" in parts:
        cpl3_ways_back()
    if "mc" in parts:
        mc_at_cpl3()
    if "exits" in parts:
        exit_costs()
        exit_costs(vcpus=2)
    if "kick" in parts:
        kick_latency()
    if "rdtsc" in parts:
        rdtsc()


if __name__ == "__main__":
    main()
