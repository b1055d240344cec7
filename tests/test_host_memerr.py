"""The host memory-error path (reference section 5), decision by decision."""

from __future__ import annotations

import pytest

from vmce.host.memerr import HostBank, HostMca, HostMceReport, PhysicalMce, Result
from vmce.host.memory import (
    DOMID_COW,
    DomainKind,
    GuestDomain,
    HostMemory,
    P2mType,
    PageOffline,
    PageUse,
)
from vmce.mca import ErrorClass
from vmce.vmce import BROADCAST, Domain, HostProfile, InjectionPolicy

BASE_MFN = 0x100000
SRAO_L3 = 0xBD2000008000017A  # xen-mceinj -t 0
SRAO_SCRUB = 0xBD000000004000CF  # xen-mceinj -t 1
SRAR_LOAD = 0xBD80000000000134
FATAL = 0xBF2000008000017A  # xen-mceinj -t 4
UCNA = 0xBC20000080000136
CE = 0x9400000000000151


class Host:
    """An Intel host with one 4-vCPU HAP guest (d1) on frames BASE_MFN.. at gfn 0.."""

    def __init__(
        self,
        profile: HostProfile | None = None,
        kind: DomainKind = DomainKind.HVM_HAP,
        hardware: bool = False,
        nr_vcpus: int = 4,
        **dom_kw: object,
    ) -> None:
        self.profile = profile or HostProfile.intel(lmce=True)
        self.mem = HostMemory()
        self.mem.add_ram(BASE_MFN, 0x2000)
        self.mem.add_ram(0x1000, 0x10, PageUse.XEN_IMAGE)
        self.mem.add_ram(0x2000, 0x10, PageUse.XEN_HEAP)
        self.mem.add_ram(0xFEC00, 1, PageUse.NOT_RAM)
        self.dom = Domain(self.profile, nr_vcpus, domid=1, **dom_kw)  # type: ignore[arg-type]
        self.mem.add_domain(GuestDomain(self.dom, kind, hardware))
        self.mem.assign(1, 0, BASE_MFN, 0x1000)
        self.mca = HostMca(self.profile, self.mem)

    def mce(
        self,
        status: int,
        gfn: int = 0x600,
        off: int = 0x123,
        misc: int = 0x86,
        mcg: int = 0x5,
        **kw: int,
    ) -> HostMceReport:
        addr = ((BASE_MFN + gfn) << 12) | off
        return self.mca.handle(PhysicalMce(0, mcg, (HostBank(7, status, addr, misc),), **kw))


def test_xen_mceinj_end_to_end_broadcast() -> None:
    """The reference's end-to-end example: -d <guest> -p <gpa> -t 0."""
    h = Host()
    r = h.mce(SRAO_L3)
    assert r.result is Result.RECOVERED and not r.host_panics
    b = r.banks[0]
    assert b.error_class is ErrorClass.SRAO and b.domid == 1 and b.gfn == 0x600
    assert b.guest_addr == 0x600123
    v0 = h.dom.vcpus[0]
    assert v0.mcg_status == 0x5
    assert (v0.banks[1].status, v0.banks[1].addr, v0.banks[1].misc) == (
        0xBD2000000000017A,
        0x600123,
        0x86,
    )
    for v in h.dom.vcpus[1:]:
        assert v.mcg_status == 0x5 and v.banks[1].status == 0
    assert all(v.mce_pending for v in h.dom.vcpus)
    assert h.mem.domains[1].p2m[0x600].type is P2mType.RAM_BROKEN
    assert h.mem.pages[BASE_MFN + 0x600].broken


def test_broken_page_callback() -> None:
    h = Host()
    seen: list[tuple[int, int]] = []
    h.mem.on_broken.append(lambda d, g: seen.append((d, g)))
    h.mce(SRAO_SCRUB, gfn=0x42)
    assert seen == [(1, 0x42)]


def test_second_error_on_broken_page_crashes_owner() -> None:
    h = Host()
    h.mce(SRAO_L3)
    r = h.mce(SRAO_L3)
    assert r.banks[0].action == "owner crashed" and r.result is Result.CONTINUE
    assert h.dom.crashed is not None


def test_free_page_is_offlined_without_vmce() -> None:
    h = Host()
    addr = (BASE_MFN + 0x1800) << 12  # beyond the guest's frames: free
    r = h.mca.handle(PhysicalMce(0, 0x5, (HostBank(7, SRAO_L3, addr, 0x86),)))
    assert r.result is Result.RECOVERED and r.banks[0].action == "page offlined"
    assert not any(v.mce_pending for v in h.dom.vcpus)
    assert h.mem.pages[BASE_MFN + 0x1800].offlined


@pytest.mark.parametrize(
    ("status", "result"), [(SRAO_L3, Result.CONTINUE), (SRAR_LOAD, Result.RESET)]
)
def test_virtual_address_is_ignored(status: int, result: Result) -> None:
    h = Host()
    r = h.mce(status, misc=0x46)  # address mode 1: linear
    assert r.result is result and r.banks[0].action == "ignored"
    assert not any(v.mce_pending for v in h.dom.vcpus)


def test_srar_in_guest_memory_is_recovered_by_vmce() -> None:
    h = Host()
    r = h.mce(SRAR_LOAD, mcg=0x7)
    assert r.result is Result.RECOVERED
    assert h.dom.vcpus[0].mcg_status == 0x7


@pytest.mark.parametrize(
    ("mfn", "result", "text"),
    [
        (0x1005, Result.CONTINUE, "offline_page failed"),  # Xen image page: error
        (0x2003, Result.CONTINUE, "not owned"),  # Xen heap: PENDING, not OWNED
        (0xFEC00, Result.CONTINUE, "offline_page failed"),  # not RAM
        (0x7777777, Result.CONTINUE, "offline_page failed"),
    ],  # no such frame
)
def test_non_guest_pages(mfn: int, result: Result, text: str) -> None:
    h = Host()
    r = h.mca.handle(PhysicalMce(0, 0x5, (HostBank(7, SRAO_L3, mfn << 12, 0x86),)))
    assert r.result is result and text in r.banks[0].reason


def test_shared_cow_page_is_a_hypervisor_bug() -> None:
    h = Host()
    h.mem.pages[BASE_MFN + 0x600].owner = DOMID_COW
    h.mem.domains[DOMID_COW] = h.mem.domains[1]
    r = h.mce(SRAO_L3)
    assert r.host_panics and "COW" in (r.panic_reason or "")


@pytest.mark.parametrize(
    ("kind", "status", "result", "host_panics"),
    [
        (DomainKind.PV, SRAO_L3, Result.CONTINUE, False),
        (DomainKind.PV, SRAR_LOAD, Result.RESET, True),
        (DomainKind.HVM_SHADOW, SRAO_L3, Result.CONTINUE, False),
    ],
)
def test_unsupported_paging_crashes_domain(
    kind: DomainKind, status: int, result: Result, host_panics: bool
) -> None:
    h = Host(kind=kind)
    r = h.mce(status, mcg=0x7)
    assert r.result is result and r.host_panics is host_panics
    assert r.banks[0].action == "domain crashed" and r.crashed == (1,)
    assert h.dom.crashed is not None


def test_hardware_domain_keeps_its_p2m() -> None:
    h = Host(hardware=True)
    r = h.mce(SRAO_L3)
    assert r.result is Result.RECOVERED
    assert h.mem.domains[1].p2m[0x600].type is P2mType.RAM_RW
    assert h.dom.vcpus[0].mce_pending


@pytest.mark.parametrize(
    "ptype", [P2mType.POPULATE_ON_DEMAND, P2mType.RAM_SHARED, P2mType.GRANT_MAP_RW, P2mType.PAGED]
)
def test_unbreakable_p2m_types_crash(ptype: P2mType) -> None:
    h = Host()
    h.mem.domains[1].p2m[0x600].type = ptype
    r = h.mce(SRAO_L3)
    assert r.banks[0].action == "domain crashed" and r.result is Result.CONTINUE


@pytest.mark.parametrize("ptype", [P2mType.RAM_LOGDIRTY, P2mType.RAM_RO, P2mType.MMIO_DIRECT])
def test_breakable_p2m_types(ptype: P2mType) -> None:
    h = Host()
    h.mem.domains[1].p2m[0x600].type = ptype
    assert h.mce(SRAO_L3).result is Result.RECOVERED
    assert h.mem.domains[1].p2m[0x600].type is P2mType.RAM_BROKEN


def test_fill_busy_crashes_domain_srao_host_survives() -> None:
    h = Host()
    h.dom.vcpus[3].mcg_status = 0x4
    r = h.mce(SRAO_L3)
    assert r.result is Result.CONTINUE and r.crashed == (1,)


def test_srar_fill_busy_panics_the_host() -> None:
    h = Host()
    h.dom.vcpus[0].mcg_status = 0x4
    r = h.mce(SRAR_LOAD, mcg=0x7)
    assert r.host_panics and r.crashed == (1,)


# -- 5.5 broadcast or LMCE ---------------------------------------------------------------


def test_lmce_single_vcpu_when_enabled_and_running() -> None:
    h = Host()
    assert h.dom.set_mca_cap(1) == 0
    h.dom.wrmsr(2, 0x4D0, 1)
    r = h.mce(SRAO_L3, mcg=0xD, running_domid=1, running_vcpu=2)
    d = r.banks[0].delivery
    assert d is not None and d.target == 2
    assert h.dom.vcpus[2].mcg_status == 0xD and h.dom.vcpus[2].mce_pending
    assert not h.dom.vcpus[0].mce_pending


@pytest.mark.parametrize("case", ["no-lmce-bit", "lmce-disabled", "other-domain", "no-vcpu"])
def test_lmce_falls_back_to_broadcast(case: str) -> None:
    h = Host()
    h.dom.set_mca_cap(1)
    h.dom.wrmsr(2, 0x4D0, 1)
    kw = {"running_domid": 1, "running_vcpu": 2}
    mcg = 0xD
    if case == "no-lmce-bit":
        mcg = 0x5
    elif case == "lmce-disabled":
        h.dom.wrmsr(2, 0x4D0, 0)
    elif case == "other-domain":
        kw["running_domid"] = 7
    else:
        kw["running_vcpu"] = 0xFFFF
    r = h.mce(SRAO_L3, mcg=mcg, **kw)
    d = r.banks[0].delivery
    assert d is not None and d.target == BROADCAST
    assert h.dom.vcpus[0].mcg_status == 0x5  # LMCE stripped


# -- 5.1-5.3 the handler -----------------------------------------------------------------


def test_fatal_pcc_panics() -> None:
    h = Host()
    r = h.mce(FATAL)
    assert r.host_panics and not any(v.mce_pending for v in h.dom.vcpus)


def test_no_ripv_no_eipv_panics() -> None:
    assert Host().mce(SRAO_L3, mcg=0x4).host_panics


def test_no_ripv_with_eipv_in_guest_is_handled() -> None:
    h = Host()
    r = h.mce(SRAO_L3, mcg=0x6, running_domid=1, running_vcpu=0)
    assert not r.host_panics


def test_corrected_and_ucna_are_only_logged() -> None:
    h = Host()
    assert h.mce(CE).result is Result.NOERROR
    assert h.mce(UCNA, mcg=0x1).result is Result.CONTINUE
    assert not any(v.mce_pending for v in h.dom.vcpus)


def test_srao_unknown_mcacod_continues() -> None:
    h = Host()
    r = h.mce(0xBD00000000000010)
    assert r.result is Result.CONTINUE and r.banks[0].action == "logged"


def test_srar_unknown_mcacod_resets() -> None:
    assert Host().mce(0xBD80000000000010, mcg=0x7).host_panics


def test_amd_host_never_injects() -> None:
    h = Host(profile=HostProfile.amd())
    r = h.mce(0xBD000000000000C0)
    assert not any(v.mce_pending for v in h.dom.vcpus)
    assert all(b.result is Result.NOERROR for b in r.banks)


def test_invalid_banks_are_skipped() -> None:
    h = Host()
    r = h.mca.handle(PhysicalMce(0, 0x5, (HostBank(3, 0),)))
    assert r.result is Result.NOERROR and r.banks == ()


def test_vcpu0_policy_through_the_host_path() -> None:
    h = Host(policy=InjectionPolicy.VCPU0)
    h.mce(SRAO_L3)
    assert h.dom.vcpus[0].mce_pending
    assert not any(v.mce_pending for v in h.dom.vcpus[1:])


def test_offline_status_bits() -> None:
    h = Host()
    r = h.mem.offline_page(BASE_MFN + 5)
    assert r.rc == 0
    assert r.status & PageOffline.PENDING and r.status & PageOffline.OWNED
    assert (r.status >> 16) == 1
    assert "owner=0x1" in r.describe()
