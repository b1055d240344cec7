"""What guest CPL3 code can do and how control returns to CPL0 (exc.s, experiment (i)/(iv)).

The expectations differ between kvm_pvm (this project's host, see docs/kvm-notes.md) and a host
with real VMX/SVM (architectural behaviour).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from excstub import USER_TSC, Mode, Off, UserAction, boot_info
from kvmguest import Guest
from stubbuild import kernel_stack

from vmce.kvm.pvm import host_is_pvm

pytestmark = pytest.mark.kvm
PVM = host_is_pvm()
UD, GP, PF, BP = 6, 13, 14, 3

# action -> (vector on kvm_pvm, vector on VMX/SVM) reported by the CPL0 handler
EXPECTED = {
    UserAction.INT80: (UD, 0x80),
    UserAction.INT81: (UD, 0x81),
    UserAction.HLT: (GP, GP),
    UserAction.CLI: (GP, GP),
    UserAction.UD2: (UD, UD),
    UserAction.OUT_IOPL0: (GP, GP),
    UserAction.OUT_IOPL3: (GP, 0x80),
    UserAction.PAGE_FAULT: (PF, PF),
    UserAction.INT3: (BP, BP),
}


@pytest.mark.parametrize("action", list(EXPECTED), ids=lambda a: a.name)
def test_return_to_cpl0(guest: Callable[..., Guest], action: UserAction) -> None:
    g = guest("exc", boot_info=boot_info(Mode.USER, action))
    reason = g.machine.run(timeout=10)
    vector = EXPECTED[action][0 if PVM else 1]
    assert reason.exit_code == 0x100 + vector, reason
    assert g.values(Off.CS) == [0x33] and g.values(Off.SS) == [0x2B]
    assert g.values(Off.HANDLER_CS) == [0x10]
    assert g.values(Off.FRAME_TOP) == [kernel_stack(0) & 0xFFFFFFFF]
    if action is UserAction.PAGE_FAULT:
        assert g.value64(Off.CR2) == 0x200000000 and g.values(Off.ERROR_CODE) == [4]
    if action is UserAction.OUT_IOPL3:
        assert g.values(Off.USER_DATA) == ([] if PVM else [0x5555])


def test_lapic_timer_interrupts_cpl3(guest: Callable[..., Guest]) -> None:
    info = boot_info(Mode.USER, UserAction.TIMER, timer=20_000_000)
    g = guest("exc", boot_info=info, irqchip=True)
    reason = g.machine.run(timeout=10)
    assert reason.exit_code == 0x140, reason
    assert g.values(Off.CS) == [0x33] and g.values(Off.RFLAGS)[0] & 0x200


def test_syscall_from_cpl3(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.USER, UserAction.SYSCALL))
    reason = g.machine.run(timeout=10)
    if PVM:
        # The SYSCALL target runs, but still at CPL3: its OUT faults (#GP, CS 0x33).
        assert reason.exit_code == 0x100 + GP and g.values(Off.CS) == [0x33], reason
    else:
        assert reason.exit_code == 0x200 and g.values(Off.SYSCALL_CS) == [0x10], reason


def test_rdtsc_at_cpl0_and_cpl3(guest: Callable[..., Guest]) -> None:
    g0 = guest("exc", boot_info=boot_info(Mode.RDTSC0))
    g0.machine.run(timeout=10)
    assert 0 < g0.value64(Off.TSC0) < g0.value64(Off.TSC1)
    g3 = guest("exc", boot_info=boot_info(Mode.USER, UserAction.RDTSC))
    assert g3.machine.run(timeout=10).exit_code == 0x100 + UD  # the ud2 after the rdtscs
    first, second = g3.machine.memory.read_u64(USER_TSC), g3.machine.memory.read_u64(USER_TSC + 8)
    assert 0 < first < second
