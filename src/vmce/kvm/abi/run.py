"""``struct kvm_run``: the page shared between KVM and the VMM for each vCPU (mmap of the fd).

Only the exit-union members this VMM reads are declared; ``padding`` fixes the union at 256
bytes like the header does.
"""

from __future__ import annotations

from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64

from vmce.kvm.abi.base import KvmStruct, KvmUnion
from vmce.kvm.abi.constants import SYNC_REGS_SIZE_BYTES


class RunHw(KvmStruct):
    """``hw`` (KVM_EXIT_UNKNOWN)."""

    _fields_ = (("hardware_exit_reason", c_uint64),)


class RunFailEntry(KvmStruct):
    """``fail_entry`` (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = (
        ("hardware_entry_failure_reason", c_uint64),
        ("cpu", c_uint32),
    )


class RunEx(KvmStruct):
    """``ex`` (KVM_EXIT_EXCEPTION)."""

    _fields_ = (
        ("exception", c_uint32),
        ("error_code", c_uint32),
    )


class RunIo(KvmStruct):
    """``io`` (KVM_EXIT_IO): data lives at ``data_offset`` from the start of kvm_run."""

    _fields_ = (
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    )


class RunDebugArch(KvmStruct):
    """``struct kvm_debug_exit_arch`` (x86)."""

    _c_name_ = "struct kvm_debug_exit_arch"
    _fields_ = (
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    )


class RunDebug(KvmStruct):
    """``debug`` (KVM_EXIT_DEBUG)."""

    _fields_ = (("arch", RunDebugArch),)


class RunMmio(KvmStruct):
    """``mmio`` (KVM_EXIT_MMIO)."""

    _fields_ = (
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    )


class RunInternal(KvmStruct):
    """``internal`` (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = (
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("data", c_uint64 * 16),
    )


class RunEmulationFailure(KvmStruct):
    """``emulation_failure``: the overlay of ``internal`` for suberror EMULATION."""

    _fields_ = (
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    )


class _SystemEventData(KvmUnion):
    _fields_ = (
        ("flags", c_uint64),
        ("data", c_uint64 * 16),
    )


class RunSystemEvent(KvmStruct):
    """``system_event`` (KVM_EXIT_SYSTEM_EVENT)."""

    _anonymous_ = ("u",)
    _fields_ = (
        ("type", c_uint32),
        ("ndata", c_uint32),
        ("u", _SystemEventData),
    )


class RunMsr(KvmStruct):
    """``msr`` (KVM_EXIT_X86_RDMSR/WRMSR): ``error`` and ``data`` are written back by the VMM."""

    _fields_ = (
        ("error", c_uint8),
        ("pad", c_uint8 * 7),
        ("reason", c_uint32),
        ("index", c_uint32),
        ("data", c_uint64),
    )


class _ExitUnion(KvmUnion):
    _fields_ = (
        ("hw", RunHw),
        ("fail_entry", RunFailEntry),
        ("ex", RunEx),
        ("io", RunIo),
        ("debug", RunDebug),
        ("mmio", RunMmio),
        ("internal", RunInternal),
        ("emulation_failure", RunEmulationFailure),
        ("system_event", RunSystemEvent),
        ("msr", RunMsr),
        ("padding", c_char * 256),
    )


class _SyncRegs(KvmUnion):
    _fields_ = (("padding", c_char * SYNC_REGS_SIZE_BYTES),)


class KvmRun(KvmStruct):
    """``struct kvm_run`` (x86): header, exit union (anonymous in C) and the sync-regs area."""

    _c_name_ = "struct kvm_run"
    _anonymous_ = ("u",)
    _fields_ = (
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("u", _ExitUnion),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", _SyncRegs),
    )
