"""A whole VM between its captured state and the records of a stream, both ways.

:func:`encode_image` turns a captured :class:`~vmce.kvm.vstate.MachineState` plus the vMCE
model into the stream's records (everything but the pages). :func:`decode_image` turns a
checked :class:`~vmce.kvm.persist.index.StreamIndex` back into a :class:`VmImage`, refusing
everything a restore could not apply, before anything is applied: it is the whole of the
"no partial restore" rule. Its errors are :class:`~vmce.save.stream.StreamError` naming the
record and its offset.

Where everything goes (Xen's home first, the vendor trailer for the rest):

=====================================  ===================================================
state                                  record
=====================================  ===================================================
guest CPU vendor, family, model        X86_CPUID_POLICY (the guest's CPUID table)
PLATFORM_INFO, ARCH_CAPABILITIES       X86_MSR_POLICY
guest RAM; pages a host error took     PAGE_DATA (NOTAB with data; BROKEN without)
TSC frequency                          X86_TSC_INFO, HVM HEADER ``gtsc_khz``
real-mode TSS, vMCE MCA_CAP            HVM_PARAMS 37 (VM86_TSS_SIZED), 38 (MCA_CAP)
registers, segments, CRs, DRs, MSRs    HVM_CONTEXT CPU (``hvm_hw_cpu``)
pending event                          CPU ``pending_event`` + KVM_VCPU ``events``
LAPIC                                  LAPIC, LAPIC_REGS (irqchip only)
FPU/SSE/AVX, XCR0                      CPU ``fpu_regs``, CPU_XSAVE
PAT, MTRRs; TSC_ADJUST; other MSRs     MTRR; TSC_ADJUST; CPU_MSR (Xen's list) / KVM_MSRS
PICs, IOAPIC, PIT                      PIC x2, IOAPIC, PIT + KVM_PLATFORM
vMCE caps, CTL2, EXT_CTL               VMCE_VCPU (32, or 8/24 bytes for older Xen)
in-flight vMCE                         VMCE_INFLIGHT (vendor, vCPUs with something in flight)
MP state, VMM halt, CR8, unusable      KVM_VCPU (vendor)
kvmclock                               KVM_PLATFORM (vendor)
vCPUs, RAM size, devices, host         VM_CONFIG (vendor; the toolstack's knowledge in Xen)
UART                                   UART (vendor; a device model's state in Xen)
=====================================  ===================================================
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from vmce.host.memory import HostMemory, P2mType
from vmce.kvm.abi.constants import CpuidFlag
from vmce.kvm.devices.serial import SerialState
from vmce.kvm.persist.cpumap import VcpuRecords, XsaveLayout, vcpu_from_xen, vcpu_to_xen
from vmce.kvm.persist.index import StreamIndex
from vmce.kvm.persist.platmap import (
    PlatformMapError,
    PlatformRecords,
    platform_from_xen,
    platform_to_xen,
)
from vmce.kvm.persist.vendor import (
    KvmPlatformEntry,
    KvmVcpuEntry,
    MachineFlag,
    UartHead,
    VendorEntryError,
    VmConfigEntry,
    decode_fixed,
    decode_kvm_msrs,
    decode_uart,
    encode_kvm_msrs,
    encode_uart,
    fixed_entry,
)
from vmce.kvm.vm import DEFAULT_TSS_ADDR
from vmce.kvm.vstate import MachineState
from vmce.kvm.x86.cpuid import CpuidEntry, CpuProfile
from vmce.save.hvmctx import (
    VMCE_VCPU_SIZES,
    Header,
    HvmContext,
    HvmContextError,
    Record,
    TypeCode,
    VmceVcpu,
)
from vmce.save.hvmrecords import (
    OPAQUE_VENDOR_TYPES,
    CpuMsrs,
    CpuXsave,
    HvmCpu,
    Ioapic,
    Lapic,
    LapicRegs,
    Mtrr,
    Pic,
    Pit,
    TscAdjust,
    VendorTypeCode,
    VmceInflight,
    inflight_from_snapshots,
)
from vmce.save.stream import CpuidLeaf, MsrPolicyEntry, PageType, RecordType, StreamError, TscInfo
from vmce.save.stream.format import CPUID_NO_SUBLEAF
from vmce.vmce import Domain, HostProfile, RestoreError, Vendor, VmceSave

if TYPE_CHECKING:
    from vmce.kvm.vmcevm import VmceVmConfig

#: HVM_PARAM_VM86_TSS_SIZED: address (bits 31:0) and size (63:32) of the real-mode TSS,
#: which is what KVM_SET_TSS_ADDR places (3 pages).
HVM_PARAM_VM86_TSS_SIZED = 37
HVM_PARAM_MCA_CAP = 38
VM86_TSS = (0x3000 << 32) | DEFAULT_TSS_ADDR
#: Xen record types this VMM restores; any other is refused.
PER_VCPU_TYPES = frozenset(
    {
        TypeCode.CPU,
        TypeCode.LAPIC,
        TypeCode.LAPIC_REGS,
        TypeCode.MTRR,
        TypeCode.CPU_XSAVE,
        TypeCode.VMCE_VCPU,
        TypeCode.TSC_ADJUST,
        TypeCode.CPU_MSR,
    }
)
PLATFORM_TYPES = frozenset({TypeCode.PIC, TypeCode.IOAPIC, TypeCode.PIT})


@dataclass
class StreamParts:
    """Everything of a stream but its pages, ready for the writer."""

    config: VmConfigEntry
    context: HvmContext
    inflight: dict[int, VmceInflight]
    vendor: list[Record]
    cpuid: list[CpuidLeaf]
    msr_policy: list[MsrPolicyEntry]
    tsc: TscInfo
    params: dict[int, int]
    broken: frozenset[int]


@dataclass
class VmImage:
    """A whole VM decoded from a checked stream: what a restore applies, in KVM's terms."""

    config: VmConfigEntry
    profile: HostProfile
    cpu: CpuProfile
    machine: MachineState
    vmce: dict[int, VmceSave]
    inflight: dict[int, VmceInflight]
    mca_cap: int = 0
    broken: frozenset[int] = frozenset()
    tsc_khz: int = 0
    vmce_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def memory_size(self) -> int:
        return self.config.memory_size

    @property
    def vcpus(self) -> int:
        return self.config.vcpus


# -- saving -----------------------------------------------------------------------------------


def cpuid_policy(entries: list[CpuidEntry]) -> list[CpuidLeaf]:
    """The guest's CPUID table as Xen's policy leaves."""
    out = []
    for e in entries:
        sub = e.index if e.flags & CpuidFlag.SIGNIFCANT_INDEX else CPUID_NO_SUBLEAF
        out.append(CpuidLeaf(e.function, sub, e.eax, e.ebx, e.ecx, e.edx))
    return out


def encode_image(
    config: VmceVmConfig,
    domain: Domain,
    host_memory: HostMemory,
    state: MachineState,
    *,
    cpuid: list[CpuidEntry],
    xsave_layout: XsaveLayout,
    vmce_size: int = 32,
) -> StreamParts:
    """The records of a stream for a captured VM: how it was built, its vMCE model and host
    memory map (paused), and the KVM state just captured."""
    if vmce_size not in VMCE_VCPU_SIZES:
        raise ValueError(f"VMCE_VCPU size must be one of {VMCE_VCPU_SIZES}, not {vmce_size}")
    c = config
    cpu = c.guest_cpu()
    tsc_khz = state.vcpus[0].tsc_khz
    entry = VmConfigEntry.of(
        vcpus=c.vcpus,
        memory_size=c.memory_size,
        irqchip=state.platform.irqchip,
        pit=state.platform.has_pit,
        profile=c.profile,
        policy=c.policy,
        domid=c.domid,
        host_mfn_base=c.host_mfn_base,
    )
    ctx = HvmContext(Header(cpuid=cpu.signature(), gtsc_khz=tsc_khz))
    vendor: list[Record] = [fixed_entry(entry)]
    records: list[Record] = []
    policy: dict[int, int] = {}
    for vs in state.vcpus:
        i = vs.vcpu_id
        rec = vcpu_to_xen(vs, xsave_layout)
        records += [rec.cpu.to_record(i), rec.lapic.to_record(i), rec.mtrr.to_record(i)]
        records.append(rec.xsave.to_record(i))
        if rec.lapic_regs is not None:
            records.append(rec.lapic_regs.to_record(i))
        if rec.tsc_adjust is not None:
            records.append(rec.tsc_adjust.to_record(i))
        if rec.cpu_msrs is not None:
            records.append(rec.cpu_msrs.to_record(i))
        payload = VmceVcpu.from_save(domain.save_vcpu(i)).pack()[:vmce_size]
        records.append(Record(TypeCode.VMCE_VCPU, i, payload))
        assert rec.kvm is not None
        vendor.append(fixed_entry(rec.kvm, i))
        if rec.kvm_msrs:
            vendor.append(Record(VendorTypeCode.KVM_MSRS, i, encode_kvm_msrs(rec.kvm_msrs)))
        if i == 0:
            policy = rec.policy_msrs
    plat = platform_to_xen(state.platform)
    if plat.pics is not None:
        records += [plat.pics[0].to_record(0), plat.pics[1].to_record(1)]
    if plat.ioapic is not None:
        records.append(plat.ioapic.to_record(0))
    if plat.pit is not None:
        records.append(plat.pit.to_record(0))
    records.sort(key=lambda r: (r.typecode, r.instance))
    ctx.records = records
    vendor.append(fixed_entry(plat.entry))
    if state.serial is not None:
        s = state.serial
        head = UartHead(
            s.ier, s.lcr, s.mcr, s.scr, s.dll, s.dlm, int(s.fifo), int(s.thri_pending),
            len(s.rx), len(s.pending),
        )  # fmt: skip
        vendor.append(Record(VendorTypeCode.UART, 0, encode_uart(head, s.rx, s.pending)))
    params = {HVM_PARAM_VM86_TSS_SIZED: VM86_TSS}
    if domain.mca_cap_param:
        params[HVM_PARAM_MCA_CAP] = domain.mca_cap_param
    gd = host_memory.domains[domain.domid]
    broken = frozenset(gfn for gfn, e in gd.p2m.items() if e.type is P2mType.RAM_BROKEN)
    return StreamParts(
        config=entry,
        context=ctx,
        inflight=inflight_from_snapshots(domain.snapshot()),
        vendor=vendor,
        cpuid=cpuid_policy(cpuid),
        msr_policy=[MsrPolicyEntry(k, 0, v) for k, v in sorted(policy.items())],
        tsc=TscInfo(mode=0, khz=tsc_khz, nsec=int(state.platform.clock.clock)),
        params=params,
        broken=broken,
    )


# -- restoring --------------------------------------------------------------------------------


class _Refuse:
    """Builds errors that name a record of the stream (END for a record that is missing)."""

    def __init__(self, index: StreamIndex) -> None:
        self.index = index

    def __call__(self, rtype: RecordType, message: str) -> StreamError:
        records = self.index.stream.records
        s = next((r for r in records if r.type == rtype), records[-1])
        return StreamError(
            f"record {s.index} ({s.name}, type {s.type:#x}) at offset {s.offset:#x}: {message}",
            offset=s.offset,
            index=s.index,
            rtype=s.type,
        )


T = TypeVar("T")


def _ctx_call(refuse: _Refuse, fn: Callable[[], T]) -> T:
    """Run a decoder; its errors become StreamErrors on the HVM_CONTEXT record."""
    try:
        return fn()
    except (HvmContextError, VendorEntryError, PlatformMapError, ValueError) as e:
        raise refuse(RecordType.HVM_CONTEXT, f"HVM context: {e}") from e


def guest_cpu(leaves: tuple[CpuidLeaf, ...]) -> CpuProfile:
    """The guest CPU a CPUID policy shows: vendor (leaf 0) and family/model/stepping (leaf 1)."""
    by_leaf = {(leaf.leaf, leaf.subleaf): leaf for leaf in leaves}
    v = by_leaf.get((0, CPUID_NO_SUBLEAF)) or by_leaf.get((0, 0))
    f = by_leaf.get((1, CPUID_NO_SUBLEAF)) or by_leaf.get((1, 0))
    if v is None or f is None:
        raise ValueError("the policy has no leaf 0 or leaf 1")
    raw = b"".join(x.to_bytes(4, "little") for x in (v.b, v.d, v.c))
    try:
        vendor = Vendor.parse(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        vendor = Vendor.UNKNOWN
    if vendor not in (Vendor.INTEL, Vendor.AMD):
        raise ValueError(f"guest CPU vendor {raw!r} is not one this VMM shows")
    eax = f.a
    base_family, base_model = eax >> 8 & 0xF, eax >> 4 & 0xF
    family = base_family + (eax >> 20 & 0xFF if base_family == 0xF else 0)
    model = base_model | (eax >> 16 & 0xF) << 4 if base_family in (6, 0xF) else base_model
    cpu = CpuProfile(vendor, family, model, eax & 0xF)
    if cpu.signature() != eax & 0x0FFF_3FFF:
        raise ValueError(f"CPUID.1:EAX {eax:#x} is not a signature this VMM can show")
    return cpu


def _group(
    ctx: HvmContext, vcpus: int, refuse: _Refuse
) -> tuple[dict[int, dict[int, Record]], dict[int, dict[int, Record]]]:
    """Xen records by typecode and instance, with the instances checked."""
    per_vcpu: dict[int, dict[int, Record]] = defaultdict(dict)
    platform: dict[int, dict[int, Record]] = defaultdict(dict)
    for r in ctx.records:
        where = f"HVM context: offset {r.offset:#x}: {r.name} instance {r.instance}"
        if r.typecode in PER_VCPU_TYPES:
            if r.instance >= vcpus:
                raise refuse(RecordType.HVM_CONTEXT, f"{where}: the VM has {vcpus} vCPUs")
            per_vcpu[r.typecode][r.instance] = r
        elif r.typecode in PLATFORM_TYPES:
            platform[r.typecode][r.instance] = r
        else:
            raise refuse(RecordType.HVM_CONTEXT, f"{where}: no equivalent in this VMM")
    return per_vcpu, platform


def _vendor(index: StreamIndex) -> dict[int, dict[int, Record]]:
    out: dict[int, dict[int, Record]] = defaultdict(dict)
    for r in index.vendor:
        out[r.typecode][r.instance] = r
    return out


def decode_image(index: StreamIndex, *, profile: HostProfile | None = None) -> VmImage:
    """Decode and check everything a restore needs, refusing what it could not apply.

    ``profile`` is the restoring host's vMCE profile (default: the saving host's). The vMCE
    records are checked against it as Xen's ``vmce_restore_vcpu`` does, with Xen's message.
    """
    refuse = _Refuse(index)
    ctx = index.context
    if ctx is None:  # END requires HVM_CONTEXT: the index never returns without it
        raise refuse(RecordType.HVM_CONTEXT, "no HVM context")
    vendor = _vendor(index)
    configs = vendor.get(VendorTypeCode.VM_CONFIG, {})
    if list(configs) != [0]:
        raise refuse(
            RecordType.HVM_CONTEXT,
            "HVM context has no vmce VM_CONFIG entry: not a stream of vmce's VMM "
            "(the machine's RAM and devices are unknown)",
        )
    config = _ctx_call(refuse, lambda: decode_fixed(VmConfigEntry, configs[0]))
    n = config.vcpus
    irqchip = MachineFlag.IRQCHIP in config.machine_flags
    has_pit = MachineFlag.PIT in config.machine_flags
    dest = profile or config.host_profile()
    cpu = _cpu(index, refuse)
    tsc = index.tsc_info
    if tsc is None:
        raise refuse(RecordType.END, "the stream ended without X86_TSC_INFO")
    _check_pages(index, refuse, config)
    mca_cap = _check_params(index, refuse, dest, n, config.domid)
    per_vcpu, platform = _group(ctx, n, refuse)
    for code in (TypeCode.CPU, TypeCode.LAPIC, TypeCode.MTRR, TypeCode.CPU_XSAVE):
        missing = sorted(set(range(n)) - set(per_vcpu.get(code, {})))
        if missing:
            raise refuse(RecordType.HVM_CONTEXT, f"HVM context: no {code.name} for vCPUs {missing}")
    want = {TypeCode.PIC: {0, 1}, TypeCode.IOAPIC: {0}} if irqchip else {}
    if has_pit:
        want[TypeCode.PIT] = {0}
    for code in PLATFORM_TYPES:
        got = set(platform.get(code, {}))
        if got != want.get(code, set()):
            kind = "an irqchip" if irqchip else "no irqchip"
            kind += " and a PIT" if has_pit else ""
            raise refuse(
                RecordType.HVM_CONTEXT,
                f"HVM context: {code.name} instances {sorted(got)} for a machine with {kind}",
            )
    lapic_regs = set(per_vcpu.get(TypeCode.LAPIC_REGS, {}))
    if lapic_regs != (set(range(n)) if irqchip else set()):
        raise refuse(
            RecordType.HVM_CONTEXT,
            f"HVM context: LAPIC_REGS for vCPUs {sorted(lapic_regs)}, irqchip={irqchip}",
        )
    for vcode in OPAQUE_VENDOR_TYPES:
        limit = n if vcode in (VendorTypeCode.KVM_VCPU, VendorTypeCode.KVM_MSRS) else 1
        extra = [i for i in vendor.get(vcode, {}) if i >= limit]
        if extra:
            raise refuse(
                RecordType.HVM_CONTEXT, f"HVM context: vendor {vcode.name} instances {extra}"
            )
    kvm_vcpus = vendor.get(VendorTypeCode.KVM_VCPU, {})
    if set(kvm_vcpus) != set(range(n)) or 0 not in vendor.get(VendorTypeCode.KVM_PLATFORM, {}):
        raise refuse(
            RecordType.HVM_CONTEXT, "HVM context: vendor KVM_VCPU or KVM_PLATFORM entries missing"
        )
    bad_inflight = [i for i in index.inflight if i >= n]
    if bad_inflight:
        raise refuse(RecordType.HVM_CONTEXT, f"HVM context: VMCE_INFLIGHT for vCPUs {bad_inflight}")
    saves = _ctx_call(refuse, lambda: ctx.vmce_saves(n))
    checker = Domain(dest, n, domid=config.domid)
    try:
        for vid, s in saves.items():
            checker.check_restore(vid, s)
    except RestoreError as e:
        raise refuse(RecordType.HVM_CONTEXT, str(e)) from e
    policy = {e.idx: e.val for e in index.msr_policy or ()}

    def vcpu_records(i: int) -> VcpuRecords:
        def one(code: TypeCode) -> Record | None:
            return per_vcpu.get(code, {}).get(i)

        def need(code: TypeCode) -> Record:
            r = one(code)
            assert r is not None
            return r

        kvm_msrs = vendor.get(VendorTypeCode.KVM_MSRS, {}).get(i)
        regs, adj, msrs = one(TypeCode.LAPIC_REGS), one(TypeCode.TSC_ADJUST), one(TypeCode.CPU_MSR)
        return VcpuRecords(
            cpu=HvmCpu.from_record(need(TypeCode.CPU)),
            lapic=Lapic.from_record(need(TypeCode.LAPIC)),
            mtrr=Mtrr.from_record(need(TypeCode.MTRR)),
            xsave=CpuXsave.from_record(need(TypeCode.CPU_XSAVE)),
            lapic_regs=LapicRegs.from_record(regs) if regs else None,
            tsc_adjust=TscAdjust.from_record(adj) if adj else None,
            cpu_msrs=CpuMsrs.from_record(msrs) if msrs else None,
            kvm=decode_fixed(KvmVcpuEntry, kvm_vcpus[i]),
            kvm_msrs=decode_kvm_msrs(kvm_msrs) if kvm_msrs else {},
            policy_msrs=dict(policy),
        )

    def machine() -> MachineState:
        vstates = [
            vcpu_from_xen(i, vcpu_records(i), irqchip=irqchip, tsc_khz=tsc.khz) for i in range(n)
        ]
        pe = decode_fixed(KvmPlatformEntry, vendor[VendorTypeCode.KVM_PLATFORM][0])
        plat = PlatformRecords(pe)

        def rec(code: TypeCode, i: int) -> Record:
            return platform[code][i]

        if irqchip:
            plat.pics = (
                Pic.from_record(rec(TypeCode.PIC, 0)),
                Pic.from_record(rec(TypeCode.PIC, 1)),
            )
            plat.ioapic = Ioapic.from_record(rec(TypeCode.IOAPIC, 0))
        if has_pit:
            plat.pit = Pit.from_record(rec(TypeCode.PIT, 0))
        serial = None
        uart = vendor.get(VendorTypeCode.UART, {}).get(0)
        if uart is not None:
            h, rx, pending = decode_uart(uart)
            serial = SerialState(
                h.ier, h.lcr, h.mcr, h.scr, h.dll, h.dlm, bool(h.fifo), bool(h.thri_pending),
                rx, pending,
            )  # fmt: skip
        return MachineState(vstates, platform_from_xen(plat), serial)

    state = _ctx_call(refuse, machine)
    sizes = {r.instance: len(r.payload) for r in per_vcpu.get(TypeCode.VMCE_VCPU, {}).values()}
    broken = frozenset(p for p, t in index.no_data.items() if t == PageType.BROKEN)
    return VmImage(
        config=config,
        profile=dest,
        cpu=cpu,
        machine=state,
        vmce=saves,
        inflight=dict(index.inflight),
        mca_cap=mca_cap,
        broken=broken,
        tsc_khz=tsc.khz,
        vmce_sizes=sizes,
    )


def _cpu(index: StreamIndex, refuse: _Refuse) -> CpuProfile:
    if index.cpuid_policy is None:
        raise refuse(
            RecordType.END, "the stream ended without X86_CPUID_POLICY: the guest CPU is unknown"
        )
    try:
        return guest_cpu(index.cpuid_policy)
    except ValueError as e:
        raise refuse(RecordType.X86_CPUID_POLICY, str(e)) from e


def _check_pages(index: StreamIndex, refuse: _Refuse, config: VmConfigEntry) -> None:
    """Every pfn of guest RAM once, nothing beyond it, holes only for broken pages."""
    npages = config.memory_size // 4096
    for rec in index.page_records:
        if rec.max_pfn >= npages:
            raise rec.error(
                f"pfn[{rec.max_index}] {rec.max_pfn:#x} is beyond the guest's max_pfn "
                f"{npages - 1:#x}"
            )
    for pfn, ptype in sorted(index.no_data.items()):
        if ptype != PageType.BROKEN:
            rec = next(r for r in index.page_records if r.max_pfn >= pfn)
            raise rec.error(f"pfn {pfn:#x} is {ptype.name}: guest RAM without holes is expected")
    if index.pfns != npages:
        message = f"the stream sends {index.pfns} of the guest's {npages} pfns"
        if not index.page_records:
            raise refuse(RecordType.END, message)
        raise index.page_records[-1].error(message)


def _check_params(
    index: StreamIndex, refuse: _Refuse, profile: HostProfile, vcpus: int, domid: int
) -> int:
    """HVM_PARAMS: the TSS where KVM has it, and an MCA_CAP the host accepts (Xen's rule)."""
    params = dict(index.hvm_params)
    tss = params.pop(HVM_PARAM_VM86_TSS_SIZED, VM86_TSS)
    if tss != VM86_TSS:
        raise refuse(
            RecordType.HVM_PARAMS,
            f"VM86_TSS_SIZED {tss:#x}: this VMM places the real-mode TSS at {VM86_TSS:#x}",
        )
    mca_cap = params.pop(HVM_PARAM_MCA_CAP, 0)
    if params:
        names = ", ".join(str(k) for k in sorted(params))
        raise refuse(RecordType.HVM_PARAMS, f"HVM parameters {names} have no equivalent here")
    if mca_cap:
        rc = Domain(profile, vcpus, domid=domid).set_mca_cap(mca_cap)
        if rc:
            raise refuse(
                RecordType.HVM_PARAMS, f"MCA_CAP {mca_cap:#x} refused by this host (rc {rc})"
            )
    return mca_cap
