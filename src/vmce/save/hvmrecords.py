"""Xen HVM save records that vmce emits, declared once, byte-exact with Xen's public header.

Each record of the HVM context blob (see :mod:`vmce.save.hvmctx`) is declared here as a
:class:`~vmce.save.layout.Layout` whose size and field offsets equal the x86-64 layout of the
structure in Xen's ``xen/include/public/arch-x86/hvm/save.h``, explicit padding included:

=============  ========  ===========================  ==========================
class          typecode  Xen structure                size (bytes)
=============  ========  ===========================  ==========================
HvmCpu         2         ``struct hvm_hw_cpu``        1032 (compat form: 1016)
Pic            3         ``struct hvm_hw_vpic``       8 (instance 0 master, 1 slave)
Ioapic         4         ``struct hvm_hw_vioapic``    400 (48 redirection entries)
Lapic          5         ``struct hvm_hw_lapic``      32 (4 bytes tail padding)
LapicRegs      6         ``struct hvm_hw_lapic_regs`` 1024
Pit            10        ``struct hvm_hw_pit``        56
Mtrr           14        ``struct hvm_hw_mtrr``       240
CpuXsave       16        ``struct hvm_hw_cpu_xsave``  600 + extended save area
TscAdjust      19        ``struct hvm_tsc_adjust``    8
CpuMsrs        20        ``struct hvm_msr``           8 + 16 per MSR
=============  ========  ===========================  ==========================

(VMCE_VCPU, typecode 18, lives in :mod:`vmce.save.hvmctx` as ``VmceVcpu``.)

Every class has ``TYPECODE``, ``to_record(instance)`` building a :class:`~vmce.save.hvmctx.Record`
and ``from_record(record)`` decoding one back with Xen's length rules (exact length, or
"zero-extend" for the types Xen loads with ``hvm_load_entry_zeroextend``). Decoding errors raise
:class:`~vmce.save.hvmctx.HvmContextError` naming the record and its offset in the blob.

The in-flight vMCE extension
----------------------------

Xen migrates only four vMCE values per vCPU (VMCE_VCPU); a machine check that is in flight when
the guest is saved (MCG_STATUS.MCIP, bank 0/1 STATUS/ADDR/MISC, the pending #MC) is dropped.
vmce keeps it, in a **vendor trailer placed inside the HVM_CONTEXT record, after the blob's END
descriptor**::

    [HEADER] [Xen records ...] [END]  [VENDOR_HEADER magic "VMCE" v1] [VMCE_INFLIGHT x N] [END]
    \\________ what Xen sees _______/  \\______________ vmce vendor trailer ________________/

Why there, and not elsewhere (each alternative checked against Xen's sources):

* an optional libxc stream record (type ``0x80000001``, bit 31 set) is what the stream spec
  intends for such data, and libxc's C restorer would skip it, but Xen's own verifier
  ``tools/python/scripts/verify-stream-v2`` rejects every type outside 0x00-0x12 ("Unrecognised
  record type 0x80000001"): the streams must pass that verifier, so this is out;
* a second HVM_CONTEXT record would *replace* the first in libxc (``update_blob``);
* a vendor HVM_PARAMS index would make libxc's restorer fail on ``xc_hvm_param_set``;
* a vendor typecode *before* END: Xen's ``hvm_load`` refuses any typecode above
  HVM_SAVE_CODE_MAX (20) with ``-EINVAL`` (mandatory semantics, so real Xen could not restore
  our streams at all), 22-34 are reserved for Amazon, and this project's own
  :meth:`HvmContext.decode <vmce.save.hvmctx.HvmContext.decode>` refuses such typecodes too;
* after END: ``hvm_load`` (both its check and real passes) returns at the first END descriptor
  and never looks at the bytes after it; the verifier checks only that HVM_CONTEXT is non-empty.
  So Xen restores such a stream and drops the in-flight vMCE exactly as it drops its own, while
  vmce's restorer restores it: the "optional" semantics we want.

The trailer is written only when there is something to put in it, so a quiet guest's blob
from the model alone is byte-for-byte what Xen itself would produce. The trailer reuses the
blob's descriptor format; its typecodes have bit 15 set (:class:`VendorTypeCode`), echoing the
stream's optional bit 31 and far from Xen's range, and it starts with a magic/version header
so it can evolve.

The same trailer carries the state of vmce's KVM VMM that no Xen record holds (typecodes
0x81xx: machine configuration, KVM-only vCPU and platform fields, the UART). This module
frames those entries and checks their typecodes; :mod:`vmce.kvm.persist.vendor` defines their
payloads. Readers that know only the in-flight vMCE (:func:`decode_context`) validate and
skip them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from vmce.save.hvmctx import (
    HVM_SAVE_CODE_MAX,
    Descriptor,
    HvmContext,
    HvmContextError,
    Record,
    TypeCode,
    VmceVcpu,
)
from vmce.save.layout import Layout, raw, u8, u16, u32, u64
from vmce.vmce import VCpuSnapshot

# -- common machinery -------------------------------------------------------------------------


def _where(record: Record) -> str:
    return f"offset {record.offset:#x}: {record.name} instance {record.instance}"


def _u64s(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 8}Q", data)


def _pack_u64s(values: Sequence[int], count: int, what: str) -> bytes:
    if len(values) != count:
        raise ValueError(f"{what} needs exactly {count} values, not {len(values)}")
    return struct.pack(f"<{count}Q", *values)


class HvmEntry(Layout):
    """A fixed-size HVM save record: a Layout that knows its typecode and Xen's length rule."""

    TYPECODE: ClassVar[TypeCode]
    #: Xen loads the type with ``hvm_load_entry_zeroextend``: a shorter payload is zero-filled.
    ZERO_EXTEND: ClassVar[bool] = False

    def to_record(self, instance: int = 0) -> Record:
        """This value as one entry of an HVM context blob."""
        return Record(self.TYPECODE, instance, self.pack())

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload of the exact size (or shorter, zero-filled, if ``ZERO_EXTEND``)."""
        size = cls.size()
        if len(payload) == size or (cls.ZERO_EXTEND and len(payload) < size):
            return cls.unpack_from(payload.ljust(size, b"\0"))
        rule = "at most" if cls.ZERO_EXTEND else "exactly"
        raise ValueError(f"payload is {len(payload)} bytes, {rule} {size} expected")

    @classmethod
    def from_record(cls, record: Record) -> Self:
        """Decode a blob entry of this type; :class:`HvmContextError` names the entry."""
        _check_typecode(record, cls.TYPECODE)
        try:
            return cls.from_payload(record.payload)
        except ValueError as e:
            raise HvmContextError(f"{_where(record)}: {e}") from e


def _check_typecode(record: Record, expected: int) -> None:
    if record.typecode != expected:
        raise HvmContextError(
            f"{_where(record)}: typecode {record.typecode} is not {TypeCode(expected).name}"
        )


# -- CPU (2) ----------------------------------------------------------------------------------


class CpuFlag(IntFlag):
    """``hvm_hw_cpu.flags``."""

    FPU_INITIALISED = 1 << 0


class PendingEventType(IntEnum):
    """``hvm_hw_cpu.pending_type`` (x86 event types, as in VMX/SVM event injection)."""

    EXT_INTR = 0
    NMI = 2
    HW_EXCEPTION = 3
    SW_INTERRUPT = 4
    PRI_SW_EXCEPTION = 5
    SW_EXCEPTION = 6


@dataclass(frozen=True)
class HvmCpu(HvmEntry):
    """``struct hvm_hw_cpu``: architectural register state of one vCPU (instance = vCPU id).

    ``pending_event`` is the union of a u32 and the bit-fields vector (7:0), type (10:8),
    error_valid (11), reserved (30:12) and valid (31); see :meth:`make_pending_event`.
    """

    TYPECODE = TypeCode.CPU
    #: Size of ``struct hvm_hw_cpu_compat`` (pre-3.4: no msr_tsc_aux, flags, pad0).
    COMPAT_SIZE: ClassVar[int] = 1016

    fpu_regs: bytes = raw(512)
    rax: int = u64()
    rbx: int = u64()
    rcx: int = u64()
    rdx: int = u64()
    rbp: int = u64()
    rsi: int = u64()
    rdi: int = u64()
    rsp: int = u64()
    r8: int = u64()
    r9: int = u64()
    r10: int = u64()
    r11: int = u64()
    r12: int = u64()
    r13: int = u64()
    r14: int = u64()
    r15: int = u64()
    rip: int = u64()
    rflags: int = u64(0x2)
    cr0: int = u64()
    cr2: int = u64()
    cr3: int = u64()
    cr4: int = u64()
    dr0: int = u64()
    dr1: int = u64()
    dr2: int = u64()
    dr3: int = u64()
    dr6: int = u64()
    dr7: int = u64()
    cs_sel: int = u32()
    ds_sel: int = u32()
    es_sel: int = u32()
    fs_sel: int = u32()
    gs_sel: int = u32()
    ss_sel: int = u32()
    tr_sel: int = u32()
    ldtr_sel: int = u32()
    cs_limit: int = u32()
    ds_limit: int = u32()
    es_limit: int = u32()
    fs_limit: int = u32()
    gs_limit: int = u32()
    ss_limit: int = u32()
    tr_limit: int = u32()
    ldtr_limit: int = u32()
    idtr_limit: int = u32()
    gdtr_limit: int = u32()
    cs_base: int = u64()
    ds_base: int = u64()
    es_base: int = u64()
    fs_base: int = u64()
    gs_base: int = u64()
    ss_base: int = u64()
    tr_base: int = u64()
    ldtr_base: int = u64()
    idtr_base: int = u64()
    gdtr_base: int = u64()
    cs_arbytes: int = u32()
    ds_arbytes: int = u32()
    es_arbytes: int = u32()
    fs_arbytes: int = u32()
    gs_arbytes: int = u32()
    ss_arbytes: int = u32()
    tr_arbytes: int = u32()
    ldtr_arbytes: int = u32()
    sysenter_cs: int = u64()
    sysenter_esp: int = u64()
    sysenter_eip: int = u64()
    shadow_gs: int = u64()
    msr_flags: int = u64()
    msr_lstar: int = u64()
    msr_star: int = u64()
    msr_cstar: int = u64()
    msr_syscall_mask: int = u64()
    msr_efer: int = u64()
    msr_tsc_aux: int = u64()
    tsc: int = u64()
    pending_event: int = u32()
    error_code: int = u32()
    flags: int = u32(CpuFlag.FPU_INITIALISED)
    pad0: int = u32()

    @staticmethod
    def make_pending_event(
        vector: int, event_type: PendingEventType, *, error_valid: bool = False
    ) -> int:
        """The ``pending_event`` word of a valid pending event."""
        if not 0 <= vector <= 0xFF:
            raise ValueError(f"vector {vector} out of range")
        return vector | (int(event_type) << 8) | (int(error_valid) << 11) | (1 << 31)

    @property
    def pending_vector(self) -> int:
        return self.pending_event & 0xFF

    @property
    def pending_type(self) -> int:
        return (self.pending_event >> 8) & 0x7

    @property
    def pending_error_valid(self) -> bool:
        return bool(self.pending_event & (1 << 11))

    @property
    def pending_valid(self) -> bool:
        return bool(self.pending_event & (1 << 31))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """The native 1032-byte form, or the 1016-byte compat form converted as Xen does."""
        if len(payload) == cls.COMPAT_SIZE:
            # _hvm_hw_fix_cpu: msr_tsc_aux = 0, tsc/pending_event/error_code move up,
            # flags = FPU_INITIALISED.
            payload = (
                payload[:1000]
                + bytes(8)
                + payload[1000:]
                + struct.pack("<II", CpuFlag.FPU_INITIALISED, 0)
            )
        return super().from_payload(payload)


# -- PIC (3) ----------------------------------------------------------------------------------


class PicMode(IntFlag):
    """The single-bit fields of ``hvm_hw_vpic`` byte 5 (``mode_bits``)."""

    READSEL_ISR = 1 << 0
    POLL = 1 << 1
    AUTO_EOI = 1 << 2
    ROTATE_ON_AUTO_EOI = 1 << 3
    SPECIAL_FULLY_NESTED_MODE = 1 << 4
    SPECIAL_MASK_MODE = 1 << 5
    IS_MASTER = 1 << 6


@dataclass(frozen=True)
class Pic(HvmEntry):
    """``struct hvm_hw_vpic``: one 8259 (instance 0 = master, 1 = slave).

    Byte 4 holds the bit-fields ``init_state`` (3:0) and ``priority_add`` (7:4); byte 5 holds
    the :class:`PicMode` bits.
    """

    TYPECODE = TypeCode.PIC

    irr: int = u8()
    imr: int = u8()
    isr: int = u8()
    irq_base: int = u8()
    init_priority: int = u8()
    mode_bits: int = u8()
    elcr: int = u8()
    int_output: int = u8()

    @staticmethod
    def make_init_priority(init_state: int, priority_add: int) -> int:
        """Byte 4 from its two 4-bit fields."""
        if not (0 <= init_state <= 0xF and 0 <= priority_add <= 0xF):
            raise ValueError("init_state and priority_add are 4-bit fields")
        return init_state | (priority_add << 4)

    @property
    def init_state(self) -> int:
        return self.init_priority & 0xF

    @property
    def priority_add(self) -> int:
        return self.init_priority >> 4

    @property
    def mode(self) -> PicMode:
        return PicMode(self.mode_bits & 0x7F)


# -- IOAPIC (4) -------------------------------------------------------------------------------

#: VIOAPIC_NUM_PINS: 16 ISA IRQs and 32 PCI IRQs.
VIOAPIC_NUM_PINS = 48


@dataclass(frozen=True)
class Ioapic(HvmEntry):
    """``struct hvm_hw_vioapic`` with 48 u64 redirection entries (``union vioapic_redir_entry``)."""

    TYPECODE = TypeCode.IOAPIC

    base_address: int = u64(0xFEC00000)
    ioregsel: int = u32()
    id: int = u32()
    redirtbl: bytes = raw(8 * VIOAPIC_NUM_PINS)

    @classmethod
    def build(
        cls,
        entries: Sequence[int],
        *,
        base_address: int = 0xFEC00000,
        ioregsel: int = 0,
        id: int = 0,
    ) -> Ioapic:
        """An IOAPIC record from its 48 redirection entries."""
        table = _pack_u64s(entries, VIOAPIC_NUM_PINS, "redirtbl")
        return cls(base_address, ioregsel, id, table)

    @property
    def entries(self) -> tuple[int, ...]:
        return _u64s(self.redirtbl)


# -- LAPIC (5), LAPIC_REGS (6) ----------------------------------------------------------------


@dataclass(frozen=True)
class Lapic(HvmEntry):
    """``struct hvm_hw_lapic``: the hidden LAPIC state of one vCPU (28 bytes + 4 of padding).

    ``pending_esr`` appeared in Xen 4.21; before, the record was 24 bytes. Xen's loader (and
    :meth:`from_payload`) zero-extends such old records, but Xen <= 4.20 refuses 32-byte ones.
    """

    TYPECODE = TypeCode.LAPIC
    ZERO_EXTEND = True

    apic_base_msr: int = u64()
    disabled: int = u32()
    timer_divisor: int = u32()
    tdt_msr: int = u64()
    pending_esr: int = u32()
    pad0: int = u32()


@dataclass(frozen=True)
class LapicRegs(HvmEntry):
    """``struct hvm_hw_lapic_regs``: the 1 KiB APIC register page of one vCPU."""

    TYPECODE = TypeCode.LAPIC_REGS

    data: bytes = raw(1024)


# -- PIT (10) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PitChannel(Layout):
    """``struct hvm_hw_pit_channel`` (16 bytes); not a record by itself."""

    count: int = u32()
    latched_count: int = u16()
    count_latched: int = u8()
    status_latched: int = u8()
    status: int = u8()
    read_state: int = u8()
    write_state: int = u8()
    write_latch: int = u8()
    rw_mode: int = u8()
    mode: int = u8()
    bcd: int = u8()
    gate: int = u8()


PIT_CHANNELS = 3


@dataclass(frozen=True)
class Pit(HvmEntry):
    """``struct hvm_hw_pit``: three channels, the speaker bit and padding."""

    TYPECODE = TypeCode.PIT

    channels: bytes = raw(PIT_CHANNELS * 16)
    speaker_data_on: int = u32()
    pad0: int = u32()

    @classmethod
    def build(cls, channels: Sequence[PitChannel], *, speaker_data_on: int = 0) -> Pit:
        """A PIT record from its three channels."""
        if len(channels) != PIT_CHANNELS:
            raise ValueError(f"a PIT has {PIT_CHANNELS} channels, not {len(channels)}")
        return cls(b"".join(c.pack() for c in channels), speaker_data_on)

    def channel(self, index: int) -> PitChannel:
        if not 0 <= index < PIT_CHANNELS:
            raise IndexError(index)
        return PitChannel.unpack_from(self.channels, index * PitChannel.size())


# -- MTRR (14) --------------------------------------------------------------------------------

#: MTRR_VCNT variable ranges (a base/mask pair each) and NUM_FIXED_MSR fixed-range MSRs.
MTRR_VCNT = 8
NUM_FIXED_MSR = 11


@dataclass(frozen=True)
class Mtrr(HvmEntry):
    """``struct hvm_hw_mtrr``: PAT, variable and fixed MTRRs, MTRRcap, MTRRdefType."""

    TYPECODE = TypeCode.MTRR

    msr_pat_cr: int = u64(0x0007040600070406)
    msr_mtrr_var: bytes = raw(8 * 2 * MTRR_VCNT)
    msr_mtrr_fixed: bytes = raw(8 * NUM_FIXED_MSR)
    msr_mtrr_cap: int = u64()
    msr_mtrr_def_type: int = u64()

    @classmethod
    def build(
        cls,
        *,
        pat: int,
        var: Sequence[int],
        fixed: Sequence[int],
        cap: int,
        def_type: int,
    ) -> Mtrr:
        """An MTRR record: ``var`` is base0, mask0, base1, mask1, ... (16 values)."""
        return cls(
            pat,
            _pack_u64s(var, 2 * MTRR_VCNT, "msr_mtrr_var"),
            _pack_u64s(fixed, NUM_FIXED_MSR, "msr_mtrr_fixed"),
            cap,
            def_type,
        )

    @property
    def var(self) -> tuple[int, ...]:
        return _u64s(self.msr_mtrr_var)

    @property
    def fixed(self) -> tuple[int, ...]:
        return _u64s(self.msr_mtrr_fixed)


# -- TSC_ADJUST (19) --------------------------------------------------------------------------


@dataclass(frozen=True)
class TscAdjust(HvmEntry):
    """``struct hvm_tsc_adjust``: IA32_TSC_ADJUST of one vCPU."""

    TYPECODE = TypeCode.TSC_ADJUST

    tsc_adjust: int = u64()


# -- CPU_XSAVE (16), variable length ----------------------------------------------------------

#: XSTATE_AREA_MIN_SIZE: legacy FXSAVE region (512) + XSAVE header (64).
XSTATE_AREA_MIN_SIZE = 576
#: XSTATE_COMPACTION_ENABLED: bit 63 of xcomp_bv (compacted format; Xen refuses it on load).
XSTATE_COMPACTION_ENABLED = 1 << 63


@dataclass(frozen=True)
class CpuXsaveFixed(Layout):
    """The fixed part of ``struct hvm_hw_cpu_xsave`` (600 bytes = ``sizeof``): the XCRs, the
    legacy region and the 64-byte XSAVE header. The extended components follow it."""

    xfeature_mask: int = u64()
    xcr0: int = u64()
    xcr0_accum: int = u64()
    fpu_sse: bytes = raw(512)
    xstate_bv: int = u64()
    xcomp_bv: int = u64()
    hdr_reserved: bytes = raw(48)


class VariableRecord:
    """Base of the variable-length HVM records: a subclass gives ``TYPECODE``, ``encode()``
    and ``decode(payload)`` (raising ``ValueError``), and gets the Record conversions."""

    TYPECODE: ClassVar[TypeCode]

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        raise NotImplementedError

    def to_record(self, instance: int = 0) -> Record:
        return Record(self.TYPECODE, instance, self.encode())

    @classmethod
    def from_record(cls, record: Record) -> Self:
        _check_typecode(record, cls.TYPECODE)
        try:
            return cls.decode(record.payload)
        except ValueError as e:
            raise HvmContextError(f"{_where(record)}: {e}") from e


@dataclass(frozen=True)
class CpuXsave(VariableRecord):
    """A CPU_XSAVE record: the fixed part and the (uncompacted) extended save area after it."""

    TYPECODE: ClassVar[TypeCode] = TypeCode.CPU_XSAVE

    fixed: CpuXsaveFixed
    extended: bytes = b""

    def encode(self) -> bytes:
        return self.fixed.pack() + self.extended

    @classmethod
    def decode(cls, payload: bytes) -> CpuXsave:
        """Decode a payload; the length and format checks are those of Xen's loader."""
        if len(payload) < CpuXsaveFixed.size():
            raise ValueError(
                f"xsave length {len(payload)} < {CpuXsaveFixed.size()} "
                f"(24 + XSTATE_AREA_MIN_SIZE {XSTATE_AREA_MIN_SIZE})"
            )
        fixed = CpuXsaveFixed.unpack_from(payload)
        if fixed.xcomp_bv & XSTATE_COMPACTION_ENABLED:
            raise ValueError("compressed xsave state not supported")
        return cls(fixed, bytes(payload[CpuXsaveFixed.size() :]))


# -- CPU_MSR (20), variable length ------------------------------------------------------------


@dataclass(frozen=True)
class HvmMsrHeader(Layout):
    """The head of ``struct hvm_msr``: count and the 4 bytes of alignment padding after it
    (Xen neither writes nor checks that padding; vmce writes zeros and ignores it on load)."""

    count: int = u32()
    pad0: int = u32()


@dataclass(frozen=True)
class HvmOneMsr(Layout):
    """``struct hvm_one_msr``: index, reserved (must be zero), value."""

    index: int = u32()
    rsvd: int = u32()
    val: int = u64()


@dataclass(frozen=True)
class CpuMsrs(VariableRecord):
    """A CPU_MSR record: the MSRs Xen migrates outside HVM_CPU (at least one)."""

    TYPECODE: ClassVar[TypeCode] = TypeCode.CPU_MSR

    msrs: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, msrs: Mapping[int, int] | Iterable[tuple[int, int]]) -> CpuMsrs:
        items = msrs.items() if isinstance(msrs, Mapping) else msrs
        return cls(tuple((int(i), int(v)) for i, v in items))

    def encode(self) -> bytes:
        if not self.msrs:
            raise ValueError("a CPU_MSR record carries at least one MSR (Xen omits empty ones)")
        out = [HvmMsrHeader(len(self.msrs)).pack()]
        out += [HvmOneMsr(i, 0, v).pack() for i, v in self.msrs]
        return b"".join(out)

    @classmethod
    def decode(cls, payload: bytes) -> CpuMsrs:
        """Decode a payload; the checks are those of Xen's ``hvm_load_cpu_msrs``."""
        hsz, esz = HvmMsrHeader.size(), HvmOneMsr.size()
        if len(payload) < hsz + esz:
            raise ValueError(f"MSR length {len(payload)} < {hsz + esz}")
        count = HvmMsrHeader.unpack_from(payload).count
        if len(payload) != hsz + esz * count:
            raise ValueError(f"MSR length {len(payload)} != {hsz + esz * count} for {count} MSRs")
        entries = [HvmOneMsr.unpack_from(payload, hsz + esz * i) for i in range(count)]
        for n, e in enumerate(entries):
            if e.rsvd:
                raise ValueError(f"msr[{n}] (index {e.index:#x}) has reserved bits {e.rsvd:#x}")
        return cls(tuple((e.index, e.val) for e in entries))


# -- checking a whole context -----------------------------------------------------------------

#: The decoder of each typecode vmce understands; other typecodes pass through unchecked.
DECODERS: dict[int, type[HvmEntry] | type[CpuXsave] | type[CpuMsrs]] = {
    TypeCode.CPU: HvmCpu,
    TypeCode.PIC: Pic,
    TypeCode.IOAPIC: Ioapic,
    TypeCode.LAPIC: Lapic,
    TypeCode.LAPIC_REGS: LapicRegs,
    TypeCode.PIT: Pit,
    TypeCode.MTRR: Mtrr,
    TypeCode.CPU_XSAVE: CpuXsave,
    TypeCode.TSC_ADJUST: TscAdjust,
    TypeCode.CPU_MSR: CpuMsrs,
}


def decode_record(record: Record) -> object:
    """Decode one entry with its class from :data:`DECODERS` (VMCE_VCPU included)."""
    if record.typecode == TypeCode.VMCE_VCPU:
        try:
            return VmceVcpu.from_payload(record.payload)
        except ValueError as e:
            raise HvmContextError(f"{_where(record)}: {e}") from e
    decoder = DECODERS.get(record.typecode)
    if decoder is None:
        raise HvmContextError(f"{_where(record)}: no decoder for typecode {record.typecode}")
    return decoder.from_record(record)


def validate_context(ctx: HvmContext) -> None:
    """Decode every entry of a known type and refuse duplicates of (typecode, instance)."""
    seen: set[tuple[int, int]] = set()
    for r in ctx.records:
        key = (r.typecode, r.instance)
        if key in seen:
            raise HvmContextError(f"{_where(r)}: duplicate entry")
        seen.add(key)
        if r.typecode in DECODERS or r.typecode == TypeCode.VMCE_VCPU:
            decode_record(r)


# -- vendor trailer: the in-flight vMCE --------------------------------------------------------


class VendorTypeCode(IntEnum):
    """Typecodes of the vmce vendor trailer (after the blob's END; never seen by Xen).

    0x80xx belong to the vMCE model, 0x81xx to the KVM VMM (payloads in
    :mod:`vmce.kvm.persist.vendor`).
    """

    VENDOR_HEADER = 0x8000
    VMCE_INFLIGHT = 0x8001
    VM_CONFIG = 0x8100
    KVM_VCPU = 0x8101
    KVM_MSRS = 0x8102
    KVM_PLATFORM = 0x8103
    UART = 0x8104


#: Trailer entries framed here but decoded elsewhere (:mod:`vmce.kvm.persist.vendor`).
OPAQUE_VENDOR_TYPES = frozenset(
    t
    for t in VendorTypeCode
    if t not in (VendorTypeCode.VENDOR_HEADER, VendorTypeCode.VMCE_INFLIGHT)
)


#: b"VMCE" read as a little-endian u32.
VENDOR_MAGIC = 0x45434D56
VENDOR_VERSION = 1

assert min(VendorTypeCode) > HVM_SAVE_CODE_MAX


@dataclass(frozen=True)
class VendorHeader(Layout):
    """First entry of the trailer: identifies it and its version."""

    magic: int = u32(VENDOR_MAGIC)
    version: int = u32(VENDOR_VERSION)


@dataclass(frozen=True)
class VmceInflight(Layout):
    """The runtime vMCE state of one vCPU that Xen does not migrate (instance = vCPU id)."""

    TYPECODE: ClassVar[VendorTypeCode] = VendorTypeCode.VMCE_INFLIGHT

    mcg_status: int = u64()
    bank0_status: int = u64()
    bank0_addr: int = u64()
    bank0_misc: int = u64()
    bank1_status: int = u64()
    bank1_addr: int = u64()
    bank1_misc: int = u64()
    mce_pending: int = u32()
    rsvd: int = u32()

    @classmethod
    def from_snapshot(cls, snap: VCpuSnapshot) -> VmceInflight:
        """The in-flight part of a vCPU's vMCE state."""
        b0, b1 = snap.banks[0], snap.banks[1]
        return cls(
            snap.mcg_status,
            b0.status,
            b0.addr,
            b0.misc,
            b1.status,
            b1.addr,
            b1.misc,
            int(snap.mce_pending),
        )

    @property
    def idle(self) -> bool:
        """Nothing in flight: restoring it equals the vCPU's initial state."""
        return self == VmceInflight()

    def check(self) -> None:
        if self.mce_pending not in (0, 1):
            raise ValueError(f"mce_pending is {self.mce_pending}, not 0 or 1")
        if self.rsvd:
            raise ValueError(f"reserved field is {self.rsvd:#x}")


def inflight_from_snapshots(snaps: Iterable[VCpuSnapshot]) -> dict[int, VmceInflight]:
    """The vCPUs that have something in flight, by vCPU id (empty for a quiet guest)."""
    out = {s.vcpu_id: VmceInflight.from_snapshot(s) for s in snaps}
    return {k: v for k, v in out.items() if not v.idle}


def encode_trailer(inflight: Mapping[int, VmceInflight], extra: Sequence[Record] = ()) -> bytes:
    """The vendor trailer: these vCPUs' in-flight vMCE, then the ``extra`` entries (typecodes
    of :data:`OPAQUE_VENDOR_TYPES`); empty when there is nothing to carry."""
    if not inflight and not extra:
        return b""
    hdr = VendorHeader()
    out = [Descriptor(VendorTypeCode.VENDOR_HEADER, 0, hdr.size()).pack(), hdr.pack()]
    for vcpu in sorted(inflight):
        if not 0 <= vcpu <= 0xFFFF:
            raise ValueError(f"vCPU id {vcpu} does not fit a descriptor instance")
        inflight[vcpu].check()
        out += [Descriptor(VmceInflight.TYPECODE, vcpu, VmceInflight.size()).pack()]
        out += [inflight[vcpu].pack()]
    seen: set[tuple[int, int]] = set()
    for r in extra:
        if r.typecode not in OPAQUE_VENDOR_TYPES:
            raise ValueError(f"typecode {r.typecode:#x} is not an extra vendor entry")
        if not 0 <= r.instance <= 0xFFFF:
            raise ValueError(f"instance {r.instance} does not fit a descriptor")
        if (r.typecode, r.instance) in seen:
            raise ValueError(f"two vendor entries {r.typecode:#x} instance {r.instance}")
        seen.add((r.typecode, r.instance))
        out += [Descriptor(r.typecode, r.instance, len(r.payload)).pack(), r.payload]
    out.append(Descriptor(TypeCode.END, 0, 0).pack())
    return b"".join(out)


def split_blob(blob: bytes) -> tuple[bytes, bytes]:
    """Split a blob after its first END descriptor: (what Xen loads, vendor trailer).

    If no END is found the whole blob is returned as Xen's part, for
    :meth:`HvmContext.decode` to report the problem.
    """
    dsz = Descriptor.size()
    off = 0
    while len(blob) - off >= dsz:
        d = Descriptor.unpack_from(blob, off)
        off += dsz
        if d.typecode == TypeCode.END:
            return blob[:off], blob[off:]
        off += d.length
    return blob, b""


def decode_trailer(trailer: bytes, base: int = 0) -> dict[int, VmceInflight]:
    """Parse a vendor trailer strictly; ``base`` is its offset in the blob, for messages.

    Returns the in-flight vMCE; the other entries are checked and dropped (see
    :func:`decode_trailer_full`).
    """
    return decode_trailer_full(trailer, base)[0]


def decode_trailer_full(
    trailer: bytes, base: int = 0
) -> tuple[dict[int, VmceInflight], list[Record]]:
    """Parse a vendor trailer strictly: the in-flight vMCE by vCPU, and the other entries
    (typecodes of :data:`OPAQUE_VENDOR_TYPES`) as raw records with their blob offsets."""
    if not trailer:
        return {}, []
    entries = _trailer_entries(trailer, base)
    if (
        not entries
        or entries[0].typecode != VendorTypeCode.VENDOR_HEADER
        or len(entries[0].payload) != VendorHeader.size()
    ):
        raise HvmContextError(f"offset {base:#x}: vendor trailer must start with VENDOR_HEADER")
    first = entries[0]
    hdr = VendorHeader.unpack_from(first.payload)
    if hdr.magic != VENDOR_MAGIC or hdr.version != VENDOR_VERSION or first.instance:
        raise HvmContextError(
            f"offset {base:#x}: vendor header magic {hdr.magic:#x} version {hdr.version} "
            f"(expected {VENDOR_MAGIC:#x} version {VENDOR_VERSION})"
        )
    if len(entries) == 1:
        raise HvmContextError(f"offset {base:#x}: vendor trailer has no entries")
    out: dict[int, VmceInflight] = {}
    others: list[Record] = []
    seen: set[tuple[int, int]] = set()
    for e in entries[1:]:
        where = f"offset {e.offset:#x}: vendor entry typecode {e.typecode:#x} instance {e.instance}"
        if (e.typecode, e.instance) in seen:
            raise HvmContextError(f"{where}: duplicate entry")
        seen.add((e.typecode, e.instance))
        if e.typecode in OPAQUE_VENDOR_TYPES:
            others.append(e)
            continue
        if e.typecode != VendorTypeCode.VMCE_INFLIGHT:
            raise HvmContextError(f"{where}: unknown vendor typecode")
        if len(e.payload) != VmceInflight.size():
            raise HvmContextError(f"{where}: not a {VmceInflight.size()}-byte VMCE_INFLIGHT")
        value = VmceInflight.unpack_from(e.payload)
        try:
            value.check()
        except ValueError as err:
            raise HvmContextError(f"{where}: {err}") from err
        out[e.instance] = value
    return out, others


def _trailer_entries(trailer: bytes, base: int) -> list[Record]:
    dsz = Descriptor.size()
    entries: list[Record] = []
    off = 0
    while True:
        if len(trailer) - off < dsz:
            raise HvmContextError(f"offset {base + off:#x}: vendor trailer has no END")
        d = Descriptor.unpack_from(trailer, off)
        if d.typecode == TypeCode.END:
            if d.instance or d.length:
                raise HvmContextError(f"offset {base + off:#x}: END must be empty")
            break
        if d.length > len(trailer) - off - dsz:
            raise HvmContextError(f"offset {base + off:#x}: vendor entry runs past the end")
        payload = trailer[off + dsz : off + dsz + d.length]
        entries.append(Record(d.typecode, d.instance, payload, base + off))
        off += dsz + d.length
    off += dsz
    if off != len(trailer):
        raise HvmContextError(f"offset {base + off:#x}: {len(trailer) - off} bytes after END")
    return entries


def encode_context(
    ctx: HvmContext,
    inflight: Mapping[int, VmceInflight] | None = None,
    extra: Sequence[Record] = (),
) -> bytes:
    """The HVM_CONTEXT record body: Xen's blob, plus the vendor trailer if anything is in flight
    or ``extra`` vendor entries are given."""
    return ctx.encode() + encode_trailer(inflight or {}, extra)


def decode_context(blob: bytes) -> tuple[HvmContext, dict[int, VmceInflight]]:
    """Parse an HVM_CONTEXT body: Xen's blob (every known entry decoded) and the trailer."""
    xen, trailer = split_blob(blob)
    ctx = HvmContext.decode(xen)
    validate_context(ctx)
    return ctx, decode_trailer(trailer, len(xen))


def decode_context_full(
    blob: bytes,
) -> tuple[HvmContext, dict[int, VmceInflight], list[Record]]:
    """Parse an HVM_CONTEXT body: Xen's blob, the in-flight vMCE and the other vendor entries."""
    xen, trailer = split_blob(blob)
    ctx = HvmContext.decode(xen)
    validate_context(ctx)
    inflight, others = decode_trailer_full(trailer, len(xen))
    return ctx, inflight, others
