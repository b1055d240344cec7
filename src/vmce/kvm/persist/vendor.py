"""Payloads of the vendor-trailer entries that carry what no Xen record holds (typecodes 0x81xx).

The trailer itself (framing, header, the in-flight vMCE) is :mod:`vmce.save.hvmrecords`; it
sits inside the HVM_CONTEXT record after the blob's END, where Xen's ``hvm_load`` never looks
and Xen's stream verifier accepts it (see :mod:`vmce.kvm.persist`). One entry per concern:

==============  ========  ==================================================================
entry           instance  contents
==============  ========  ==================================================================
VM_CONFIG       0         vCPUs, RAM size, irqchip/PIT, host profile, policy, domid, MFN base
KVM_VCPU        vCPU id   ``kvm_vcpu_events``, MP state, VMM halt, CR8, segment "unusable"
KVM_MSRS        vCPU id   MSRs KVM saves that no Xen record holds (``hvm_msr`` layout)
KVM_PLATFORM    0         kvmclock, PIC/IOAPIC/PIT fields Xen's records lack
UART            0         16550A registers, unread input, the unfinished output line
==============  ========  ==================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntFlag
from typing import ClassVar, TypeVar

from vmce.save.hvmctx import Record
from vmce.save.hvmrecords import CpuMsrs, VendorTypeCode
from vmce.save.layout import Layout, raw, u8, u32, u64
from vmce.vmce import HostProfile, InjectionPolicy, Vendor

VCPU_EVENTS_SIZE = 64


class VendorEntryError(ValueError):
    """A vendor entry whose payload vmce refuses; the message names it."""


def _check_size(cls: type[Layout], record: Record) -> None:
    if len(record.payload) != cls.size():
        raise VendorEntryError(
            f"offset {record.offset:#x}: vendor entry {record.typecode:#x} instance "
            f"{record.instance} is {len(record.payload)} bytes, not {cls.size()}"
        )


# -- VM_CONFIG --------------------------------------------------------------------------------


class MachineFlag(IntFlag):
    """``VmConfigEntry.flags``: the in-kernel devices the machine was built with."""

    IRQCHIP = 1 << 0
    PIT = 1 << 1


class HostFlag(IntFlag):
    """``VmConfigEntry.host_flags``: the host profile's capabilities."""

    SER = 1 << 0
    LMCE = 1 << 1


#: Host vendors by code (0 is "unknown"); a table, not an enum's order.
VENDOR_CODES: dict[Vendor, int] = {
    Vendor.UNKNOWN: 0,
    Vendor.INTEL: 1,
    Vendor.AMD: 2,
    Vendor.HYGON: 3,
    Vendor.CENTAUR: 4,
    Vendor.SHANGHAI: 5,
}
POLICY_CODES: dict[InjectionPolicy, int] = {InjectionPolicy.BROADCAST: 0, InjectionPolicy.VCPU0: 1}


@dataclass(frozen=True)
class VmConfigEntry(Layout):
    """How the saved machine was built: what the toolstack (not libxc) knows in Xen."""

    TYPECODE: ClassVar[VendorTypeCode] = VendorTypeCode.VM_CONFIG

    vcpus: int = u32(1)
    flags: int = u32()
    host_vendor: int = u32(1)
    host_flags: int = u32(HostFlag.SER)
    policy: int = u32()
    domid: int = u32(1)
    memory_size: int = u64()
    host_mfn_base: int = u64()

    @property
    def machine_flags(self) -> MachineFlag:
        return MachineFlag(self.flags)

    def host_profile(self) -> HostProfile:
        """The saving host's vMCE profile."""
        vendor = {code: v for v, code in VENDOR_CODES.items()}[self.host_vendor]
        flags = HostFlag(self.host_flags)
        return HostProfile(vendor, ser=HostFlag.SER in flags, lmce=HostFlag.LMCE in flags)

    def injection_policy(self) -> InjectionPolicy:
        return {code: p for p, code in POLICY_CODES.items()}[self.policy]

    @classmethod
    def of(
        cls,
        *,
        vcpus: int,
        memory_size: int,
        irqchip: bool,
        pit: bool,
        profile: HostProfile,
        policy: InjectionPolicy,
        domid: int,
        host_mfn_base: int,
    ) -> VmConfigEntry:
        flags = (MachineFlag.IRQCHIP if irqchip else 0) | (MachineFlag.PIT if pit else 0)
        host = (HostFlag.SER if profile.ser else 0) | (HostFlag.LMCE if profile.lmce else 0)
        return cls(
            vcpus,
            int(flags),
            VENDOR_CODES[profile.vendor],
            int(host),
            POLICY_CODES[policy],
            domid,
            memory_size,
            host_mfn_base,
        )

    def check(self) -> None:
        """Refuse values no machine could have been built with."""
        if not 1 <= self.vcpus <= 255:
            raise ValueError(f"{self.vcpus} vCPUs")
        if self.flags & ~int(MachineFlag.IRQCHIP | MachineFlag.PIT):
            raise ValueError(f"unknown machine flags {self.flags:#x}")
        if MachineFlag.PIT in self.machine_flags and MachineFlag.IRQCHIP not in self.machine_flags:
            raise ValueError("a PIT without an irqchip")
        if self.host_vendor not in VENDOR_CODES.values():
            raise ValueError(f"unknown host vendor code {self.host_vendor}")
        if self.host_flags & ~int(HostFlag.SER | HostFlag.LMCE):
            raise ValueError(f"unknown host flags {self.host_flags:#x}")
        if self.policy not in POLICY_CODES.values():
            raise ValueError(f"unknown injection policy code {self.policy}")
        if self.memory_size <= 0 or self.memory_size % 4096 or self.memory_size > 1 << 40:
            raise ValueError(f"guest RAM of {self.memory_size:#x} bytes")


# -- KVM_VCPU ---------------------------------------------------------------------------------


class VcpuFlag(IntFlag):
    """``KvmVcpuEntry.flags``."""

    #: The VMM held the vCPU after a HLT exit (no irqchip): it resumes halted.
    HALTED = 1 << 0


@dataclass(frozen=True)
class KvmVcpuEntry(Layout):
    """The vCPU state KVM has and ``hvm_hw_cpu`` does not.

    ``events`` is the whole ``struct kvm_vcpu_events`` (pending vs. injected exception and its
    payload, interrupt shadow, NMI pending/masked, SMI, triple fault); ``hvm_hw_cpu`` only has
    the one event being injected, which Xen tools see. ``unusable`` has bit *i* set when
    segment *i* (CS, DS, ES, FS, GS, SS, TR, LDTR) is marked unusable, which Xen folds into
    the present bit.
    """

    TYPECODE: ClassVar[VendorTypeCode] = VendorTypeCode.KVM_VCPU

    events: bytes = raw(VCPU_EVENTS_SIZE)
    mp_state: int = u32()
    flags: int = u32()
    cr8: int = u64()
    unusable: int = u32()
    rsvd: int = u32()

    def check(self) -> None:
        if self.flags & ~int(VcpuFlag.HALTED):
            raise ValueError(f"unknown vCPU flags {self.flags:#x}")
        if self.unusable > 0xFF or self.rsvd:
            raise ValueError("reserved bits set")


# -- KVM_PLATFORM -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KvmPlatformEntry(Layout):
    """VM-wide KVM state without a Xen record: kvmclock and the fields of KVM's PIC, IOAPIC
    and PIT that ``hvm_hw_vpic``, ``hvm_hw_vioapic`` and ``hvm_hw_pit`` lack (zero when the
    machine has no irqchip or PIT)."""

    TYPECODE: ClassVar[VendorTypeCode] = VendorTypeCode.KVM_PLATFORM

    clock: int = u64()
    clock_flags: int = u32()
    pit_flags: int = u32()
    pit_load_time0: int = u64()
    pit_load_time1: int = u64()
    pit_load_time2: int = u64()
    ioapic_irr: int = u32()
    master_last_irr: int = u8()
    master_elcr_mask: int = u8()
    slave_last_irr: int = u8()
    slave_elcr_mask: int = u8()


# -- UART -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UartHead(Layout):
    """The fixed part of a UART entry; ``rx_len`` unread input bytes and ``pending_len``
    bytes of the unfinished output line follow."""

    ier: int = u8()
    lcr: int = u8()
    mcr: int = u8()
    scr: int = u8()
    dll: int = u8()
    dlm: int = u8()
    fifo: int = u8()
    thri_pending: int = u8()
    rx_len: int = u32()
    pending_len: int = u32()


#: A line longer than this is not a console line any more.
UART_MAX_BUFFER = 1 << 20


def encode_uart(head: UartHead, rx: bytes, pending: bytes) -> bytes:
    return head.pack() + rx + pending


def decode_uart(record: Record) -> tuple[UartHead, bytes, bytes]:
    """Split a UART entry, checking its lengths."""
    payload = record.payload
    where = f"offset {record.offset:#x}: vendor UART entry"
    if len(payload) < UartHead.size():
        raise VendorEntryError(f"{where} is {len(payload)} bytes, shorter than its head")
    head = UartHead.unpack_from(payload)
    body = payload[UartHead.size() :]
    if head.rx_len > UART_MAX_BUFFER or head.pending_len > UART_MAX_BUFFER:
        raise VendorEntryError(f"{where}: buffers of {head.rx_len}/{head.pending_len} bytes")
    if len(body) != head.rx_len + head.pending_len:
        raise VendorEntryError(
            f"{where}: {len(body)} bytes after the head, {head.rx_len} + {head.pending_len} "
            "expected"
        )
    if head.fifo > 1 or head.thri_pending > 1:
        raise VendorEntryError(f"{where}: flag bytes must be 0 or 1")
    return head, bytes(body[: head.rx_len]), bytes(body[head.rx_len :])


# -- KVM_MSRS ---------------------------------------------------------------------------------


def encode_kvm_msrs(msrs: Mapping[int, int]) -> bytes:
    """The MSRs as Xen's ``hvm_msr`` payload (count, then index/reserved/value)."""
    return CpuMsrs.of(msrs).encode()


def decode_kvm_msrs(record: Record) -> dict[int, int]:
    try:
        msrs = CpuMsrs.decode(record.payload).msrs
    except ValueError as e:
        raise VendorEntryError(
            f"offset {record.offset:#x}: vendor KVM_MSRS entry of vCPU {record.instance}: {e}"
        ) from e
    out = dict(msrs)
    if len(out) != len(msrs):
        raise VendorEntryError(
            f"offset {record.offset:#x}: vendor KVM_MSRS entry of vCPU {record.instance} "
            "names an MSR twice"
        )
    return out


# -- fixed entries ----------------------------------------------------------------------------


def fixed_entry(
    value: VmConfigEntry | KvmVcpuEntry | KvmPlatformEntry, instance: int = 0
) -> Record:
    """A fixed-size vendor entry as a trailer record."""
    return Record(value.TYPECODE, instance, value.pack())


E = TypeVar("E", VmConfigEntry, KvmVcpuEntry, KvmPlatformEntry)


def decode_fixed(cls: type[E], record: Record) -> E:
    """Decode and check a fixed-size vendor entry."""
    _check_size(cls, record)
    value = cls.unpack_from(record.payload)
    check = getattr(value, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise VendorEntryError(
                f"offset {record.offset:#x}: vendor entry {record.typecode:#x} instance "
                f"{record.instance}: {e}"
            ) from e
    return value
