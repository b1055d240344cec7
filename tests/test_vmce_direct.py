"""Direct guest injection in the model: all or nothing, bank 1, QEMU's merge rules."""

from __future__ import annotations

import threading

from vmce.vmce import BankRecord, Domain, HostProfile
from vmce.vmce.direct import BankLoad, Merge, busy_vcpus, load_banks

SRAO = 0xBD000000000000C0


def dom(n: int = 4) -> tuple[Domain, list[int]]:
    d = Domain(HostProfile.intel(), n)
    kicked: list[int] = []
    d.on_pending.append(kicked.append)
    return d, kicked


def test_load_into_chosen_vcpus_bank1_with_mscod_masked() -> None:
    d, kicked = dom()
    r = load_banks(
        d,
        [BankLoad(2, 0xBD000000123400C0, 0x3000, 0x86, 0x5), BankLoad(3, 0xA << 60, 0, 0, 0x5)],
    )
    assert r.ok and r.pending == (2, 3) and kicked == [2, 3]
    v2 = d.vcpus[2]
    assert v2.banks[1].status == SRAO and v2.banks[1].addr == 0x3000 and v2.banks[1].misc == 0x86
    assert v2.mcg_status == 0x5 and v2.mce_pending
    assert d.vcpus[3].banks[1].status == 0xA << 60
    assert d.vcpus[0].banks[1].status == 0 and not d.vcpus[0].mce_pending
    assert all(v.banks[0].status == 0 for v in d.vcpus)


def test_busy_target_refuses_everything() -> None:
    d, kicked = dom()
    d.vcpus[1].mcg_status = 0x4  # MCIP: the guest has not finished
    before = d.snapshot()
    r = load_banks(d, [BankLoad(0, SRAO, 1, 2, 0x5), BankLoad(1, SRAO, 1, 2, 0x5)])
    assert not r.ok and r.busy == (1,) and "vCPU 1" in r.reason
    assert d.snapshot() == before and kicked == []
    d.vcpus[1].mcg_status = 0
    d.vcpus[2].mce_pending = True
    assert not load_banks(d, [BankLoad(2, SRAO, mcg_status=5)]).ok
    assert busy_vcpus(d) == (2,)


def test_invalid_requests_change_nothing() -> None:
    d, kicked = dom(2)
    before = d.snapshot()
    for loads, word in (
        ([], "no vCPU"),
        ([BankLoad(5, SRAO)], "does not exist"),
        ([BankLoad(0, SRAO), BankLoad(0, SRAO)], "twice"),
        ([BankLoad(1, 1 << 64)], "64 bits"),
    ):
        r = load_banks(d, loads)
        assert not r.ok and word in r.reason
    d.crash("test")
    assert "crashed" in load_banks(d, [BankLoad(0, SRAO)]).reason
    assert d.snapshot() == before and kicked == []


def test_poll_load_keeps_mcg_status_and_raises_nothing() -> None:
    d, kicked = dom(2)
    d.vcpus[0].mcg_status = 0x1
    r = load_banks(d, [BankLoad(0, 0x9C000000000000C0, 0x1000, 0x86, None, raise_mc=False)])
    assert r.ok and r.pending == () and kicked == []
    assert d.vcpus[0].mcg_status == 0x1 and d.vcpus[0].banks[1].status == 0x9C000000000000C0


def test_qemu_merge_rules() -> None:
    d, _ = dom(1)
    b = d.vcpus[0].banks[1]

    def load(status: int, addr: int) -> None:
        d.vcpus[0].mce_pending = False
        d.vcpus[0].mcg_status = 0
        assert load_banks(d, [BankLoad(0, status, addr, 0, None, False, Merge.QEMU)]).ok

    ce, uc = 0x9C000000000000C0, SRAO
    load(ce, 1)
    assert (b.status, b.addr) == (ce, 1)  # empty bank: written
    load(ce, 2)
    assert (b.status, b.addr) == (ce | 1 << 62, 2)  # over a CE: written, OVER
    b.status = 0
    load(uc, 3)
    load(ce, 4)
    assert (b.status, b.addr) == (uc | 1 << 62, 3)  # CE over a UC: only OVER
    load(uc, 5)
    assert (b.status, b.addr) == (uc | 1 << 62, 5)  # UC over a valid bank: written, OVER
    d.vcpus[0].mcg_status = 0
    d.vcpus[0].mce_pending = False
    assert load_banks(d, [BankLoad(0, uc, 6, 0, 5, True, Merge.REPLACE)]).ok
    assert b.status == uc  # REPLACE: no OVER


def test_load_and_host_fill_never_interleave() -> None:
    """Direct loads and Xen's deliver from two threads: every vCPU ends consistent (a load
    is never half-applied, and each accepted operation left the vCPU busy)."""
    d = Domain(HostProfile.intel(), 4)
    results: list[bool] = []

    def direct() -> None:
        for _ in range(200):
            results.append(load_banks(d, [BankLoad(v, SRAO, 1, 2, 5) for v in range(4)]).ok)

    def host() -> None:
        for _ in range(200):
            d.fill(BankRecord(SRAO, 7, 8), 5)

    ts = [threading.Thread(target=direct), threading.Thread(target=host)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results.count(True) <= 1
    banks = {(v.banks[1].addr, v.banks[1].misc) for v in d.vcpus}
    assert banks in ({(1, 2)}, {(7, 8), (0, 0)}, {(0, 0)})
