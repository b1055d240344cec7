"""What a stream holds, for people and scripts: records, the machine, each vCPU's vMCE.

Works on any stream the strict scan accepts, Xen's own included: the machine section appears
only when the vmce VMM's VM_CONFIG entry is there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vmce.kvm.persist.image import guest_cpu
from vmce.kvm.persist.index import StreamIndex
from vmce.kvm.persist.vendor import MachineFlag, VendorEntryError, VmConfigEntry, decode_fixed
from vmce.mca import MCG_CAP, MCG_EXT_CTL, MCG_STATUS, MCI_CTL2, MCI_STATUS
from vmce.save.hvmctx import TypeCode, VmceVcpu
from vmce.save.hvmrecords import HvmCpu, VendorTypeCode, VmceInflight

#: Which Xen version wrote each VMCE_VCPU size (reference 6.3).
VMCE_FORMATS = {8: "v1 (Xen 4.2)", 24: "v2 (Xen 4.3)", 32: "v3 (Xen 4.10)"}


@dataclass
class VcpuReport:
    """One vCPU: where it was and its vMCE (saved and in flight)."""

    vcpu: int
    rip: int | None = None
    cs: int | None = None
    vmce_format: str = "none (Xen <= 4.1)"
    vmce: VmceVcpu | None = None
    inflight: VmceInflight | None = None

    def lines(self) -> list[str]:
        where = ""
        if self.rip is not None and self.cs is not None:
            where = f": RIP {self.rip:#x}, CS {self.cs:#x} (CPL{self.cs & 3})"
        out = [f"vCPU {self.vcpu}{where}"]
        v = self.vmce
        if v is None:
            out.append("  VMCE_VCPU: none")
        else:
            out.append(
                f"  VMCE_VCPU {self.vmce_format}: MCG_CAP {v.caps:#x} ({MCG_CAP.render(v.caps)})"
            )
            out.append(
                f"    MC0_CTL2 {v.mci_ctl2_bank0:#x} ({MCI_CTL2.render(v.mci_ctl2_bank0)}), "
                f"MC1_CTL2 {v.mci_ctl2_bank1:#x} ({MCI_CTL2.render(v.mci_ctl2_bank1)}), "
                f"MCG_EXT_CTL {v.mcg_ext_ctl:#x} ({MCG_EXT_CTL.render(v.mcg_ext_ctl)})"
            )
        f = self.inflight
        if f is None:
            out.append("  in flight: nothing")
        else:
            pending = ", #MC pending" if f.mce_pending else ""
            out.append(
                f"  in flight: MCG_STATUS {f.mcg_status:#x} ({MCG_STATUS.render(f.mcg_status)})"
                f"{pending}"
            )
            for bank, (st, addr, misc) in enumerate(
                [
                    (f.bank0_status, f.bank0_addr, f.bank0_misc),
                    (f.bank1_status, f.bank1_addr, f.bank1_misc),
                ]
            ):
                if st or addr or misc:
                    out.append(
                        f"    bank {bank}: STATUS {st:#x} ({MCI_STATUS.render(st)}) "
                        f"ADDR {addr:#x} MISC {misc:#x}"
                    )
        return out

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vcpu": self.vcpu}
        if self.rip is not None:
            out["rip"] = f"{self.rip:#x}"
            out["cs"] = f"{self.cs:#x}"
        out["vmce_vcpu"] = None
        if self.vmce is not None:
            v = self.vmce
            out["vmce_vcpu"] = {
                "format": self.vmce_format,
                "caps": f"{v.caps:#x}",
                "mci_ctl2_bank0": f"{v.mci_ctl2_bank0:#x}",
                "mci_ctl2_bank1": f"{v.mci_ctl2_bank1:#x}",
                "mcg_ext_ctl": f"{v.mcg_ext_ctl:#x}",
            }
        out["in_flight"] = None
        if self.inflight is not None:
            f = self.inflight
            out["in_flight"] = {
                "mcg_status": f"{f.mcg_status:#x}",
                "banks": [
                    {"status": f"{s:#x}", "addr": f"{a:#x}", "misc": f"{m:#x}"}
                    for s, a, m in (
                        (f.bank0_status, f.bank0_addr, f.bank0_misc),
                        (f.bank1_status, f.bank1_addr, f.bank1_misc),
                    )
                ],
                "mce_pending": bool(f.mce_pending),
            }
        return out


@dataclass
class StreamReport:
    """The whole report."""

    index: StreamIndex
    machine: list[str] = field(default_factory=list)
    machine_json: dict[str, Any] = field(default_factory=dict)
    vcpus: list[VcpuReport] = field(default_factory=list)
    context: dict[str, int] = field(default_factory=dict)
    vendor: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = self.index.stream.describe()
        out += [
            f"pages: {self.index.pages} of {self.index.pfns} pfns with data; "
            f"{sum(1 for r in self.index.runs if r.aligned)} of {len(self.index.runs)} "
            "page runs are page-aligned in the file (mappable)"
        ]
        ctx = ", ".join(f"{k} x{v}" for k, v in self.context.items())
        out.append(f"HVM context: {ctx}")
        if self.vendor:
            out.append("vendor trailer: " + ", ".join(f"{k} x{v}" for k, v in self.vendor.items()))
        out += self.machine
        for v in self.vcpus:
            out += v.lines()
        return out

    def as_json(self) -> dict[str, Any]:
        s = self.index.stream
        return {
            "version": s.version,
            "size": s.size,
            "records": [
                {
                    "index": r.index,
                    "offset": r.offset,
                    "type": r.name,
                    "length": r.length,
                    "note": r.note,
                }
                for r in s.records
            ],
            "pfns": self.index.pfns,
            "pages": self.index.pages,
            "hvm_context": self.context,
            "vendor": self.vendor,
            "machine": self.machine_json,
            "vcpus": [v.as_json() for v in self.vcpus],
        }


def describe(index: StreamIndex) -> StreamReport:
    """A report of a checked stream."""
    rep = StreamReport(index)
    ctx = index.context
    assert ctx is not None
    rep.context = dict(Counter(r.name for r in ctx.records))
    rep.vendor = dict(Counter(_vendor_name(r.typecode) for r in index.vendor))
    if index.inflight:
        rep.vendor = {"VMCE_INFLIGHT": len(index.inflight), **rep.vendor}
    cpus: dict[int, VcpuReport] = {}

    def vcpu(i: int) -> VcpuReport:
        return cpus.setdefault(i, VcpuReport(i))

    for r in ctx.records:
        if r.typecode == TypeCode.CPU:
            cpu = HvmCpu.from_record(r)
            vcpu(r.instance).rip, vcpu(r.instance).cs = cpu.rip, cpu.cs_sel
        elif r.typecode == TypeCode.VMCE_VCPU:
            v = vcpu(r.instance)
            v.vmce = VmceVcpu.from_payload(r.payload)
            v.vmce_format = VMCE_FORMATS.get(len(r.payload), f"{len(r.payload)} bytes")
    for i, f in index.inflight.items():
        vcpu(i).inflight = f
    rep.vcpus = [cpus[i] for i in sorted(cpus)]
    config = next((r for r in index.vendor if r.typecode == VendorTypeCode.VM_CONFIG), None)
    if config is not None:
        try:
            rep.machine, rep.machine_json = _machine(decode_fixed(VmConfigEntry, config), index)
        except VendorEntryError as e:
            rep.machine = [f"machine: unreadable VM_CONFIG ({e})"]
    return rep


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _vendor_name(code: int) -> str:
    try:
        return VendorTypeCode(code).name
    except ValueError:
        return f"{code:#x}"


def _machine(c: VmConfigEntry, index: StreamIndex) -> tuple[list[str], dict[str, Any]]:
    flags = c.machine_flags
    devices = "irqchip" if MachineFlag.IRQCHIP in flags else "no irqchip"
    if MachineFlag.PIT in flags:
        devices += " + PIT"
    host = c.host_profile()
    guest = "unknown"
    if index.cpuid_policy is not None:
        try:
            cpu = guest_cpu(index.cpuid_policy)
            guest = f"{cpu.vendor.value} family {cpu.family:#x} model {cpu.model:#x}"
        except ValueError as e:
            guest = f"unreadable ({e})"
    line = (
        f"machine: {c.vcpus} vCPUs, {_size(c.memory_size)} RAM, {devices}, guest CPU {guest}; "
        f"host profile {host.vendor.value} (SER {int(host.ser)}, LMCE {int(host.lmce)}), "
        f"{c.injection_policy().value} injection, domid {c.domid}"
    )
    js = {
        "vcpus": c.vcpus,
        "memory_bytes": c.memory_size,
        "irqchip": MachineFlag.IRQCHIP in flags,
        "pit": MachineFlag.PIT in flags,
        "guest_cpu": guest,
        "host_vendor": host.vendor.value,
        "host_ser": host.ser,
        "host_lmce": host.lmce,
        "policy": c.injection_policy().value,
        "domid": c.domid,
    }
    return [line], js
