"""Every kvm_pvm work-around lives here (feasibility.md sections 0 and 4.1).

On this host /dev/kvm is ``kvm_pvm``: guest CPL0 code runs in KVM's instruction emulator, which
cannot do some instructions and reports KVM_EXIT_INTERNAL_ERROR (suberror EMULATION) with the
instruction bytes. Fix-ups:

* ``int3`` (``CC``): RIP += 1, then inject #BP (vector 3), which is what the CPU would do.
* ``fwait`` (``9B``): a NOP (RIP += 1).

With ``enabled=False`` (a host with real VMX/SVM) nothing is fixed and such exits stop the VM.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from vmce.kvm.abi import EmulationFailureFlag, InternalError, KvmRun, KvmVcpuEvents
from vmce.kvm.events import Vector
from vmce.kvm.vcpu import Vcpu

PVM_MODULE = Path("/sys/module/kvm_pvm")


def host_is_pvm(module: Path = PVM_MODULE) -> bool:
    """True when the host's KVM backend is kvm_pvm."""
    return module.exists()


@dataclass(frozen=True)
class EmulationFailure:
    """A decoded KVM_INTERNAL_ERROR_EMULATION exit."""

    rip: int
    insn: bytes

    def describe(self) -> str:
        """E.g. ``instruction bytes cc 90 at RIP 0x100013``."""
        shown = self.insn.hex(" ") if self.insn else "(not reported)"
        return f"instruction bytes {shown} at RIP {self.rip:#x}"


def read_emulation_failure(run: KvmRun, rip: int) -> EmulationFailure | None:
    """Decode ``run`` if it holds an emulation failure, else None."""
    ef = run.emulation_failure
    if int(ef.suberror) != InternalError.EMULATION:
        return None
    insn = b""
    if int(ef.flags) & EmulationFailureFlag.INSTRUCTION_BYTES:
        size = min(int(ef.insn_size), 15)
        insn = bytes(ef.insn_bytes[:size])
    return EmulationFailure(rip, insn)


class FixupKind(Enum):
    """The instructions the VMM completes for the emulator."""

    INT3 = "int3"
    FWAIT = "fwait"


_OPCODES: dict[bytes, FixupKind] = {b"\xcc": FixupKind.INT3, b"\x9b": FixupKind.FWAIT}


class PvmFixups:
    """Applies the fix-ups on the vCPU thread; counts what it did."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.counts: Counter[FixupKind] = Counter()

    def try_fix(self, vcpu: Vcpu, failure: EmulationFailure) -> FixupKind | None:
        """Complete the failed instruction if it is one we know; None otherwise."""
        if not self.enabled or not failure.insn:
            return None
        kind = _OPCODES.get(failure.insn[:1])
        if kind is None:
            return None
        regs = vcpu.get_regs()
        regs.rip += 1
        vcpu.set_regs(regs)
        if kind is FixupKind.INT3:
            events: KvmVcpuEvents = vcpu.get_events()
            events.exception.injected = 1
            events.exception.pending = 0
            events.exception.nr = Vector.BP
            events.exception.has_error_code = 0
            vcpu.set_events(events)
        self.counts[kind] += 1
        return kind


#: Kernel command-line words a stock Linux guest needs on kvm_pvm (feasibility.md 4.1): the
#: emulator has no CMPXCHG16B, XRSTOR or vector instructions, and kvm_pvm ignores CPUID
#: feature words, so the guest is told to leave those features alone; ``rodata=off`` keeps
#: KVM's hypercall patching from faulting on read-only text.
LINUX_CMDLINE_FIXUPS: tuple[str, ...] = (
    "rodata=off",
    "noxsave",
    "nofsgsbase",
    "clearcpuid=cx16,erms,fsrm,popcnt,pcid,invpcid,smap,rdrand,rdseed,avx,avx2,avx512f,bmi1,"
    "bmi2,movbe,sha_ni,aes,pclmulqdq,sse4_1,sse4_2,ssse3",
)


def linux_cmdline_fixups(enabled: bool | None = None) -> list[str]:
    """The command-line words above where the host is kvm_pvm (or ``enabled``), else none."""
    on = host_is_pvm() if enabled is None else enabled
    return list(LINUX_CMDLINE_FIXUPS) if on else []
