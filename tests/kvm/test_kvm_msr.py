"""Filtered RDMSR/WRMSR answered by a Python MsrHandler (stub guests/stubs/msr.s)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kvmguest import Guest

from vmce.kvm.stop import StopKind
from vmce.kvm.vm import MsrRange

pytestmark = pytest.mark.kvm


class FakeMsrs:
    """MCG_CAP is fixed, MCG_STATUS is read/write, everything else #GPs; calls are logged."""

    def __init__(self) -> None:
        self.status = 0
        self.log: list[tuple[str, int, int, int]] = []

    def rdmsr(self, vcpu_id: int, index: int) -> int | None:
        value = {0x179: 0xBE00000000800400, 0x17A: self.status}.get(index)
        self.log.append(("rd", vcpu_id, index, -1 if value is None else value))
        return value

    def wrmsr(self, vcpu_id: int, index: int, value: int) -> bool:
        self.log.append(("wr", vcpu_id, index, value))
        if index == 0x17A:
            self.status = value
            return True
        return False


MCA_RANGES = (MsrRange(0x179, 3), MsrRange(0x400, 0x80))


def test_guest_sees_handler_values_and_gp(guest: Callable[..., Guest]) -> None:
    msrs = FakeMsrs()
    g = guest("msr", msr_handler=msrs, filtered_msrs=MCA_RANGES)
    reason = g.machine.run(timeout=20)
    assert reason.kind is StopKind.GUEST_EXIT and reason.exit_code == 0, reason
    # rdmsr 0x179 -> EDX:EAX as answered
    assert g.values(0) == [0x00800400] and g.values(1) == [0xBE000000]
    # wrmsr 0x17a = 0x5_deadbeef, then read back through the handler
    assert g.values(2) == [0xDEADBEEF] and g.values(3) == [0x5]
    assert ("wr", 0, 0x17A, 0x5DEADBEEF) in msrs.log
    # rdmsr 0x401 -> None -> #GP(0) at the rdmsr itself; wrmsr 0x402 -> False -> #GP(0)
    assert g.values(8) == [0, 0]
    assert g.values(9)[0] == g.values(10)[0]
    assert g.values(4) == [0x4444] and g.values(5) == [0x5555]
    assert [e[:3] for e in msrs.log] == [
        ("rd", 0, 0x179),
        ("wr", 0, 0x17A),
        ("rd", 0, 0x17A),
        ("rd", 0, 0x401),
        ("wr", 0, 0x402),
    ]
    counts = g.machine.exit_counts[0]
    assert counts["X86_RDMSR"] == 3 and counts["X86_WRMSR"] == 2


def test_unfiltered_msrs_stay_in_the_kernel(guest: Callable[..., Guest]) -> None:
    # Without a filter KVM answers MCG_CAP itself (0x20: 32 banks, kvm-linux.md 1.5) and
    # the bank writes succeed (MCi_STATUS=... is refused by KVM, so only check no exits).
    msrs = FakeMsrs()
    g = guest("msr", msr_handler=msrs)
    g.machine.run(timeout=20)
    assert msrs.log == []
    assert g.values(0) == [0x20]


def test_handler_exception_stops_the_vm_not_the_process(guest: Callable[..., Guest]) -> None:
    class Broken(FakeMsrs):
        def rdmsr(self, vcpu_id: int, index: int) -> int | None:
            raise RuntimeError("model bug")

    g = guest("msr", msr_handler=Broken(), filtered_msrs=MCA_RANGES)
    reason = g.machine.run(timeout=20)
    assert reason.kind is StopKind.VMM_ERROR
    assert "model bug" in reason.message and reason.vcpu_id == 0
