"""Guest CPUID: KVM's supported table, adjusted to a vendor profile and an APIC ID.

kvm_pvm note (feasibility.md section 0): the feature words of leaves 1 and 7 are taken from the
host whatever we set, but the vendor string, family/model/stepping and APIC ID are honoured, and
so are the KVM paravirt bits in leaf 0x40000001.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import IntEnum

from vmce.kvm.abi import KvmCpuidEntry2
from vmce.vmce import Vendor

#: CPUID.1:EDX bits that Linux needs together for machine checks.
CPUID1_EDX_MCE = 1 << 7
CPUID1_EDX_MCA = 1 << 14
#: CPUID.1:ECX bit 31: "running under a hypervisor".
CPUID1_ECX_HYPERVISOR = 1 << 31


class Leaf(IntEnum):
    """CPUID leaves this module edits."""

    VENDOR = 0x0
    FEATURES = 0x1
    EXT_TOPOLOGY = 0xB
    V2_EXT_TOPOLOGY = 0x1F
    KVM_SIGNATURE = 0x40000000
    KVM_FEATURES = 0x40000001
    EXT_MAX = 0x80000000
    EXT_FEATURES = 0x80000001


class KvmPvFeature(IntEnum):
    """Bit numbers of CPUID 0x40000001 EAX (``asm/kvm_para.h``)."""

    CLOCKSOURCE = 0
    NOP_IO_DELAY = 1
    MMU_OP = 2
    CLOCKSOURCE2 = 3
    ASYNC_PF = 4
    STEAL_TIME = 5
    PV_EOI = 6
    PV_UNHALT = 7
    PV_TLB_FLUSH = 9
    ASYNC_PF_VMEXIT = 10
    PV_SEND_IPI = 11
    POLL_CONTROL = 12
    PV_SCHED_YIELD = 13
    ASYNC_PF_INT = 14
    MSI_EXT_DEST_ID = 15
    HC_MAP_GPA_RANGE = 16
    MIGRATION_CONTROL = 17


#: PV features whose guest side issues VMCALL/VMMCALL hypercalls. Under kvm_pvm the emulator
#: "fixes" a hypercall instruction by patching guest text, which panics a guest whose text is
#: read-only (feasibility.md 4.1 item 5), so these are hidden.
HYPERCALL_PV_FEATURES: frozenset[KvmPvFeature] = frozenset(
    {
        KvmPvFeature.MMU_OP,
        KvmPvFeature.PV_UNHALT,
        KvmPvFeature.PV_SEND_IPI,
        KvmPvFeature.PV_SCHED_YIELD,
        KvmPvFeature.HC_MAP_GPA_RANGE,
    }
)


@dataclass(frozen=True)
class CpuProfile:
    """What the guest is told it runs on."""

    vendor: Vendor
    family: int
    model: int
    stepping: int = 1

    def signature(self) -> int:
        """CPUID.1:EAX for this family/model/stepping (extended fields as the SDM/APM say)."""
        if not (0 <= self.family <= 0xFF + 0xF and 0 <= self.model <= 0xFF):
            raise ValueError(f"family {self.family:#x} / model {self.model:#x} out of range")
        base_family = min(self.family, 0xF)
        ext_family = self.family - 0xF if self.family > 0xF else 0
        uses_ext_model = base_family == 0xF or (self.vendor is Vendor.INTEL and base_family == 6)
        if self.model > 0xF and not uses_ext_model:
            raise ValueError(f"model {self.model:#x} needs family 6 (Intel) or >= 0xF")
        return (
            (self.stepping & 0xF)
            | (self.model & 0xF) << 4
            | base_family << 8
            | (self.model >> 4) << 16
            | ext_family << 20
        )


#: Broadwell-EP (family 6, model 0x4F): the Intel personality used for the Linux runs.
INTEL_BROADWELL = CpuProfile(Vendor.INTEL, 6, 0x4F, 1)
#: Zen 3 (family 0x19, model 0x01).
AMD_ZEN3 = CpuProfile(Vendor.AMD, 0x19, 0x01, 1)


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf as KVM describes it."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_kvm(cls, raw: KvmCpuidEntry2) -> CpuidEntry:
        """Copy out of a ``kvm_cpuid_entry2``."""
        return cls(
            int(raw.function),
            int(raw.index),
            int(raw.flags),
            int(raw.eax),
            int(raw.ebx),
            int(raw.ecx),
            int(raw.edx),
        )

    def to_kvm(self, raw: KvmCpuidEntry2) -> None:
        """Fill a ``kvm_cpuid_entry2``."""
        raw.function, raw.index, raw.flags = self.function, self.index, self.flags
        raw.eax, raw.ebx, raw.ecx, raw.edx = self.eax, self.ebx, self.ecx, self.edx


def _edit(entry: CpuidEntry, profile: CpuProfile | None, apic_id: int, hide: int) -> CpuidEntry:
    fn = entry.function
    if fn == Leaf.VENDOR and profile is not None:
        ebx, edx, ecx = profile.vendor.cpuid_registers()
        return replace(entry, ebx=ebx, ecx=ecx, edx=edx)
    if fn == Leaf.FEATURES:
        eax = profile.signature() if profile is not None else entry.eax
        ebx = (entry.ebx & 0x00FFFFFF) | (apic_id & 0xFF) << 24
        edx = entry.edx | CPUID1_EDX_MCE | CPUID1_EDX_MCA
        return replace(entry, eax=eax, ebx=ebx, edx=edx, ecx=entry.ecx | CPUID1_ECX_HYPERVISOR)
    if fn in (Leaf.EXT_TOPOLOGY, Leaf.V2_EXT_TOPOLOGY):
        return replace(entry, edx=apic_id)
    if fn == Leaf.KVM_FEATURES:
        return replace(entry, eax=entry.eax & ~hide)
    if fn == Leaf.EXT_MAX and profile is not None:
        if profile.vendor is Vendor.AMD:
            ebx, edx, ecx = profile.vendor.cpuid_registers()
            return replace(entry, ebx=ebx, ecx=ecx, edx=edx)
        return replace(entry, ebx=0, ecx=0, edx=0)
    if fn == Leaf.EXT_FEATURES and profile is not None:
        eax = profile.signature() if profile.vendor is Vendor.AMD else 0
        return replace(entry, eax=eax)
    return entry


def build_guest_cpuid(
    supported: Iterable[CpuidEntry],
    *,
    profile: CpuProfile | None,
    apic_id: int,
    hide_pv: Iterable[KvmPvFeature] = HYPERCALL_PV_FEATURES,
) -> list[CpuidEntry]:
    """The CPUID table for one vCPU.

    ``profile=None`` keeps the host's vendor and signature. Always: APIC ID in leaf 1
    EBX[31:24] and in EDX of every leaf 0xB/0x1F subleaf, MCE and MCA forced on in leaf 1 EDX,
    the hypervisor bit set, and the ``hide_pv`` bits cleared in leaf 0x40000001 EAX.
    """
    hide = 0
    for feature in hide_pv:
        hide |= 1 << feature
    return [_edit(entry, profile, apic_id, hide) for entry in supported]


def find(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for ``function``/``index`` (index ignored unless the entry says it matters)."""
    for entry in entries:
        if entry.function == function and (entry.index == index or not entry.flags & 1):
            return entry
    return None
