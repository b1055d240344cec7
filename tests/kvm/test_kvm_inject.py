"""Exception injection (vector 18, #MC) through Machine.inject_exception (stub exc.s)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from excstub import MARK_ENTER_USER, Mode, Off, UserAction, boot_info, user_counter
from kvmguest import Guest
from stubbuild import kernel_stack

from vmce.kvm.abi import MpState
from vmce.kvm.runner import RunnerState
from vmce.kvm.stop import StopKind
from vmce.kvm.vcpu import Vcpu

pytestmark = pytest.mark.kvm
MC = 18


def _assert_mc_report(g: Guest, cs: int, vcpu_id: int = 0) -> None:
    assert g.values(Off.VECTOR, vcpu_id) == [MC]
    assert g.values(Off.CS, vcpu_id) == [cs]
    assert g.values(Off.HANDLER_CS, vcpu_id) == [0x10]


def test_mc_into_halted_vcpu_without_irqchip(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.HALT))
    g.machine.start()
    runner = g.machine.runners[0]
    assert g.wait_value(Off.READY)
    assert runner.wait_state({RunnerState.HALTED}, timeout=10)
    injection = g.machine.inject_exception(0, MC).result(timeout=10)
    assert injection.accepted and injection.woke_halted, injection
    reason = g.machine.wait(timeout=10)
    assert reason is not None and reason.exit_code == 0x100 + MC, reason
    _assert_mc_report(g, cs=0x10)


def test_mc_into_halted_vcpu_with_irqchip(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.HALT), irqchip=True)
    g.machine.start()
    assert g.wait_value(Off.READY)
    deadline = time.monotonic() + 10
    state = MpState.RUNNABLE
    while state is not MpState.HALTED and time.monotonic() < deadline:
        # Each request kicks the vCPU out of the in-kernel halt and reads its MP state.
        state = g.machine.submit(0, Vcpu.get_mp_state).result(timeout=10)
    assert state is MpState.HALTED
    injection = g.machine.inject_exception(0, MC).result(timeout=10)
    assert injection.accepted and injection.woke_halted, injection
    reason = g.machine.wait(timeout=10)
    assert reason is not None and reason.exit_code == 0x100 + MC, reason
    _assert_mc_report(g, cs=0x10)


def test_mc_into_vcpu_spinning_at_cpl0(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.SPIN0))
    g.machine.start()
    assert g.wait_value(Off.HEARTBEAT)
    injection = g.machine.inject_exception(0, MC).result(timeout=10)
    assert injection.accepted and not injection.woke_halted
    reason = g.machine.wait(timeout=10)
    assert reason is not None and reason.exit_code == 0x100 + MC, reason
    _assert_mc_report(g, cs=0x10)


def test_mc_into_vcpu_at_cpl3_switches_to_rsp0(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.USER, UserAction.SPIN))
    g.machine.start()
    assert g.wait_value(Off.MARKER)
    assert g.values(Off.MARKER) == [MARK_ENTER_USER]
    deadline = time.monotonic() + 10
    while g.machine.memory.read_u64(user_counter(0)) == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # CPL3 code cannot signal the VMM (no port I/O there under kvm_pvm)
    assert g.machine.memory.read_u64(user_counter(0)) > 0
    assert g.machine.inject_exception(0, MC).result(timeout=10).accepted
    reason = g.machine.wait(timeout=10)
    assert reason is not None and reason.exit_code == 0x100 + MC, reason
    _assert_mc_report(g, cs=0x33)
    assert g.values(Off.SS) == [0x2B]
    assert g.values(Off.FRAME_TOP)[0] == kernel_stack(0)  # TSS.RSP0


def test_second_exception_is_refused_while_one_is_pending(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.SPIN0))
    g.machine.start()
    assert g.wait_value(Off.HEARTBEAT)
    assert g.machine.pause(timeout=10)
    first = g.machine.inject_exception(0, MC).result(timeout=10)
    second = g.machine.inject_exception(0, 13).result(timeout=10)
    assert first.accepted
    assert not second.accepted and "exception 18 already" in second.detail
    g.machine.resume()
    reason = g.machine.wait(timeout=10)
    assert reason is not None and reason.exit_code == 0x100 + MC
    assert g.values(Off.VECTOR) == [MC]


def test_broadcast_to_two_spinning_vcpus(guest: Callable[..., Guest]) -> None:
    g = guest("exc", vcpus=2, boot_info=boot_info(Mode.SPIN0, resume=True))
    g.machine.start()
    assert g.probe.wait_for(
        lambda ws: {w.vcpu_id for w in ws if w.offset == Off.HEARTBEAT} == {0, 1}, 10
    )
    futures = [g.machine.inject_exception(i, MC) for i in (0, 1)]
    assert all(f.result(timeout=10).accepted for f in futures)
    assert g.probe.wait_for(
        lambda ws: {w.vcpu_id for w in ws if w.offset == Off.VECTOR} == {0, 1}, 10
    )
    assert g.values(Off.VECTOR, 0) == [MC] and g.values(Off.VECTOR, 1) == [MC]
    g.machine.stop("test done")
    assert g.machine.wait(timeout=10) is not None
    assert g.machine.stop_reason is not None
    assert g.machine.stop_reason.kind is StopKind.HOST_STOP


def test_invalid_vectors_are_rejected_at_once(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.HALT))
    with pytest.raises(ValueError, match="NMI"):
        g.machine.inject_exception(0, 2)
    with pytest.raises(ValueError):
        g.machine.inject_exception(0, 32)
