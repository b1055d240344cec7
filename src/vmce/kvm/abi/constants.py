"""Constants of the KVM ABI as enums (names follow ``<linux/kvm.h>`` without the prefix).

The ABI test checks every member against the C macro ``<PREFIX><NAME>`` listed in
:data:`C_PREFIXES`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag, unique

#: The only KVM API version there has ever been.
KVM_API_VERSION = 12
#: Limits from ``asm/kvm.h``.
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600
KVM_MAX_XCRS = 16
KVM_IOAPIC_NUM_PINS = 24
SYNC_REGS_SIZE_BYTES = 2048


@unique
class ExitReason(IntEnum):
    """``kvm_run.exit_reason`` (``KVM_EXIT_*``)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


@unique
class Cap(IntEnum):
    """Capability numbers for ``KVM_CHECK_EXTENSION``/``KVM_ENABLE_CAP`` (``KVM_CAP_*``)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    CLOCKSOURCE = 8
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    IRQ_INJECT_STATUS = 26
    MCE = 31
    PIT2 = 33
    PIT_STATE2 = 35
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    SYNC_REGS = 74
    SPLIT_IRQCHIP = 121
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    EXCEPTION_PAYLOAD = 164
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    XSAVE2 = 208
    X86_TRIPLE_FAULT_EVENT = 218


@unique
class MpState(IntEnum):
    """``kvm_mp_state.mp_state`` (``KVM_MP_STATE_*``)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


@unique
class IoDirection(IntEnum):
    """``kvm_run.io.direction`` (``KVM_EXIT_IO_*``)."""

    IN = 0
    OUT = 1


class MsrExitReason(IntFlag):
    """Why a RDMSR/WRMSR came to user space; also the mask for ``KVM_CAP_X86_USER_SPACE_MSR``."""

    INVAL = 1 << 0
    UNKNOWN = 1 << 1
    FILTER = 1 << 2


class MsrFilterAccess(IntFlag):
    """``kvm_msr_filter_range.flags`` (``KVM_MSR_FILTER_READ``/``WRITE``)."""

    READ = 1 << 0
    WRITE = 1 << 1


@unique
class MsrFilterDefault(IntEnum):
    """``kvm_msr_filter.flags`` (``KVM_MSR_FILTER_DEFAULT_*``)."""

    ALLOW = 0
    DENY = 1


class VcpuEventValid(IntFlag):
    """``kvm_vcpu_events.flags`` (``KVM_VCPUEVENT_VALID_*``)."""

    NMI_PENDING = 0x01
    SIPI_VECTOR = 0x02
    SHADOW = 0x04
    SMM = 0x08
    PAYLOAD = 0x10
    TRIPLE_FAULT = 0x20


@unique
class InternalError(IntEnum):
    """``kvm_run.internal.suberror`` (``KVM_INTERNAL_ERROR_*``)."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class EmulationFailureFlag(IntFlag):
    """``kvm_run.emulation_failure.flags`` (``KVM_INTERNAL_ERROR_EMULATION_FLAG_*``)."""

    INSTRUCTION_BYTES = 1 << 0


@unique
class SystemEvent(IntEnum):
    """``kvm_run.system_event.type`` (``KVM_SYSTEM_EVENT_*``)."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MemFlag(IntFlag):
    """``kvm_userspace_memory_region.flags`` (``KVM_MEM_*``)."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


class CpuidFlag(IntFlag):
    """``kvm_cpuid_entry2.flags`` (``KVM_CPUID_FLAG_*``; the header's spelling)."""

    SIGNIFCANT_INDEX = 1 << 0
    STATEFUL_FUNC = 1 << 1
    STATE_READ_NEXT = 1 << 2


@unique
class IrqchipId(IntEnum):
    """``kvm_irqchip.chip_id`` (``KVM_IRQCHIP_*``)."""

    PIC_MASTER = 0
    PIC_SLAVE = 1
    IOAPIC = 2


class ClockFlag(IntFlag):
    """``kvm_clock_data.flags`` (``KVM_CLOCK_*``)."""

    TSC_STABLE = 2
    REALTIME = 1 << 2
    HOST_TSC = 1 << 3


class PitFlag(IntFlag):
    """``kvm_pit_state2.flags`` (``KVM_PIT_FLAGS_*``)."""

    HPET_LEGACY = 0x1
    SPEAKER_DATA_ON = 0x2


#: For the ABI test: the C macro prefix of each enum's members.
C_PREFIXES: dict[type[IntEnum] | type[IntFlag], str] = {
    ExitReason: "KVM_EXIT_",
    Cap: "KVM_CAP_",
    MpState: "KVM_MP_STATE_",
    IoDirection: "KVM_EXIT_IO_",
    MsrExitReason: "KVM_MSR_EXIT_REASON_",
    MsrFilterAccess: "KVM_MSR_FILTER_",
    MsrFilterDefault: "KVM_MSR_FILTER_DEFAULT_",
    VcpuEventValid: "KVM_VCPUEVENT_VALID_",
    InternalError: "KVM_INTERNAL_ERROR_",
    EmulationFailureFlag: "KVM_INTERNAL_ERROR_EMULATION_FLAG_",
    SystemEvent: "KVM_SYSTEM_EVENT_",
    MemFlag: "KVM_MEM_",
    CpuidFlag: "KVM_CPUID_FLAG_",
    IrqchipId: "KVM_IRQCHIP_",
    ClockFlag: "KVM_CLOCK_",
    PitFlag: "KVM_PIT_FLAGS_",
}

#: Plain constants checked by the ABI test against the macro of the same name.
C_CONSTANTS: dict[str, int] = {
    "KVM_API_VERSION": KVM_API_VERSION,
    "KVM_MSR_FILTER_MAX_RANGES": KVM_MSR_FILTER_MAX_RANGES,
    "KVM_MSR_FILTER_MAX_BITMAP_SIZE": KVM_MSR_FILTER_MAX_BITMAP_SIZE,
    "KVM_MAX_XCRS": KVM_MAX_XCRS,
    "KVM_IOAPIC_NUM_PINS": KVM_IOAPIC_NUM_PINS,
    "SYNC_REGS_SIZE_BYTES": SYNC_REGS_SIZE_BYTES,
}
