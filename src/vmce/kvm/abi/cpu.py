"""Per-vCPU state layouts of the x86 KVM ABI (``asm/kvm.h`` and ``linux/kvm.h``).

Flexible arrays (``kvm_msrs.entries``, ``kvm_cpuid2.entries``...) are declared with length 0;
:mod:`vmce.kvm.abi.flex` allocates them with a real length.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

from vmce.kvm.abi.base import KvmStruct
from vmce.kvm.abi.constants import KVM_MAX_XCRS


class KvmRegs(KvmStruct):
    """``struct kvm_regs``: the general-purpose registers, RIP and RFLAGS."""

    _c_name_ = "struct kvm_regs"
    _fields_ = tuple(
        (name, c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    )


class KvmSegment(KvmStruct):
    """``struct kvm_segment``: a segment register with its hidden descriptor cache."""

    _c_name_ = "struct kvm_segment"
    _fields_ = (
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    )


class KvmDtable(KvmStruct):
    """``struct kvm_dtable``: GDTR or IDTR."""

    _c_name_ = "struct kvm_dtable"
    _fields_ = (
        ("base", c_uint64),
        ("limit", c_uint16),
        ("padding", c_uint16 * 3),
    )


class KvmSregs(KvmStruct):
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER."""

    _c_name_ = "struct kvm_sregs"
    _fields_ = (
        *((name, KvmSegment) for name in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *((name, c_uint64) for name in ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]),
        ("interrupt_bitmap", c_uint64 * 4),
    )


class KvmFpu(KvmStruct):
    """``struct kvm_fpu``: x87 and SSE state."""

    _c_name_ = "struct kvm_fpu"
    _fields_ = (
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    )


class _EventException(KvmStruct):
    _fields_ = (
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    )


class _EventInterrupt(KvmStruct):
    _fields_ = (
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("soft", c_uint8),
        ("shadow", c_uint8),
    )


class _EventNmi(KvmStruct):
    _fields_ = (
        ("injected", c_uint8),
        ("pending", c_uint8),
        ("masked", c_uint8),
        ("pad", c_uint8),
    )


class _EventSmi(KvmStruct):
    _fields_ = (
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    )


class _EventTripleFault(KvmStruct):
    _fields_ = (("pending", c_uint8),)


class KvmVcpuEvents(KvmStruct):
    """``struct kvm_vcpu_events``: pending/injected exception, interrupt, NMI, SMI, triple fault."""

    _c_name_ = "struct kvm_vcpu_events"
    _fields_ = (
        ("exception", _EventException),
        ("interrupt", _EventInterrupt),
        ("nmi", _EventNmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _EventSmi),
        ("triple_fault", _EventTripleFault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    )


class KvmMpState(KvmStruct):
    """``struct kvm_mp_state``."""

    _c_name_ = "struct kvm_mp_state"
    _fields_ = (("mp_state", c_uint32),)


class KvmMsrEntry(KvmStruct):
    """``struct kvm_msr_entry``."""

    _c_name_ = "struct kvm_msr_entry"
    _fields_ = (
        ("index", c_uint32),
        ("reserved", c_uint32),
        ("data", c_uint64),
    )


class KvmMsrs(KvmStruct):
    """``struct kvm_msrs`` header (``entries`` is a flexible array)."""

    _c_name_ = "struct kvm_msrs"
    _fields_ = (
        ("nmsrs", c_uint32),
        ("pad", c_uint32),
        ("entries", KvmMsrEntry * 0),
    )


class KvmMsrList(KvmStruct):
    """``struct kvm_msr_list`` header (``indices`` is a flexible array)."""

    _c_name_ = "struct kvm_msr_list"
    _fields_ = (
        ("nmsrs", c_uint32),
        ("indices", c_uint32 * 0),
    )


class KvmCpuidEntry2(KvmStruct):
    """``struct kvm_cpuid_entry2``: one CPUID leaf/subleaf."""

    _c_name_ = "struct kvm_cpuid_entry2"
    _fields_ = (
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    )


class KvmCpuid2(KvmStruct):
    """``struct kvm_cpuid2`` header (``entries`` is a flexible array)."""

    _c_name_ = "struct kvm_cpuid2"
    _fields_ = (
        ("nent", c_uint32),
        ("padding", c_uint32),
        ("entries", KvmCpuidEntry2 * 0),
    )


class KvmLapicState(KvmStruct):
    """``struct kvm_lapic_state``: the 1 KiB local APIC register page."""

    _c_name_ = "struct kvm_lapic_state"
    _fields_ = (("regs", ctypes.c_char * 1024),)


class KvmXsave(KvmStruct):
    """``struct kvm_xsave``: the legacy 4 KiB XSAVE area (``extra`` is for KVM_GET_XSAVE2)."""

    _c_name_ = "struct kvm_xsave"
    _fields_ = (
        ("region", c_uint32 * 1024),
        ("extra", c_uint32 * 0),
    )


class KvmXcr(KvmStruct):
    """``struct kvm_xcr``."""

    _c_name_ = "struct kvm_xcr"
    _fields_ = (
        ("xcr", c_uint32),
        ("reserved", c_uint32),
        ("value", c_uint64),
    )


class KvmXcrs(KvmStruct):
    """``struct kvm_xcrs``: the extended control registers (XCR0)."""

    _c_name_ = "struct kvm_xcrs"
    _fields_ = (
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", KvmXcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    )


class KvmDebugregs(KvmStruct):
    """``struct kvm_debugregs``: DR0-3, DR6, DR7."""

    _c_name_ = "struct kvm_debugregs"
    _fields_ = (
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    )


class KvmX86Mce(KvmStruct):
    """``struct kvm_x86_mce``: the argument of KVM_X86_SET_MCE (KVM's own MCA path)."""

    _c_name_ = "struct kvm_x86_mce"
    _fields_ = (
        ("status", c_uint64),
        ("addr", c_uint64),
        ("misc", c_uint64),
        ("mcg_status", c_uint64),
        ("bank", c_uint8),
        ("pad1", c_uint8 * 7),
        ("pad2", c_uint64 * 3),
    )
