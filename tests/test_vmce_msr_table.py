"""The routing table's specialised handlers against the literal layer-1 functions.

``vmce_rdmsr``/``vmce_wrmsr`` transcribe Xen's logic; ``MsrTable`` is what the VMM calls on
every guest access. For every routed MSR, every host vendor, both guest vendors and a range of
(restored) capabilities, both must give the guest the same answer and leave the same state.
"""

from __future__ import annotations

import itertools

import pytest

from vmce.mca.msr import VMCE_ROUTED_RANGES
from vmce.vmce import HostProfile, MsrTable, Outcome, VCpu, Vendor, vmce_rdmsr, vmce_wrmsr

ROUTED = [m for first, count in VMCE_ROUTED_RANGES for m in range(first, first + count)]
PROFILES = [
    HostProfile.intel(),
    HostProfile.intel(lmce=True),
    HostProfile.amd(),
    HostProfile(Vendor.HYGON),
    HostProfile(Vendor.CENTAUR),
    HostProfile(Vendor.SHANGHAI),
    HostProfile(Vendor.UNKNOWN),
]
CAPS = [None, 0x0, 0x1, 0x109, 0x1000116, 0x1FF, 0x9000C02, 0x1000C20]
VALUES = [0, 1, 0x40000001, (1 << 64) - 1]


def vcpu(cap: int, ext_ctl: int = 0) -> VCpu:
    v = VCpu(0, cap)
    v.mcg_status = 0x5
    v.mcg_ext_ctl = ext_ctl
    for i, b in enumerate(v.banks):
        b.status, b.addr, b.misc, b.ctl2 = 0xBD00 + i, 0x6000 + i, 0x86 + i, 0x40 + i
    return v


def state(v: VCpu) -> tuple[object, ...]:
    return (
        v.mcg_cap,
        v.mcg_status,
        v.mcg_ext_ctl,
        tuple((b.status, b.addr, b.misc, b.ctl2) for b in v.banks),
    )


def generic_read(p: HostProfile, v: VCpu, msr: int, gv: Vendor) -> int | None:
    outcome, value = vmce_rdmsr(p, v, msr, gv)
    return None if outcome is Outcome.GP else value  # UNHANDLED reads as zero


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: f"{p.vendor.value}-lmce{p.lmce}")
@pytest.mark.parametrize("guest_vendor", [Vendor.INTEL, Vendor.AMD])
def test_table_equals_layer_one(profile: HostProfile, guest_vendor: Vendor) -> None:
    table = MsrTable(profile, guest_vendor)
    for cap_opt, ext in itertools.product(CAPS, (0, 1)):
        cap = profile.default_mcg_cap if cap_opt is None else cap_opt
        for msr in ROUTED:
            a, b = vcpu(cap, ext), vcpu(cap, ext)
            where = f"msr {msr:#x} cap {cap:#x} ext {ext}"
            assert table.read(a, msr) == generic_read(profile, b, msr, guest_vendor), where
            for value in VALUES:
                a, b = vcpu(cap, ext), vcpu(cap, ext)
                fast = table.write(a, msr, value)
                slow = vmce_wrmsr(profile, b, msr, value).outcome is not Outcome.GP
                assert fast == slow, f"{where} write {value:#x}"
                assert state(a) == state(b), f"{where} write {value:#x}"
