"""Fill, inject and deliver: every case of reference section 4, plus the two policies."""

from __future__ import annotations

import errno

import pytest

from vmce.vmce import (
    BROADCAST,
    DOMID_INVALID,
    BankRecord,
    Domain,
    HostProfile,
    InjectionPolicy,
)

SRAO = BankRecord(0xBD000000123400C0, 0x6000000, 0x86)


def dom(n: int = 4, **kw: object) -> Domain:
    return Domain(HostProfile.intel(lmce=True), n, **kw)  # type: ignore[arg-type]


def test_broadcast_fill() -> None:
    d = dom(4)
    r = d.fill(SRAO, 0x5 | 0x8, BROADCAST)  # LMCE stripped when broadcast
    assert r.ok and r.primary == 0 and r.filled == (0, 1, 2, 3)
    v0 = d.vcpus[0]
    assert v0.mcg_status == 0x5
    assert (v0.banks[1].status, v0.banks[1].addr, v0.banks[1].misc) == (
        0xBD000000000000C0,
        0x6000000,
        0x86,
    )
    for v in d.vcpus[1:]:
        assert v.mcg_status == 0x5
        assert v.banks[1].status == v.banks[1].addr == v.banks[1].misc == 0
    for v in d.vcpus:
        assert v.banks[0].status == 0  # bank 0 never used


def test_fill_keeps_ctl2_and_bank0() -> None:
    d = dom(2)
    d.wrmsr(0, 0x280, 7)
    d.wrmsr(0, 0x281, 9)
    d.fill(SRAO, 0x7)
    assert d.vcpus[0].banks[0].ctl2 == 7 and d.vcpus[0].banks[1].ctl2 == 9
    assert d.vcpus[0].mcg_status == 0x7  # host gstatus kept (EIPV too)


def test_fill_busy_vcpu_still_fills_others() -> None:
    d = dom(3)
    d.vcpus[0].mcg_status = 0x4  # vCPU0 still in its handler
    r = d.fill(SRAO, 0x5)
    assert r.rc == -errno.EBUSY and r.busy == (0,) and r.filled == (1, 2)
    assert d.vcpus[0].banks[1].status == 0  # untouched
    assert d.vcpus[1].mcg_status == 0x5


def test_fill_later_success_does_not_clear_error() -> None:
    d = dom(4)
    d.vcpus[1].mcg_status = 0x4
    assert d.fill(SRAO, 0x5).rc == -errno.EBUSY


def test_fill_invalid_domid() -> None:
    d = dom(2)
    r = d.fill(BankRecord(SRAO.status, SRAO.addr, SRAO.misc, DOMID_INVALID), 0x5)
    assert r.rc == -errno.EINVAL
    assert all(v.mcg_status == 0 for v in d.vcpus)


def test_fill_lmce_targets_one_vcpu_and_keeps_lmce() -> None:
    d = dom(4)
    r = d.fill(SRAO, 0xD, target=2)
    assert r.primary == 2 and r.filled == (2,)
    assert d.vcpus[2].mcg_status == 0xD
    assert d.vcpus[2].banks[1].status == 0xBD000000000000C0
    assert all(d.vcpus[i].mcg_status == 0 for i in (0, 1, 3))


def test_fill_single_target_without_lmce_writes_vcpu0() -> None:
    """Pitfall 6: non-broadcast fill without LMCE fills vCPU0, not the target."""
    d = dom(4)
    r = d.fill(SRAO, 0x5, target=2)
    assert r.primary == 0
    assert d.vcpus[0].mcg_status == 0x5 and d.vcpus[2].mcg_status == 0


def test_inject_broadcast_all() -> None:
    d = dom(4)
    kicked: list[int] = []
    d.on_pending.append(kicked.append)
    r = d.inject(BROADCAST)
    assert r.rc == 0 and r.pending == (0, 1, 2, 3)
    assert kicked == [0, 1, 2, 3]
    assert all(v.mce_pending for v in d.vcpus)


def test_inject_skips_uninitialised() -> None:
    d = dom(4)
    d.vcpus[1].initialised = d.vcpus[3].initialised = False
    r = d.inject()
    assert r.rc == 0 and r.pending == (0, 2) and r.skipped == (1, 3)


def test_inject_no_initialised_vcpu_is_esrch() -> None:
    d = dom(2)
    for v in d.vcpus:
        v.initialised = False
    assert d.inject().rc == -errno.ESRCH


def test_inject_stops_at_first_pending_without_rollback() -> None:
    d = dom(4)
    d.vcpus[2].mce_pending = True
    r = d.inject()
    assert r.rc == -errno.EBUSY and r.busy_at == 2 and r.pending == (0, 1)
    assert d.vcpus[0].mce_pending and d.vcpus[1].mce_pending
    assert not d.vcpus[3].mce_pending


@pytest.mark.parametrize(
    ("target", "setup", "rc"),
    [
        (7, None, -errno.ESRCH),
        (1, "uninit", -errno.ESRCH),
        (1, "pending", -errno.EBUSY),
        (1, None, 0),
    ],
)
def test_inject_single_target(target: int, setup: str | None, rc: int) -> None:
    d = dom(2)
    if setup == "uninit":
        d.vcpus[1].initialised = False
    if setup == "pending":
        d.vcpus[1].mce_pending = True
    r = d.inject(target)
    assert r.rc == rc
    if rc == 0:
        assert r.pending == (1,) and not d.vcpus[0].mce_pending


def test_take_pending_acknowledges_once() -> None:
    d = dom(1)
    d.inject()
    assert d.vcpus[0].take_pending() is True
    assert d.vcpus[0].take_pending() is False


def test_deliver_broadcast_then_mcip_busy_crashes() -> None:
    d = dom(2)
    crashes: list[str] = []
    d.on_crash.append(lambda c: crashes.append(c.reason))
    first = d.deliver(SRAO, 0x5)
    assert first.ok and first.inject is not None and first.inject.pending == (0, 1)
    for v in d.vcpus:
        v.take_pending()
    second = d.deliver(SRAO, 0x5)  # the guest never cleared MCIP
    assert not second.ok and second.crash is not None
    assert "MCIP" in second.crash.reason and second.crash.code == 3
    assert d.crashed is not None and len(crashes) == 1


def test_deliver_after_guest_handled_succeeds() -> None:
    d = dom(2)
    assert d.deliver(SRAO, 0x5).ok
    for v in d.vcpus:
        v.take_pending()
        d.wrmsr(v.id, 0x405, 0)
        d.wrmsr(v.id, 0x17A, 0)  # the guest's handler clears MCIP
    assert d.deliver(SRAO, 0x5).ok


def test_never_started_vcpu_crashes_the_second_broadcast() -> None:
    """Pitfall 5: filled but not injected, so MCIP stays and the next fill is busy."""
    d = dom(3)
    d.vcpus[2].initialised = False
    assert d.deliver(SRAO, 0x5).ok
    for v in d.vcpus[:2]:
        v.take_pending()
        d.wrmsr(v.id, 0x17A, 0)
    r = d.deliver(SRAO, 0x5)
    assert not r.ok and r.fill.busy == (2,)


def test_pending_not_delivered_makes_inject_busy() -> None:
    d = dom(2)
    assert d.deliver(SRAO, 0x5).ok
    for v in d.vcpus:
        d.wrmsr(v.id, 0x17A, 0)  # MCIP cleared, but the #MC was never taken
    r = d.deliver(SRAO, 0x5)
    assert not r.ok and r.inject is not None and r.inject.busy_at == 0
    assert "already has a #MC pending" in r.describe()


def test_vcpu0_policy_reproduces_pre_seed_injection() -> None:
    d = dom(4, policy=InjectionPolicy.VCPU0)
    r = d.deliver(SRAO, 0x5 | 0x8, target=BROADCAST)
    assert r.ok and r.target == 0 and r.inject is not None and r.inject.pending == (0,)
    assert d.vcpus[0].mcg_status == 0x5
    assert d.vcpus[0].banks[1].status == 0xBD000000000000C0
    assert all(v.mcg_status == 0 and not v.mce_pending for v in d.vcpus[1:])


def test_set_mca_cap_rules() -> None:
    d = dom(2)
    assert d.set_mca_cap(2) == -errno.EINVAL
    assert d.set_mca_cap(0) == 0
    assert d.set_mca_cap(1) == 0
    assert all(v.mcg_cap == 0x9000C02 for v in d.vcpus)
    assert d.set_mca_cap(1) == 0
    assert d.set_mca_cap(0) == -errno.EEXIST
    no_lmce = Domain(HostProfile.intel(), 1)
    assert no_lmce.set_mca_cap(1) == -errno.EINVAL
    assert no_lmce.vcpus[0].mcg_cap == 0x1000C02


def test_domain_needs_vcpus() -> None:
    with pytest.raises(ValueError):
        Domain(HostProfile.intel(), 0)
