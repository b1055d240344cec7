"""Every MSR row of reference section 3, for Intel, AMD and Centaur hosts.

Expected values are written out from the reference tables, not computed by the model.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmce.mca.msr import is_vmce_routed as is_routed
from vmce.vmce import (
    BankRecord,
    Domain,
    HostProfile,
    Outcome,
    Vendor,
    VmceSave,
    vmce_rdmsr,
    vmce_wrmsr,
)
from vmce.vmce.msrs import AMD_THRESHOLD_LOCKED

ONES = (1 << 64) - 1
GP = None  # what Domain.rdmsr returns for #GP
INTEL = HostProfile.intel()
AMD = HostProfile.amd()
CENTAUR = HostProfile(Vendor.CENTAUR, ser=False)
HYGON = HostProfile(Vendor.HYGON, ser=False)


def dom(profile: HostProfile = INTEL, n: int = 2, **kw: object) -> Domain:
    return Domain(profile, n, **kw)  # type: ignore[arg-type]


def filled(profile: HostProfile = INTEL) -> Domain:
    d = dom(profile)
    d.fill(BankRecord(0xBD000000123400C0, 0x6000123, 0x86), 0x5)
    return d


# -- 2.2 initial values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "cap"),
    [
        (INTEL, 0x1000C02),
        (AMD, 0x2),
        (HYGON, 0x2),
        (CENTAUR, 0x2),
        (HostProfile(Vendor.SHANGHAI), 0x2),
        (HostProfile(Vendor.UNKNOWN), 0x2),
    ],
)
def test_initial_mcg_cap(profile: HostProfile, cap: int) -> None:
    d = dom(profile, 3)
    for v in d.vcpus:
        assert v.mcg_cap == cap
        assert v.mcg_status == v.mcg_ext_ctl == 0
        assert all(b.status == b.addr == b.misc == b.ctl2 == 0 for b in v.banks)
        assert not v.mce_pending


# -- 3.2 global MSRs ---------------------------------------------------------------------


@pytest.mark.parametrize("profile", [INTEL, AMD, CENTAUR])
def test_mcg_cap_read_only_without_gp(profile: HostProfile) -> None:
    d = dom(profile)
    cap = d.rdmsr(0, 0x179)
    assert d.wrmsr(0, 0x179, 0x1FF) is True
    assert d.rdmsr(0, 0x179) == cap


@pytest.mark.parametrize("profile", [INTEL, AMD])
@pytest.mark.parametrize("value", [0, 5, 0xDEADBEEF, ONES])
def test_mcg_status_stores_any_value(profile: HostProfile, value: int) -> None:
    d = dom(profile)
    assert d.wrmsr(1, 0x17A, value) is True
    assert d.rdmsr(1, 0x17A) == value
    assert d.rdmsr(0, 0x17A) == 0  # per vCPU


@pytest.mark.parametrize("profile", [INTEL, AMD])
def test_mcg_ctl_absent_reads_zero_writes_ignored(profile: HostProfile) -> None:
    d = dom(profile)
    assert d.rdmsr(0, 0x17B) == 0
    assert d.wrmsr(0, 0x17B, ONES) is True
    assert d.wrmsr(0, 0x17B, 0x1234) is True
    assert d.rdmsr(0, 0x17B) == 0


def test_mcg_ctl_reads_ones_with_restored_ctl_p() -> None:
    d = dom(INTEL)
    d.restore({0: VmceSave(0x109)})
    assert d.rdmsr(0, 0x17B) == ONES
    assert d.wrmsr(0, 0x17B, 0) is True
    assert d.rdmsr(0, 0x17B) == ONES


@pytest.mark.parametrize("profile", [INTEL, AMD, CENTAUR])
def test_mcg_ext_ctl_without_lmce_p_gps(profile: HostProfile) -> None:
    d = dom(profile)
    assert d.rdmsr(0, 0x4D0) is GP
    assert d.wrmsr(0, 0x4D0, 0) is False
    assert d.wrmsr(0, 0x4D0, 1) is False


def test_mcg_ext_ctl_with_lmce_p() -> None:
    d = dom(HostProfile.intel(lmce=True))
    assert d.set_mca_cap(1) == 0
    assert d.rdmsr(0, 0x179) == 0x9000C02
    assert d.rdmsr(0, 0x4D0) == 0
    assert d.wrmsr(0, 0x4D0, 1) is True
    assert d.rdmsr(0, 0x4D0) == 1
    assert d.wrmsr(0, 0x4D0, 2) is False
    assert d.wrmsr(0, 0x4D0, 3) is False
    assert d.rdmsr(0, 0x4D0) == 1
    assert d.wrmsr(0, 0x4D0, 0) is True
    assert d.rdmsr(0, 0x4D0) == 0


# -- 3.3 per-bank MSRs -------------------------------------------------------------------


@pytest.mark.parametrize("profile", [INTEL, AMD, CENTAUR])
def test_mci_ctl_all_ones_in_range_zero_beyond(profile: HostProfile) -> None:
    d = dom(profile)
    assert d.rdmsr(0, 0x400) == ONES
    assert d.rdmsr(0, 0x404) == ONES
    assert d.rdmsr(0, 0x408) == 0  # bank 2: out of range
    assert d.rdmsr(0, 0x47C) == 0  # bank 31
    for msr in (0x400, 0x404, 0x408):
        assert d.wrmsr(0, msr, 0) is True
        assert d.wrmsr(0, msr, 0x1234) is True
    assert d.rdmsr(0, 0x400) == ONES  # writes ignored: no per-bank CTL array


@pytest.mark.parametrize("profile", [INTEL, AMD])
@pytest.mark.parametrize("reg", [1, 2, 3])
def test_status_addr_misc_writes(profile: HostProfile, reg: int) -> None:
    d = filled(profile)
    msr = 0x404 + reg  # bank 1
    before = d.rdmsr(0, msr)
    assert before != 0
    assert d.wrmsr(0, msr, 1) is False  # non-zero: #GP
    assert d.rdmsr(0, msr) == before
    assert d.wrmsr(0, msr, 0) is True  # zero: clears
    assert d.rdmsr(0, msr) == 0
    assert d.wrmsr(0, 0x400 + reg, 1) is False  # bank 0 in range: #GP
    assert d.wrmsr(0, 0x408 + reg, 0xFFFF) is True  # bank 2 out of range: WI, no #GP
    assert d.rdmsr(0, 0x408 + reg) == 0
    assert d.wrmsr(0, 0x47C + reg, ONES) is True  # bank 31


def test_fill_is_visible_through_bank_msrs() -> None:
    d = filled(INTEL)
    assert d.rdmsr(0, 0x405) == 0xBD000000000000C0  # MSCOD masked
    assert d.rdmsr(0, 0x406) == 0x6000123
    assert d.rdmsr(0, 0x407) == 0x86
    assert d.rdmsr(0, 0x401) == d.rdmsr(0, 0x402) == d.rdmsr(0, 0x403) == 0  # bank 0 empty


def test_legacy_caps_banks_beyond_two() -> None:
    """A guest restored with 9 banks and CTL_P (reference 6.7)."""
    d = dom(INTEL)
    d.restore({0: VmceSave(0x1000109)})
    assert d.rdmsr(0, 0x179) == 0x1000109
    assert d.rdmsr(0, 0x17B) == ONES
    assert d.rdmsr(0, 0x420) == ONES  # bank 8 CTL
    assert d.rdmsr(0, 0x421) == 0
    assert d.wrmsr(0, 0x421, 0) is True
    assert d.wrmsr(0, 0x421, 1) is False  # in range without storage: #GP
    assert d.rdmsr(0, 0x424) == 0  # bank 9: out of range
    assert d.wrmsr(0, 0x425, 1) is True
    assert d.rdmsr(0, 0x288) == 0  # CTL2 bank 8: handled, 0
    assert d.wrmsr(0, 0x288, 0x40000001) is True
    assert d.rdmsr(0, 0x288) == 0
    assert vmce_rdmsr(INTEL, d.vcpus[0], 0x288).outcome is Outcome.HANDLED
    assert vmce_rdmsr(INTEL, d.vcpus[0], 0x289).outcome is Outcome.UNHANDLED


def test_zero_banks_after_zero_byte_record() -> None:
    d = dom(INTEL)
    d.restore({0: VmceSave(0)})
    assert d.rdmsr(0, 0x400) == 0
    assert d.wrmsr(0, 0x401, 5) is True  # everything out of range: RAZ/WI
    assert d.rdmsr(0, 0x280) == 0
    assert d.rdmsr(0, 0x0) == 0  # P5 alias still answers (bank 1 empty)


# -- 3.4 CTL2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0x40000001, 0x7FFF, ONES, 0x8000000000000000])
def test_ctl2_stores_all_64_bits_on_intel(value: int) -> None:
    d = dom(INTEL)
    assert d.wrmsr(1, 0x281, value) is True
    assert d.rdmsr(1, 0x281) == value
    assert d.rdmsr(1, 0x280) == 0
    assert d.wrmsr(1, 0x282, value) is True  # bank 2: out of range, ignored
    assert d.rdmsr(1, 0x282) == 0
    assert d.rdmsr(1, 0x29F) == 0


def test_ctl2_read_zero_for_non_intel_guest_vendor_but_write_stored() -> None:
    d = dom(INTEL, guest_vendor=Vendor.AMD)
    assert d.wrmsr(0, 0x280, 0x40000001) is True
    assert d.vcpus[0].banks[0].ctl2 == 0x40000001
    assert d.rdmsr(0, 0x280) == 0
    assert vmce_rdmsr(INTEL, d.vcpus[0], 0x280, Vendor.AMD).outcome is Outcome.UNHANDLED


@pytest.mark.parametrize("profile", [AMD, CENTAUR, HYGON])
def test_ctl2_raz_wi_on_non_intel_hosts(profile: HostProfile) -> None:
    d = dom(profile)
    assert d.wrmsr(0, 0x281, 0x40000001) is True
    assert d.rdmsr(0, 0x281) == 0
    assert d.vcpus[0].banks[1].ctl2 == 0


# -- 3.5 P5 aliases ----------------------------------------------------------------------


@pytest.mark.parametrize("profile", [INTEL, CENTAUR, HostProfile(Vendor.SHANGHAI)])
def test_p5_aliases_read_bank1(profile: HostProfile) -> None:
    d = filled(profile)
    assert d.rdmsr(0, 0x0) == 0x6000123
    assert d.rdmsr(0, 0x1) == 0xBD000000000000C0
    assert d.wrmsr(0, 0x0, 5) is True
    assert d.wrmsr(0, 0x1, 5) is True
    assert d.rdmsr(0, 0x1) == 0xBD000000000000C0


@pytest.mark.parametrize("profile", [AMD, HYGON, HostProfile(Vendor.UNKNOWN)])
def test_p5_aliases_raz_on_amd(profile: HostProfile) -> None:
    d = filled(profile)
    assert d.rdmsr(0, 0x0) == 0
    assert d.rdmsr(0, 0x1) == 0
    assert d.wrmsr(0, 0x1, 5) is True


# -- 3.6 AMD thresholding; routing -------------------------------------------------------


def test_amd_threshold_msrs() -> None:
    d = dom(AMD)
    v = d.vcpus[0]
    for msr in (0xC0000408, 0xC0000409, 0xC000040A):
        assert vmce_rdmsr(AMD, v, msr) == (Outcome.HANDLED, 0)  # vmce_amd_rdmsr
        assert vmce_wrmsr(AMD, v, msr, 5).outcome is Outcome.HANDLED
        assert d.rdmsr(0, msr) == AMD_THRESHOLD_LOCKED  # current Xen, SVM intercept
        assert d.wrmsr(0, msr, 5) is True
    assert vmce_rdmsr(INTEL, dom(INTEL).vcpus[0], 0xC0000408).outcome is Outcome.UNHANDLED
    with pytest.raises(KeyError):
        dom(INTEL).rdmsr(0, 0xC0000408)


@pytest.mark.parametrize("msr", [0x2, 0x180, 0x189, 0x480, 0x4CF, 0x4D1, 0x2A0])
def test_unrouted_msrs_are_not_answered(msr: int) -> None:
    d = dom(INTEL)
    assert not is_routed(msr)
    assert not d.msr_table.handles(msr)
    with pytest.raises(KeyError):
        d.rdmsr(0, msr)
    with pytest.raises(KeyError):
        d.wrmsr(0, msr, 0)


def test_layer1_outcomes() -> None:
    v = dom(INTEL).vcpus[0]
    assert vmce_rdmsr(INTEL, v, 0x408).outcome is Outcome.UNHANDLED
    assert vmce_rdmsr(INTEL, v, 0x4D0).outcome is Outcome.GP
    assert vmce_wrmsr(INTEL, v, 0x405, 1).outcome is Outcome.GP
    assert vmce_wrmsr(INTEL, v, 0x409, 1).outcome is Outcome.UNHANDLED
    assert vmce_rdmsr(INTEL, v, 0x404) == (Outcome.HANDLED, ONES)
    assert vmce_rdmsr(INTEL, v, 0x180).outcome is Outcome.UNHANDLED  # never vMCE


# -- properties --------------------------------------------------------------------------

routed_msrs = st.sampled_from(sorted(dom(INTEL).msr_table.msrs | dom(AMD).msr_table.msrs))
u64 = st.integers(min_value=0, max_value=ONES)


@given(
    profile=st.sampled_from([INTEL, AMD, CENTAUR]),
    ops=st.lists(st.tuples(st.integers(0, 1), routed_msrs, u64), max_size=60),
)
def test_guest_garbage_keeps_invariants(
    profile: HostProfile, ops: list[tuple[int, int, int]]
) -> None:
    """Whatever a guest writes, MCG_CAP never changes, banks stay zero unless it wrote 0,
    MCi_CTL stays all ones, and every access is answered (value or #GP), never an exception."""
    d = dom(profile)
    if not d.msr_table.handles(0xC0000408) and any(m >= 0xC0000000 for _, m, _ in ops):
        ops = [o for o in ops if o[1] < 0xC0000000]
    cap = d.rdmsr(0, 0x179)
    for vid, msr, value in ops:
        ok = d.wrmsr(vid, msr, value)
        assert ok in (True, False)
        r = d.rdmsr(vid, msr)
        assert r is None or 0 <= r <= ONES
    for v in d.vcpus:
        assert v.mcg_cap == cap
        assert all(b.status == b.addr == b.misc == 0 for b in v.banks)
        assert d.rdmsr(v.id, 0x400) == ONES
