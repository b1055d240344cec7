"""One vCPU between KVM's state and Xen's HVM save records, both ways.

Every value goes to the Xen record that holds it in Xen (``hvm_hw_cpu``, ``hvm_hw_lapic``,
``hvm_hw_lapic_regs``, ``hvm_hw_mtrr``, ``hvm_hw_cpu_xsave``, ``hvm_tsc_adjust``,
``hvm_msr``, and the X86_MSR_POLICY stream record), and restoring reads it back from there.
What Xen has no field for travels in the vendor entries KVM_VCPU and KVM_MSRS
(:mod:`vmce.kvm.persist.vendor`). Where the two overlap (the event being injected), the Xen field
is written for Xen's tools and the richer KVM form is used on restore.

MSRs are placed by :func:`msr_home`: the ``hvm_hw_cpu`` fields, the MTRR record, TSC_ADJUST,
the LAPIC's TSC deadline, Xen's CPU_MSR list (``msrs_to_send`` in xen/arch/x86/hvm/hvm.c,
non-zero values only, as Xen does), the MSR policy (PLATFORM_INFO, ARCH_CAPABILITIES), and
everything else KVM saves in KVM_MSRS.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vmce.kvm.abi import (
    KvmDebugregs,
    KvmLapicState,
    KvmRegs,
    KvmSegment,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    MpState,
)
from vmce.kvm.persist.vendor import KvmVcpuEntry, VcpuFlag
from vmce.kvm.vstate import (
    MSR_IA32_TSC,
    MSR_MTRR_CAP,
    MSR_MTRR_DEF_TYPE,
    MSR_TSC_DEADLINE,
    MTRR_FIXED,
    MTRR_VAR,
    VcpuState,
)
from vmce.kvm.x86.cpuid import CpuidEntry, find
from vmce.save.hvmrecords import (
    CpuMsrs,
    CpuXsave,
    CpuXsaveFixed,
    HvmCpu,
    Lapic,
    LapicRegs,
    Mtrr,
    PendingEventType,
    TscAdjust,
)

MSR_TSC_ADJUST = 0x3B
MSR_PAT = 0x277
MSR_KERNEL_GS_BASE = 0xC0000102

#: ``hvm_hw_cpu`` fields that hold an MSR.
HVM_CPU_MSRS: dict[int, str] = {
    MSR_IA32_TSC: "tsc",
    0x174: "sysenter_cs",
    0x175: "sysenter_esp",
    0x176: "sysenter_eip",
    0xC0000081: "msr_star",
    0xC0000082: "msr_lstar",
    0xC0000083: "msr_cstar",
    0xC0000084: "msr_syscall_mask",
    MSR_KERNEL_GS_BASE: "shadow_gs",
    0xC0000103: "msr_tsc_aux",
}
#: Xen's ``msrs_to_send``: the only MSRs Xen's CPU_MSR loader accepts.
XEN_CPU_MSRS = frozenset(
    {0x48, 0x140, 0x6E1, 0xD90, 0xDA0, 0xC001011F, 0xC0011027, 0xC0011019, 0xC001101A, 0xC001101B}
)
#: The MSRs of Xen's MSR policy: PLATFORM_INFO and ARCH_CAPABILITIES.
MSR_POLICY_MSRS = frozenset({0xCE, 0x10A})
MTRR_MSRS = frozenset({MSR_PAT, MSR_MTRR_CAP, MSR_MTRR_DEF_TYPE, *MTRR_VAR, *MTRR_FIXED})


class MsrHome(Enum):
    """Where a saved MSR travels in the stream."""

    HVM_CPU = "CPU"
    MTRR = "MTRR"
    TSC_ADJUST = "TSC_ADJUST"
    LAPIC = "LAPIC"
    CPU_MSR = "CPU_MSR"
    MSR_POLICY = "X86_MSR_POLICY"
    KVM = "vendor KVM_MSRS"


def msr_home(index: int) -> MsrHome:
    """The record an MSR is saved in."""
    if index in HVM_CPU_MSRS:
        return MsrHome.HVM_CPU
    if index in MTRR_MSRS:
        return MsrHome.MTRR
    if index == MSR_TSC_ADJUST:
        return MsrHome.TSC_ADJUST
    if index == MSR_TSC_DEADLINE:
        return MsrHome.LAPIC
    if index in XEN_CPU_MSRS:
        return MsrHome.CPU_MSR
    if index in MSR_POLICY_MSRS:
        return MsrHome.MSR_POLICY
    return MsrHome.KVM


# -- segments, events, LAPIC details ----------------------------------------------------------

#: KVM's segment registers and the prefix of their ``hvm_hw_cpu`` fields, in KVM_VCPU's
#: ``unusable`` bit order.
SEGMENTS: tuple[tuple[str, str], ...] = (
    ("cs", "cs"),
    ("ds", "ds"),
    ("es", "es"),
    ("fs", "fs"),
    ("gs", "gs"),
    ("ss", "ss"),
    ("tr", "tr"),
    ("ldt", "ldtr"),
)


def segment_attr(seg: KvmSegment) -> int:
    """Xen's packed segment attributes: type, S, DPL, P, AVL, L, D/B, G (bits 0-11)."""
    return (
        int(seg.type) & 0xF
        | (int(seg.s) & 1) << 4
        | (int(seg.dpl) & 3) << 5
        | (int(seg.present) & 1) << 7
        | (int(seg.avl) & 1) << 8
        | (int(seg.l) & 1) << 9
        | (int(seg.db) & 1) << 10
        | (int(seg.g) & 1) << 11
    )


def set_segment(
    seg: KvmSegment, sel: int, limit: int, base: int, attr: int, unusable: bool
) -> None:
    seg.selector, seg.limit, seg.base = sel, limit, base
    seg.type = attr & 0xF
    seg.s = (attr >> 4) & 1
    seg.dpl = (attr >> 5) & 3
    seg.present = (attr >> 7) & 1
    seg.avl = (attr >> 8) & 1
    seg.l = (attr >> 9) & 1
    seg.db = (attr >> 10) & 1
    seg.g = (attr >> 11) & 1
    seg.unusable = int(unusable)


def pending_event(events: KvmVcpuEvents) -> tuple[int, int]:
    """``hvm_hw_cpu.pending_event`` and ``error_code`` for the event KVM is injecting."""
    ex = events.exception
    if ex.injected or ex.pending:
        word = HvmCpu.make_pending_event(
            int(ex.nr), PendingEventType.HW_EXCEPTION, error_valid=bool(ex.has_error_code)
        )
        return word, int(ex.error_code)
    irq = events.interrupt
    if irq.injected:
        kind = PendingEventType.SW_INTERRUPT if irq.soft else PendingEventType.EXT_INTR
        return HvmCpu.make_pending_event(int(irq.nr), kind), 0
    if events.nmi.injected:
        return HvmCpu.make_pending_event(2, PendingEventType.NMI), 0
    return 0, 0


def events_from_pending(cpu: HvmCpu) -> KvmVcpuEvents:
    """KVM events for a record without a KVM_VCPU entry: the Xen event, injected."""
    ev = KvmVcpuEvents()
    if not cpu.pending_valid:
        return ev
    kind = cpu.pending_type
    if kind in (PendingEventType.EXT_INTR, PendingEventType.SW_INTERRUPT):
        ev.interrupt.injected, ev.interrupt.nr = 1, cpu.pending_vector
        ev.interrupt.soft = int(kind == PendingEventType.SW_INTERRUPT)
    elif kind == PendingEventType.NMI:
        ev.nmi.injected = 1
    else:
        ev.exception.injected, ev.exception.nr = 1, cpu.pending_vector
        ev.exception.has_error_code = int(cpu.pending_error_valid)
        ev.exception.error_code = cpu.error_code
    return ev


APIC_TASKPRI = 0x80
APIC_SVR = 0xF0
APIC_TDCR = 0x3E0
APIC_SVR_ENABLE = 1 << 8
APIC_BASE_ENABLE = 1 << 11
VLAPIC_HW_DISABLED = 0x1
VLAPIC_SW_DISABLED = 0x2


def _reg32(page: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", page, offset)[0])


def timer_divisor(tdcr: int) -> int:
    """Xen's demangled LAPIC timer divisor (``vlapic_set_tdcr``)."""
    val = ((tdcr & 3) | ((tdcr & 8) >> 1)) + 1
    return 1 << (val & 7)


def lapic_record(apic_base: int, page: bytes | None, tdt: int) -> Lapic:
    """``hvm_hw_lapic``: the base MSR, Xen's disabled flags, the divisor, the TSC deadline."""
    disabled = 0 if apic_base & APIC_BASE_ENABLE else VLAPIC_HW_DISABLED
    if page is not None and not _reg32(page, APIC_SVR) & APIC_SVR_ENABLE:
        disabled |= VLAPIC_SW_DISABLED
    divisor = timer_divisor(_reg32(page, APIC_TDCR)) if page is not None else 2
    return Lapic(apic_base_msr=apic_base, disabled=disabled, timer_divisor=divisor, tdt_msr=tdt)


# -- XSAVE ------------------------------------------------------------------------------------

XSAVE_AREA = 4096
XSAVE_LEGACY = 512
XSAVE_HEADER_END = 576
XSTATE_X87_SSE = 0x3


@dataclass(frozen=True)
class XsaveLayout:
    """Where CPUID leaf 0xD puts each XSAVE component (standard format) on this host."""

    supported: int = XSTATE_X87_SSE
    components: Mapping[int, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def from_cpuid(cls, entries: Iterable[CpuidEntry]) -> XsaveLayout:
        table = list(entries)
        head = find(table, 0xD, 0)
        if head is None:
            return cls()
        supported = head.eax | head.edx << 32
        comps: dict[int, tuple[int, int]] = {}
        for bit in range(2, 63):
            if supported >> bit & 1:
                e = find(table, 0xD, bit)
                if e is not None and e.eax:
                    comps[bit] = (e.ebx, e.eax)
        return cls(supported, comps)

    def area_size(self, xcr0_accum: int) -> int:
        """Bytes of an uncompacted area holding the components in ``xcr0_accum``."""
        end = XSAVE_HEADER_END
        for bit, (offset, size) in self.components.items():
            if xcr0_accum >> bit & 1:
                end = max(end, offset + size)
        return min(end, XSAVE_AREA)


def xsave_record(area: bytes, xcr0: int, layout: XsaveLayout) -> CpuXsave:
    """``hvm_hw_cpu_xsave`` from KVM's 4 KiB area: extended components up to xcr0_accum."""
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", area, XSAVE_LEGACY)
    accum = xcr0 | xstate_bv
    fixed = CpuXsaveFixed(
        xfeature_mask=layout.supported,
        xcr0=xcr0,
        xcr0_accum=accum,
        fpu_sse=area[:XSAVE_LEGACY],
        xstate_bv=xstate_bv,
        xcomp_bv=xcomp_bv,
        hdr_reserved=area[XSAVE_LEGACY + 16 : XSAVE_HEADER_END],
    )
    return CpuXsave(fixed, area[XSAVE_HEADER_END : layout.area_size(accum)])


def xsave_area(rec: CpuXsave) -> bytes:
    """KVM's 4 KiB XSAVE area back from the record (components beyond it zero)."""
    f = rec.fixed
    area = f.fpu_sse + struct.pack("<QQ", f.xstate_bv, f.xcomp_bv) + f.hdr_reserved
    area += rec.extended
    if len(area) > XSAVE_AREA:
        raise ValueError(f"XSAVE area of {len(area)} bytes exceeds KVM's {XSAVE_AREA}")
    return area.ljust(XSAVE_AREA, b"\0")


# -- one vCPU, both ways ----------------------------------------------------------------------


@dataclass
class VcpuRecords:
    """One vCPU as the stream carries it: Xen records, then the vendor entries."""

    cpu: HvmCpu
    lapic: Lapic
    mtrr: Mtrr
    xsave: CpuXsave
    lapic_regs: LapicRegs | None = None
    tsc_adjust: TscAdjust | None = None
    cpu_msrs: CpuMsrs | None = None
    kvm: KvmVcpuEntry | None = None
    kvm_msrs: dict[int, int] = field(default_factory=dict)
    #: X86_MSR_POLICY values (stream-wide; vCPU 0's are written).
    policy_msrs: dict[int, int] = field(default_factory=dict)


def vcpu_to_xen(state: VcpuState, layout: XsaveLayout) -> VcpuRecords:
    """Map one captured vCPU to Xen records and vendor entries."""
    r, s, d, msrs = state.regs, state.sregs, state.debugregs, state.msrs
    area = state.xsave.to_bytes()
    xcr0 = next(
        (int(x.value) for x in list(state.xcrs.xcrs)[: state.xcrs.nr_xcrs] if x.xcr == 0), 1
    )
    fields: dict[str, Any] = {
        "fpu_regs": area[:XSAVE_LEGACY],
        **{name: int(getattr(r, name)) for name in _GPRS},
        "cr0": int(s.cr0),
        "cr2": int(s.cr2),
        "cr3": int(s.cr3),
        "cr4": int(s.cr4),
        "dr0": int(d.db[0]),
        "dr1": int(d.db[1]),
        "dr2": int(d.db[2]),
        "dr3": int(d.db[3]),
        "dr6": int(d.dr6),
        "dr7": int(d.dr7),
        "idtr_limit": int(s.idt.limit),
        "idtr_base": int(s.idt.base),
        "gdtr_limit": int(s.gdt.limit),
        "gdtr_base": int(s.gdt.base),
        "msr_efer": int(s.efer),
    }
    unusable = 0
    for bit, (kvm_name, xen_name) in enumerate(SEGMENTS):
        seg = getattr(s, kvm_name)
        fields[f"{xen_name}_sel"] = int(seg.selector)
        fields[f"{xen_name}_limit"] = int(seg.limit)
        fields[f"{xen_name}_base"] = int(seg.base)
        fields[f"{xen_name}_arbytes"] = segment_attr(seg)
        unusable |= int(bool(seg.unusable)) << bit
    fields["pending_event"], fields["error_code"] = pending_event(state.events)
    out = VcpuRecords(
        cpu=HvmCpu(),
        lapic=lapic_record(
            int(s.apic_base),
            state.lapic.to_bytes() if state.lapic is not None else None,
            msrs.get(MSR_TSC_DEADLINE, 0),
        ),
        mtrr=Mtrr(),
        xsave=xsave_record(area, xcr0, layout),
        lapic_regs=LapicRegs(state.lapic.to_bytes()) if state.lapic is not None else None,
    )
    mtrr_var = [msrs.get(i, 0) for i in MTRR_VAR]
    mtrr_fixed = [msrs.get(i, 0) for i in MTRR_FIXED]
    cpu_msrs: dict[int, int] = {}
    for index, value in msrs.items():
        home = msr_home(index)
        if home is MsrHome.HVM_CPU:
            fields[HVM_CPU_MSRS[index]] = value
        elif home is MsrHome.TSC_ADJUST:
            out.tsc_adjust = TscAdjust(value)
        elif home is MsrHome.CPU_MSR and value:
            cpu_msrs[index] = value
        elif home is MsrHome.MSR_POLICY:
            out.policy_msrs[index] = value
        elif home is MsrHome.KVM:
            out.kvm_msrs[index] = value
    out.cpu = HvmCpu(**fields)
    out.mtrr = Mtrr.build(
        pat=msrs.get(MSR_PAT, Mtrr().msr_pat_cr),
        var=mtrr_var,
        fixed=mtrr_fixed,
        cap=msrs.get(MSR_MTRR_CAP, 0),
        def_type=msrs.get(MSR_MTRR_DEF_TYPE, 0),
    )
    out.cpu_msrs = CpuMsrs.of(cpu_msrs) if cpu_msrs else None
    out.kvm = KvmVcpuEntry(
        events=state.events.to_bytes(),
        mp_state=int(state.mp_state),
        flags=int(VcpuFlag.HALTED) if state.halted else 0,
        cr8=int(s.cr8),
        unusable=unusable,
    )
    return out


#: The general registers of ``struct kvm_regs``, in its declared order.
_GPRS = tuple(name for name, *_ in KvmRegs._fields_)


def vcpu_from_xen(vcpu_id: int, rec: VcpuRecords, *, irqchip: bool, tsc_khz: int) -> VcpuState:
    """The KVM state of one vCPU from its records (checked by the caller's decoder)."""
    cpu = rec.cpu
    regs = KvmRegs()
    for name in _GPRS:
        setattr(regs, name, getattr(cpu, name))
    kvm = rec.kvm
    sregs = KvmSregs()
    for bit, (kvm_name, xen_name) in enumerate(SEGMENTS):
        attr = getattr(cpu, f"{xen_name}_arbytes")
        unusable = bool(kvm.unusable >> bit & 1) if kvm is not None else not attr >> 7 & 1
        set_segment(
            getattr(sregs, kvm_name),
            getattr(cpu, f"{xen_name}_sel") & 0xFFFF,
            getattr(cpu, f"{xen_name}_limit"),
            getattr(cpu, f"{xen_name}_base"),
            attr,
            unusable,
        )
    sregs.idt.limit, sregs.idt.base = cpu.idtr_limit & 0xFFFF, cpu.idtr_base
    sregs.gdt.limit, sregs.gdt.base = cpu.gdtr_limit & 0xFFFF, cpu.gdtr_base
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4
    sregs.efer = cpu.msr_efer
    sregs.apic_base = rec.lapic.apic_base_msr
    page = rec.lapic_regs.data if rec.lapic_regs is not None else None
    if kvm is not None:
        sregs.cr8 = kvm.cr8
    elif page is not None:
        sregs.cr8 = _reg32(page, APIC_TASKPRI) >> 4 & 0xF
    debug = KvmDebugregs()
    for i in range(4):
        debug.db[i] = getattr(cpu, f"dr{i}")
    debug.dr6, debug.dr7 = cpu.dr6, cpu.dr7
    xsave = rec.xsave
    xcrs = KvmXcrs()
    xcrs.nr_xcrs = 1
    xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, xsave.fixed.xcr0
    events = KvmVcpuEvents.from_bytes(kvm.events) if kvm is not None else events_from_pending(cpu)
    lapic = KvmLapicState.from_bytes(page) if page is not None and irqchip else None
    return VcpuState(
        vcpu_id=vcpu_id,
        regs=regs,
        sregs=sregs,
        xsave=KvmXsave.from_bytes(xsave_area(xsave)),
        xcrs=xcrs,
        debugregs=debug,
        events=events,
        mp_state=MpState(kvm.mp_state) if kvm is not None else MpState.RUNNABLE,
        msrs=msrs_from_records(rec),
        lapic=lapic,
        halted=kvm is not None and bool(kvm.flags & VcpuFlag.HALTED),
        tsc_khz=tsc_khz,
    )


def msrs_from_records(rec: VcpuRecords) -> dict[int, int]:
    """Every MSR value the records hold, IA32_TSC first (see :func:`msr_home`)."""
    cpu = rec.cpu
    out: dict[int, int] = {index: getattr(cpu, name) for index, name in HVM_CPU_MSRS.items()}
    m = rec.mtrr
    out[MSR_PAT] = m.msr_pat_cr
    out[MSR_MTRR_CAP] = m.msr_mtrr_cap
    out[MSR_MTRR_DEF_TYPE] = m.msr_mtrr_def_type
    out.update(zip(MTRR_VAR, m.var, strict=True))
    out.update(zip(MTRR_FIXED, m.fixed, strict=True))
    if rec.tsc_adjust is not None:
        out[MSR_TSC_ADJUST] = rec.tsc_adjust.tsc_adjust
    out.update(dict.fromkeys(sorted(XEN_CPU_MSRS), 0))
    if rec.cpu_msrs is not None:
        out.update(rec.cpu_msrs.msrs)
    out.update(rec.policy_msrs)
    out.update(rec.kvm_msrs)
    out[MSR_TSC_DEADLINE] = rec.lapic.tdt_msr
    return out
