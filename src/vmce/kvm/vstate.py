"""The whole state of a KVM machine as plain dataclasses: captured from a paused machine and
applied to a fresh one before its vCPUs first run.

This module speaks KVM only (ctypes layouts of ``<linux/kvm.h>``); :mod:`vmce.kvm.persist` maps
the state to Xen's migration stream. Threading (docs/kvm-notes.md): every vCPU ioctl of a
started machine runs on that vCPU's own thread, so :func:`capture_machine` pauses the machine
and submits one request per vCPU; :func:`apply_machine` runs before :meth:`Machine.start`,
when any thread may touch the vCPUs.

What a vCPU carries: general, segment and control registers, the XSAVE area (x87/SSE/AVX)
and XCR0, debug registers, pending events (exception, interrupt, NMI, SMI, triple fault),
MP state, the in-kernel LAPIC page (with an irqchip), the MSRs KVM saves and restores except
the machine-check ones (the vMCE model owns those), the MTRRs, and whether the VMM holds the
vCPU halted after a HLT exit (no irqchip). VM-wide: the two PICs, the IOAPIC, the PIT and
kvmclock. The UART is :class:`~vmce.kvm.devices.serial.SerialState`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from vmce.kvm.abi import (
    IrqchipId,
    KvmClockData,
    KvmDebugregs,
    KvmIoapicState,
    KvmIrqchip,
    KvmLapicState,
    KvmPicState,
    KvmPitState2,
    KvmRegs,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    MpState,
)
from vmce.kvm.devices.serial import SerialState
from vmce.kvm.machine import Machine
from vmce.kvm.runner import RunnerState
from vmce.kvm.vcpu import Vcpu
from vmce.kvm.vm import Vm
from vmce.mca.msr import AMD_THRESHOLD_MSRS, is_vmce_routed

#: Architectural MSR numbers this module treats specially.
MSR_IA32_TSC = 0x10
MSR_MTRR_CAP = 0xFE
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_TSC_DEADLINE = 0x6E0
#: Variable MTRRs (base/mask pairs) and the fixed-range MTRRs, in Xen's ``hvm_hw_mtrr`` order.
MTRR_VAR = tuple(range(0x200, 0x210))
MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MTRR_MSRS = (MSR_MTRR_CAP, MSR_MTRR_DEF_TYPE, *MTRR_VAR, *MTRR_FIXED)
#: MSRs KVM reports but refuses to have written (MTRRcap is read-only).
READ_ONLY_MSRS = frozenset({MSR_MTRR_CAP})

PAUSE_TIMEOUT = 5.0


class VmStateError(RuntimeError):
    """The machine cannot be captured (not paused, stopped) or a state does not fit it."""


@dataclass
class VcpuState:
    """One vCPU, as KVM's get ioctls return it (copies; the vCPU is not referenced)."""

    vcpu_id: int
    regs: KvmRegs
    sregs: KvmSregs
    xsave: KvmXsave
    xcrs: KvmXcrs
    debugregs: KvmDebugregs
    events: KvmVcpuEvents
    mp_state: MpState
    #: MSR index -> value, in the order they are written back (IA32_TSC first).
    msrs: dict[int, int]
    #: The in-kernel LAPIC's register page (``None`` without an irqchip).
    lapic: KvmLapicState | None = None
    #: The VMM parks the vCPU after a HLT exit (only without an irqchip).
    halted: bool = False
    tsc_khz: int = 0

    @property
    def tsc(self) -> int:
        """The guest TSC when the state was captured."""
        return self.msrs.get(MSR_IA32_TSC, 0)


@dataclass
class PlatformState:
    """VM-wide devices KVM emulates in the kernel: PICs, IOAPIC (irqchip), PIT, kvmclock."""

    clock: KvmClockData
    pic_master: KvmPicState | None = None
    pic_slave: KvmPicState | None = None
    ioapic: KvmIoapicState | None = None
    pit: KvmPitState2 | None = None

    @property
    def irqchip(self) -> bool:
        return self.ioapic is not None

    @property
    def has_pit(self) -> bool:
        return self.pit is not None


@dataclass
class MachineState:
    """A whole machine: its vCPUs, the in-kernel platform devices and the UART."""

    vcpus: list[VcpuState]
    platform: PlatformState
    serial: SerialState | None = None
    #: MSR indices captured (the same for every vCPU).
    msr_indices: tuple[int, ...] = field(default_factory=tuple)


# -- MSRs -------------------------------------------------------------------------------------


def saved_msr_indices(kvm_list: Iterable[int]) -> tuple[int, ...]:
    """The MSRs to save: KVM's save/restore list without the machine-check MSRs (the vMCE
    model's) and without duplicates, plus the MTRRs; IA32_TSC first."""
    out: list[int] = [MSR_IA32_TSC]
    for index in (*kvm_list, *MTRR_MSRS):
        if index in out or is_vmce_routed(index) or index in AMD_THRESHOLD_MSRS:
            continue
        out.append(index)
    return tuple(out)


def read_msrs(vcpu: Vcpu, indices: Sequence[int]) -> dict[int, int]:
    """Every readable MSR of ``indices``: KVM_GET_MSRS stops at the first it cannot read, so
    that one is skipped and the read continues after it."""
    out: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        out.update(got)
        rest = rest[len(got) + 1 :]
    return out


# -- one vCPU ---------------------------------------------------------------------------------


def capture_vcpu(
    vcpu: Vcpu, msr_indices: Sequence[int], *, irqchip: bool, halted: bool
) -> VcpuState:
    """Read one vCPU's state (on its own thread, or before its thread started)."""
    return VcpuState(
        vcpu_id=vcpu.vcpu_id,
        regs=vcpu.get_regs(),
        sregs=vcpu.get_sregs(),
        xsave=vcpu.get_xsave(),
        xcrs=vcpu.get_xcrs(),
        debugregs=vcpu.get_debugregs(),
        events=vcpu.get_events(),
        mp_state=vcpu.get_mp_state(),
        msrs=read_msrs(vcpu, msr_indices),
        lapic=vcpu.get_lapic() if irqchip else None,
        halted=halted,
        tsc_khz=vcpu.get_tsc_khz(),
    )


def apply_vcpu(vcpu: Vcpu, state: VcpuState, *, irqchip: bool) -> None:
    """Write a captured state into a vCPU that has not run (QEMU's order: registers before
    MSRs, the LAPIC before MP state and events, the TSC deadline after the LAPIC)."""
    sregs = state.sregs.copy()
    for i in range(len(sregs.interrupt_bitmap)):
        sregs.interrupt_bitmap[i] = 0  # a pending interrupt travels in the events
    vcpu.set_sregs(sregs)
    vcpu.set_xsave(state.xsave)
    vcpu.set_xcrs(state.xcrs)
    vcpu.set_regs(state.regs)
    late = {MSR_TSC_DEADLINE}
    # Only what differs from the fresh vCPU is written: KVM refuses some writes even of the
    # value it reports (e.g. MSR_KVM_ASYNC_PF_INT without an in-kernel LAPIC).
    fresh = read_msrs(vcpu, list(state.msrs))
    early = {
        k: v
        for k, v in state.msrs.items()
        if k not in late and k not in READ_ONLY_MSRS and (k == MSR_IA32_TSC or fresh.get(k) != v)
    }
    if early:
        vcpu.set_msrs(early)
    if irqchip:
        if state.lapic is None:
            raise VmStateError(f"vCPU {state.vcpu_id}: no LAPIC state for an irqchip machine")
        vcpu.set_lapic(state.lapic)
    if irqchip or state.mp_state != MpState.RUNNABLE:
        vcpu.set_mp_state(state.mp_state)
    vcpu.set_events(state.events)
    vcpu.set_debugregs(state.debugregs)
    tail = {k: v for k, v in state.msrs.items() if k in late}
    if tail and irqchip:
        vcpu.set_msrs(tail)


# -- the platform -----------------------------------------------------------------------------


def capture_platform(vm: Vm, *, pit: bool) -> PlatformState:
    """The VM-wide state (any thread)."""
    state = PlatformState(clock=vm.get_clock())
    if vm.has_irqchip:
        state.pic_master = vm.get_irqchip(IrqchipId.PIC_MASTER).chip.pic
        state.pic_slave = vm.get_irqchip(IrqchipId.PIC_SLAVE).chip.pic
        state.ioapic = vm.get_irqchip(IrqchipId.IOAPIC).chip.ioapic
        if pit:
            state.pit = vm.get_pit2()
    return state


def _irqchip(chip: IrqchipId, pic: KvmPicState | None, ioapic: KvmIoapicState | None) -> KvmIrqchip:
    out = KvmIrqchip()
    out.chip_id = chip
    if pic is not None:
        out.chip.pic = pic
    if ioapic is not None:
        out.chip.ioapic = ioapic
    return out


def apply_platform(vm: Vm, state: PlatformState) -> None:
    """Write the VM-wide devices into a VM whose vCPUs have not run (before the vCPUs).

    KVM restarts the PIT counters from their reload values on KVM_SET_PIT2 (as Xen restarts
    its PIT timers on load). kvmclock is :func:`apply_clock`'s, after the vCPUs' TSCs.
    """
    if state.irqchip != vm.has_irqchip:
        raise VmStateError("the saved machine and this one differ in having an irqchip")
    if vm.has_irqchip:
        assert state.pic_master is not None and state.pic_slave is not None
        vm.set_irqchip(_irqchip(IrqchipId.PIC_MASTER, state.pic_master, None))
        vm.set_irqchip(_irqchip(IrqchipId.PIC_SLAVE, state.pic_slave, None))
        vm.set_irqchip(_irqchip(IrqchipId.IOAPIC, None, state.ioapic))
        if state.pit is not None:
            vm.set_pit2(state.pit)


def apply_clock(vm: Vm, state: PlatformState) -> None:
    """kvmclock continues from the saved value (set last, as QEMU does just before the
    vCPUs run: KVM derives the clock from the TSCs written before)."""
    clock = KvmClockData()
    clock.clock = state.clock.clock
    vm.set_clock(clock)


# -- the machine ------------------------------------------------------------------------------


def capture_machine(machine: Machine, timeout: float = PAUSE_TIMEOUT) -> MachineState:
    """Everything of a paused (or never started) machine; the caller pauses and resumes it.

    Each vCPU is read on its own thread (a request to the parked thread), or on the caller's
    thread if it has not started.
    """
    vm = machine.vm
    if vm is None:
        raise VmStateError("the machine has no VM")
    if machine.stop_reason is not None:
        raise VmStateError(f"the machine has stopped: {machine.stop_reason.message}")
    indices = saved_msr_indices(machine.kvm.msr_index_list())
    irqchip = vm.has_irqchip
    futures: list[Future[VcpuState]] = []
    for runner in machine.runners:
        if not runner.wait_parked(0):
            raise VmStateError(f"vCPU {runner.vcpu.vcpu_id} is not paused")
        halted = runner.halted

        def grab(vcpu: Vcpu, halted: bool = halted) -> VcpuState:
            return capture_vcpu(vcpu, indices, irqchip=irqchip, halted=halted)

        if runner.state is RunnerState.NEW:  # no thread yet: any thread may read it
            done: Future[VcpuState] = Future()
            done.set_result(grab(runner.vcpu))
            futures.append(done)
        else:
            futures.append(machine.submit(runner.vcpu.vcpu_id, grab))
    vcpus = [f.result(timeout) for f in futures]
    platform = capture_platform(vm, pit=machine.config.pit)
    serial = machine.serial.save_state() if machine.serial is not None else None
    return MachineState(vcpus, platform, serial, indices)


def apply_machine(machine: Machine, state: MachineState) -> None:
    """Write a captured state into a machine that has not started."""
    vm = machine.vm
    if vm is None:
        raise VmStateError("the machine has no VM")
    if any(r.state is not RunnerState.NEW for r in machine.runners):
        raise VmStateError("state can only be applied before the machine starts")
    if len(state.vcpus) != len(machine.vcpus):
        raise VmStateError(
            f"the state has {len(state.vcpus)} vCPUs, the machine {len(machine.vcpus)}"
        )
    apply_platform(vm, state.platform)
    for vcpu, vstate in zip(machine.vcpus, state.vcpus, strict=True):
        apply_vcpu(vcpu, vstate, irqchip=vm.has_irqchip)
    apply_clock(vm, state.platform)
    for runner, vstate in zip(machine.runners, state.vcpus, strict=True):
        if vstate.halted:
            runner.set_halted()
    if state.serial is not None and machine.serial is not None:
        machine.serial.load_state(state.serial)
