"""Shutdown, pause/resume, kvm_pvm fix-ups, stop reasons, and create/destroy without leaks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from excstub import MARK_AFTER_INT3, Mode, Off, UserAction, boot_info, user_counter
from kvmguest import Guest

from vmce.kvm.pvm import FixupKind, host_is_pvm
from vmce.kvm.runner import RunnerState
from vmce.kvm.stop import StopKind

pytestmark = pytest.mark.kvm


def test_requested_shutdown_is_reported(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.SPIN0))
    assert g.machine.vm is not None and g.machine.vm.triple_fault_event
    g.machine.start()
    assert g.wait_value(Off.HEARTBEAT)
    g.machine.request_shutdown(0, "MCIP already set")
    reason = g.machine.wait(timeout=10)
    assert reason is not None and reason.kind is StopKind.SHUTDOWN_REQUESTED, reason
    assert "MCIP already set" in reason.message and reason.vcpu_id == 0


def test_requested_shutdown_of_a_halted_vcpu(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.HALT))
    g.machine.start()
    assert g.machine.runners[0].wait_state({RunnerState.HALTED}, timeout=10)
    g.machine.request_shutdown(0, "CR4.MCE clear")
    reason = g.machine.wait(timeout=10)
    assert reason is not None and reason.kind is StopKind.SHUTDOWN_REQUESTED, reason


def test_guest_triple_fault_is_reported(guest: Callable[..., Guest]) -> None:
    g = guest("triple")
    reason = g.machine.run(timeout=10)
    assert reason.kind is StopKind.SHUTDOWN, reason
    assert "triple fault" in reason.message and reason.rip == 0x100000


def test_pause_and_resume(guest: Callable[..., Guest]) -> None:
    g = guest("exc", vcpus=2, boot_info=boot_info(Mode.SPIN0))
    g.machine.start()

    def beats(vcpu_id: int) -> int:
        return len(g.values(Off.HEARTBEAT, vcpu_id))

    assert g.probe.wait_for(lambda ws: beats(0) > 0 and beats(1) > 0, 10)
    assert g.machine.pause(timeout=10)
    assert all(r.state is RunnerState.PARKED for r in g.machine.runners)
    before = (beats(0), beats(1))
    # Requests still run on a parked vCPU's thread.
    assert g.machine.submit(1, lambda vcpu: vcpu.vcpu_id).result(timeout=10) == 1
    assert not g.probe.wait_for(lambda ws: (beats(0), beats(1)) != before, 0.2)
    g.machine.resume()
    assert g.probe.wait_for(lambda ws: beats(0) > before[0] and beats(1) > before[1], 10)
    g.machine.stop()
    assert g.machine.wait(10) is not None


def test_stop_kicks_a_vcpu_running_natively_at_cpl3(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.USER, UserAction.SPIN))
    g.machine.start()
    deadline = time.monotonic() + 10
    while g.machine.memory.read_u64(user_counter(0)) == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    g.machine.stop("enough")
    assert all(r.join(5) for r in g.machine.runners)
    assert g.machine.stop_reason is not None and g.machine.stop_reason.message == "enough"


def test_int3_at_cpl0(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.INT3, resume=True))
    reason = g.machine.run(timeout=10)
    assert reason.kind is StopKind.GUEST_EXIT and reason.exit_code == 0, reason
    assert g.values(Off.VECTOR) == [3] and g.values(Off.CS) == [0x10]
    assert g.values(Off.MARKER) == [MARK_AFTER_INT3]
    if host_is_pvm():
        assert g.machine.fixups.counts[FixupKind.INT3] == 1


def test_emulation_failure_is_reported_in_words(guest: Callable[..., Guest]) -> None:
    g = guest("exc", boot_info=boot_info(Mode.INT80_CPL0))
    reason = g.machine.run(timeout=10)
    if not host_is_pvm():  # real VMX/SVM run `int $0x80` at CPL0 natively
        assert reason.exit_code == 0x180, reason
        return
    assert reason.kind is StopKind.EMULATION_FAILURE, reason
    assert "instruction emulator" in reason.message and "cd 80" in reason.message


def _resources() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    maps = len(Path("/proc/self/maps").read_text().splitlines())
    return fds, threading.active_count(), maps


def test_create_destroy_does_not_leak(guest: Callable[..., Guest]) -> None:
    def cycle() -> None:
        g = guest("exc", vcpus=2, boot_info=boot_info(Mode.HALT))
        with g.machine:
            g.machine.start()
            assert g.probe.wait_for(lambda ws: len(ws) == 2, 10)
            g.machine.stop()

    cycle()  # warm-up: thread-stack caches, lazily created objects
    before = _resources()
    for _ in range(50):
        cycle()
    assert _resources() == before


def test_machine_close_is_idempotent_and_unstarted_close_works(
    guest: Callable[..., Guest],
) -> None:
    g = guest("exc", boot_info=boot_info(Mode.HALT))
    g.machine.close()
    g.machine.close()
    assert g.machine.stop_reason is not None
    assert g.machine.stop_reason.kind is StopKind.HOST_STOP
