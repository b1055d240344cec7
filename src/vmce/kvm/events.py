"""Exception injection and triple-fault requests through KVM_GET/SET_VCPU_EVENTS.

These functions must run on the vCPU's own thread at a safe point; :class:`vmce.kvm.machine.
Machine` queues them there. KVM_SET_VCPU_EVENTS is a raw injector: it does not check CR4.MCE
or MCG_STATUS.MCIP (kvm-linux.md 1.6). Applying those rules is the MCA model's job.

Policy: an exception that is already injected or pending is never overwritten (the injection
is refused and reported); an injected interrupt or NMI is kept as it is (GET, modify, SET).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from vmce.kvm.abi import KvmVcpuEvents, MpState, VcpuEventValid
from vmce.kvm.vcpu import Vcpu


class Vector(IntEnum):
    """x86 exception vectors."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21


#: Vectors whose delivery pushes an error code.
ERROR_CODE_VECTORS = frozenset(
    {Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC, Vector.CP, 29, 30}
)


@dataclass(frozen=True)
class Injection:
    """The outcome of one exception injection."""

    vcpu_id: int
    vector: int
    accepted: bool
    detail: str
    woke_halted: bool = False


def describe_busy(events: KvmVcpuEvents) -> str | None:
    """Why a new exception cannot be queued now (an exception in flight), else None."""
    ex = events.exception
    if ex.injected or ex.pending:
        state = "injected" if ex.injected else "pending"
        return f"exception {int(ex.nr)} already {state}"
    return None


def validate_vector(vector: int) -> None:
    """Refuse vectors that KVM_SET_VCPU_EVENTS cannot take as exceptions."""
    if not 0 <= vector <= 31:
        raise ValueError(f"exception vector {vector} outside 0..31")
    if vector == Vector.NMI:
        raise ValueError("vector 2 is the NMI: use KVM_NMI, not an exception")


def inject_exception(
    vcpu: Vcpu,
    vector: int,
    *,
    error_code: int | None = None,
    use_payload: bool = False,
    has_irqchip: bool = False,
) -> Injection:
    """Queue exception ``vector`` on ``vcpu`` (on its thread, at a safe point).

    With ``use_payload`` (KVM_CAP_EXCEPTION_PAYLOAD enabled) the exception is *pending* with
    VALID_PAYLOAD (no payload), so KVM applies exception merging; otherwise it is *injected*.
    A vCPU halted in the in-kernel LAPIC is forced RUNNABLE, as QEMU does.
    """
    validate_vector(vector)
    events = vcpu.get_events()
    busy = describe_busy(events)
    if busy is not None:
        return Injection(vcpu.vcpu_id, vector, False, f"refused on vCPU {vcpu.vcpu_id}: {busy}")
    ex = events.exception
    ex.nr = vector
    if error_code is None and vector in ERROR_CODE_VECTORS:
        error_code = 0
    ex.has_error_code = int(error_code is not None)
    ex.error_code = error_code or 0
    if use_payload:
        ex.pending, ex.injected = 1, 0
        events.flags |= VcpuEventValid.PAYLOAD
        events.exception_has_payload = 0
        events.exception_payload = 0
    else:
        ex.pending, ex.injected = 0, 1
    vcpu.set_events(events)
    woke = False
    if has_irqchip and vcpu.get_mp_state() is MpState.HALTED:
        vcpu.set_mp_state(MpState.RUNNABLE)
        woke = True
    how = "pending (payload ABI)" if use_payload else "injected"
    return Injection(vcpu.vcpu_id, vector, True, f"vector {vector} {how}", woke)


def request_triple_fault(vcpu: Vcpu) -> None:
    """Make the next KVM_RUN return KVM_EXIT_SHUTDOWN (needs KVM_CAP_X86_TRIPLE_FAULT_EVENT)."""
    events = vcpu.get_events()
    events.flags |= VcpuEventValid.TRIPLE_FAULT
    events.triple_fault.pending = 1
    vcpu.set_events(events)
