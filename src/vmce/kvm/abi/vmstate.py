"""VM-wide layouts of the x86 KVM ABI: memory slots, caps, MSR filter, irqchip, PIT, clock."""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64

from vmce.kvm.abi.base import KvmStruct, KvmUnion
from vmce.kvm.abi.constants import KVM_IOAPIC_NUM_PINS, KVM_MSR_FILTER_MAX_RANGES


class KvmUserspaceMemoryRegion(KvmStruct):
    """``struct kvm_userspace_memory_region``: one guest-physical memory slot."""

    _c_name_ = "struct kvm_userspace_memory_region"
    _fields_ = (
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    )


class KvmEnableCap(KvmStruct):
    """``struct kvm_enable_cap``."""

    _c_name_ = "struct kvm_enable_cap"
    _fields_ = (
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    )


class KvmMsrFilterRange(KvmStruct):
    """``struct kvm_msr_filter_range``: ``nmsrs`` MSRs from ``base``; bitmap bit 1 = allow."""

    _c_name_ = "struct kvm_msr_filter_range"
    _fields_ = (
        ("flags", c_uint32),
        ("nmsrs", c_uint32),
        ("base", c_uint32),
        ("bitmap", ctypes.c_void_p),
    )


class KvmMsrFilter(KvmStruct):
    """``struct kvm_msr_filter``: default action plus up to 16 ranges (first match wins)."""

    _c_name_ = "struct kvm_msr_filter"
    _fields_ = (
        ("flags", c_uint32),
        ("ranges", KvmMsrFilterRange * KVM_MSR_FILTER_MAX_RANGES),
    )


class _IrqOrStatus(KvmUnion):
    _fields_ = (
        ("irq", c_uint32),
        ("status", c_int32),
    )


class KvmIrqLevel(KvmStruct):
    """``struct kvm_irq_level``: a GSI and its new level (KVM_IRQ_LINE)."""

    _c_name_ = "struct kvm_irq_level"
    _anonymous_ = ("u",)
    _fields_ = (
        ("u", _IrqOrStatus),
        ("level", c_uint32),
    )


class KvmPicState(KvmStruct):
    """``struct kvm_pic_state``: one 8259."""

    _c_name_ = "struct kvm_pic_state"
    _fields_ = tuple(
        (name, c_uint8)
        for name in (
            "last_irr",
            "irr",
            "imr",
            "isr",
            "priority_add",
            "irq_base",
            "read_reg_select",
            "poll",
            "special_mask",
            "init_state",
            "auto_eoi",
            "rotate_on_auto_eoi",
            "special_fully_nested_mode",
            "init4",
            "elcr",
            "elcr_mask",
        )
    )


class KvmIoapicState(KvmStruct):
    """``struct kvm_ioapic_state`` (redirection entries kept as raw 64-bit words)."""

    _c_name_ = "struct kvm_ioapic_state"
    _fields_ = (
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),
    )


class _IrqchipUnion(KvmUnion):
    _fields_ = (
        ("dummy", c_char * 512),
        ("pic", KvmPicState),
        ("ioapic", KvmIoapicState),
    )


class KvmIrqchip(KvmStruct):
    """``struct kvm_irqchip``: the state of one in-kernel PIC or the IOAPIC."""

    _c_name_ = "struct kvm_irqchip"
    _fields_ = (
        ("chip_id", c_uint32),
        ("pad", c_uint32),
        ("chip", _IrqchipUnion),
    )


class KvmPitConfig(KvmStruct):
    """``struct kvm_pit_config`` (KVM_CREATE_PIT2)."""

    _c_name_ = "struct kvm_pit_config"
    _fields_ = (
        ("flags", c_uint32),
        ("pad", c_uint32 * 15),
    )


class KvmPitChannelState(KvmStruct):
    """``struct kvm_pit_channel_state``: one 8254 channel."""

    _c_name_ = "struct kvm_pit_channel_state"
    _fields_ = (
        ("count", c_uint32),
        ("latched_count", c_uint16),
        *(
            (name, c_uint8)
            for name in [
                "count_latched",
                "status_latched",
                "status",
                "read_state",
                "write_state",
                "write_latch",
                "rw_mode",
                "mode",
                "bcd",
                "gate",
            ]
        ),
        ("count_load_time", c_int64),
    )


class KvmPitState2(KvmStruct):
    """``struct kvm_pit_state2``: the in-kernel PIT."""

    _c_name_ = "struct kvm_pit_state2"
    _fields_ = (
        ("channels", KvmPitChannelState * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    )


class KvmClockData(KvmStruct):
    """``struct kvm_clock_data``: the VM's kvmclock (KVM_GET/SET_CLOCK)."""

    _c_name_ = "struct kvm_clock_data"
    _fields_ = (
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    )
