"""Xen's HVM context blob (XEN_DOMCTL_gethvmcontext): descriptors, HEADER, records, END.

Reference section 6.2-6.5. The reader is strict and names the offset and record of every
problem; applying the vMCE records to a domain checks them all before it changes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from vmce.save.layout import Layout, u16, u32, u64
from vmce.vmce import Domain, RestoreError, VmceSave

HVM_FILE_MAGIC = 0x54381286
HVM_FILE_VERSION = 1
#: HVM_SAVE_CODE_MAX: the highest typecode with a registered loader.
HVM_SAVE_CODE_MAX = 20


class TypeCode(IntEnum):
    """HVM save record typecodes."""

    END = 0
    HEADER = 1
    CPU = 2
    PIC = 3
    IOAPIC = 4
    LAPIC = 5
    LAPIC_REGS = 6
    PCI_IRQ = 7
    ISA_IRQ = 8
    PCI_LINK = 9
    PIT = 10
    RTC = 11
    HPET = 12
    PMTIMER = 13
    MTRR = 14
    VIRIDIAN_DOMAIN = 15
    CPU_XSAVE = 16
    VIRIDIAN_VCPU = 17
    VMCE_VCPU = 18
    TSC_ADJUST = 19
    CPU_MSR = 20


@dataclass(frozen=True)
class Descriptor(Layout):
    """``hvm_save_descriptor``: what follows and how long it is."""

    typecode: int = u16()
    instance: int = u16()
    length: int = u32()


@dataclass(frozen=True)
class Header(Layout):
    """``hvm_save_header``, the mandatory first record."""

    magic: int = u32(HVM_FILE_MAGIC)
    version: int = u32(HVM_FILE_VERSION)
    changeset: int = u64()
    cpuid: int = u32()
    gtsc_khz: int = u32()


@dataclass(frozen=True)
class VmceVcpu(Layout):
    """``hvm_vmce_vcpu`` v3 (32 bytes); v1 is its first 8 bytes, v2 its first 24."""

    caps: int = u64()
    mci_ctl2_bank0: int = u64()
    mci_ctl2_bank1: int = u64()
    mcg_ext_ctl: int = u64()

    @classmethod
    def from_payload(cls, payload: bytes) -> VmceVcpu:
        """Xen's zero-extending load: up to 32 bytes, the rest filled with zeros."""
        if len(payload) > cls.size():
            raise ValueError(f"VMCE_VCPU is {len(payload)} bytes, at most {cls.size()} allowed")
        return cls.unpack_from(payload.ljust(cls.size(), b"\0"))

    def to_save(self) -> VmceSave:
        return VmceSave(self.caps, self.mci_ctl2_bank0, self.mci_ctl2_bank1, self.mcg_ext_ctl)

    @classmethod
    def from_save(cls, s: VmceSave) -> VmceVcpu:
        return cls(s.caps, s.mci_ctl2_bank0, s.mci_ctl2_bank1, s.mcg_ext_ctl)


#: The historical VMCE_VCPU payload sizes: Xen 4.2 (caps), 4.3 (+ CTL2 x2), 4.10 (+ EXT_CTL).
VMCE_VCPU_SIZES = (8, 24, 32)


class HvmContextError(ValueError):
    """A malformed or unacceptable HVM context blob; the message names the place."""


@dataclass(frozen=True)
class Record:
    """One entry of the blob: descriptor fields and the raw payload, with its blob offset."""

    typecode: int
    instance: int
    payload: bytes
    offset: int = 0

    @property
    def name(self) -> str:
        try:
            return TypeCode(self.typecode).name
        except ValueError:
            return f"type{self.typecode}"

    def where(self, index: int) -> str:
        return f"offset {self.offset:#x}: record {index} ({self.name} instance {self.instance})"


@dataclass
class HvmContext:
    """A decoded HVM context: the header and the records between HEADER and END."""

    header: Header
    records: list[Record] = field(default_factory=list)

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def decode(cls, blob: bytes) -> HvmContext:
        """Parse and check a blob as ``hvm_load``'s check pass does, and a little stricter.

        Raises :class:`HvmContextError` naming the offset and record on any problem.
        """
        dsz = Descriptor.size()
        if len(blob) < dsz:
            raise HvmContextError(f"offset 0x0: blob is {len(blob)} bytes, too short for a header")
        first = Descriptor.unpack_from(blob, 0)
        if first.typecode != TypeCode.HEADER or first.length != Header.size():
            raise HvmContextError(
                f"offset 0x0: first record must be HEADER of {Header.size()} bytes, found "
                f"typecode {first.typecode} length {first.length}"
            )
        if len(blob) < dsz + Header.size():
            raise HvmContextError("offset 0x8: HEADER payload truncated")
        header = Header.unpack_from(blob, dsz)
        if header.magic != HVM_FILE_MAGIC:
            raise HvmContextError(
                f"offset 0x8: bad magic {header.magic:#x} (expected {HVM_FILE_MAGIC:#x})"
            )
        if header.version != HVM_FILE_VERSION:
            raise HvmContextError(
                f"offset 0xc: unsupported version {header.version} (expected {HVM_FILE_VERSION})"
            )
        ctx = cls(header)
        off = dsz + Header.size()
        index = 1
        while True:
            if len(blob) - off < dsz:
                raise HvmContextError(f"offset {off:#x}: blob did not end with an END record")
            d = Descriptor.unpack_from(blob, off)
            where = f"offset {off:#x}: record {index}"
            if d.typecode == TypeCode.END:
                if d.length or d.instance:
                    raise HvmContextError(f"{where}: END must have instance 0 and length 0")
                off += dsz
                break
            if d.typecode == TypeCode.HEADER or d.typecode > HVM_SAVE_CODE_MAX:
                raise HvmContextError(f"{where}: unexpected typecode {d.typecode}")
            if d.length > len(blob) - off - dsz:
                raise HvmContextError(
                    f"{where} (typecode {d.typecode}): length {d.length} runs past the end"
                )
            payload = bytes(blob[off + dsz : off + dsz + d.length])
            ctx.records.append(Record(d.typecode, d.instance, payload, off))
            off += dsz + d.length
            index += 1
        if off != len(blob):
            raise HvmContextError(f"offset {off:#x}: {len(blob) - off} bytes after END")
        return ctx

    def vmce_saves(self, nr_vcpus: int | None = None) -> dict[int, VmceSave]:
        """The VMCE_VCPU records by vCPU, zero-extended; checks lengths, ids and duplicates."""
        out: dict[int, VmceSave] = {}
        for i, r in enumerate(self.records, start=1):
            if r.typecode != TypeCode.VMCE_VCPU:
                continue
            if len(r.payload) > VmceVcpu.size():
                raise HvmContextError(
                    f"{r.where(i)}: length {len(r.payload)} exceeds {VmceVcpu.size()} bytes"
                )
            if nr_vcpus is not None and r.instance >= nr_vcpus:
                raise HvmContextError(
                    f"{r.where(i)}: instance beyond the domain's {nr_vcpus} vCPUs"
                )
            if r.instance in out:
                raise HvmContextError(f"{r.where(i)}: duplicate record for vCPU {r.instance}")
            out[r.instance] = VmceVcpu.from_payload(r.payload).to_save()
        return out

    def apply_vmce(self, domain: Domain) -> dict[int, VmceSave]:
        """Restore the vMCE records into ``domain``: all or nothing."""
        saves = self.vmce_saves(domain.nr_vcpus)
        try:
            domain.restore(saves)
        except RestoreError as e:
            raise HvmContextError(str(e)) from e
        return saves

    # -- writing -----------------------------------------------------------------------------

    def encode(self) -> bytes:
        out = [Descriptor(TypeCode.HEADER, 0, Header.size()).pack(), self.header.pack()]
        for r in self.records:
            out.append(Descriptor(r.typecode, r.instance, len(r.payload)).pack())
            out.append(r.payload)
        out.append(Descriptor(TypeCode.END, 0, 0).pack())
        return b"".join(out)

    @classmethod
    def from_domain(
        cls, domain: Domain, *, cpuid: int = 0, gtsc_khz: int = 0, vmce_size: int = 32
    ) -> HvmContext:
        """A context holding one VMCE_VCPU per vCPU, in ``vmce_size`` bytes (8, 24 or 32)."""
        if vmce_size not in VMCE_VCPU_SIZES:
            raise ValueError(f"VMCE_VCPU size must be one of {VMCE_VCPU_SIZES}, not {vmce_size}")
        ctx = cls(Header(cpuid=cpuid, gtsc_khz=gtsc_khz))
        for v in domain.vcpus:
            payload = VmceVcpu.from_save(domain.save_vcpu(v.id)).pack()[:vmce_size]
            ctx.records.append(Record(TypeCode.VMCE_VCPU, v.id, payload))
        return ctx
