"""BSP boot mode: only vCPU 0 starts; an AP runs only after INIT-SIPI-SIPI through the
in-kernel LAPIC (KVM_RUN of a woken AP may return EAGAIN, which the runner retries)."""

from __future__ import annotations

from pathlib import Path

import pytest
from stubbuild import BOOT_INFO, CODE_BASE, RAM_SIZE, build, kernel_stack

from vmce.kvm.abi import MpState
from vmce.kvm.boot import BspBoot
from vmce.kvm.devices.probe import DEFAULT_BASE, DEFAULT_LENGTH, ProbePorts
from vmce.kvm.machine import Machine, MachineConfig
from vmce.kvm.stop import StopKind
from vmce.kvm.vcpu import Vcpu

pytestmark = pytest.mark.kvm
TRAMPOLINE = 0x30000  # SIPI vector 0x30 (below 0x10000 are the VMM boot tables)


def _machine(image: bytes, stub_dir: Path) -> tuple[Machine, ProbePorts]:
    config = MachineConfig(
        boot=BspBoot(CODE_BASE, BOOT_INFO, kernel_stack(0)),
        vcpus=2,
        memory_size=RAM_SIZE,
        irqchip=True,
    )
    machine = Machine(config)
    probe = ProbePorts()
    machine.bus.register(DEFAULT_BASE, DEFAULT_LENGTH, probe, "probe")
    machine.memory.write(CODE_BASE, image)
    machine.memory.write(TRAMPOLINE, build("sipi_ap", stub_dir, TRAMPOLINE))
    return machine, probe


def test_ap_waits_for_sipi_then_runs_the_trampoline(stub_dir: Path) -> None:
    machine, probe = _machine(build("sipi_bsp", stub_dir), stub_dir)
    with machine:
        reason = machine.run(timeout=20)
    assert probe.values(0, vcpu_id=0) == [0xB5]
    assert reason.kind is StopKind.GUEST_EXIT and reason.vcpu_id == 1, reason
    assert reason.exit_code == 0x1234


def test_ap_stays_uninitialized_without_sipi(stub_dir: Path) -> None:
    machine, _ = _machine(b"\xf4\xeb\xfd", stub_dir)  # BSP: hlt; jmp .-1
    with machine:
        machine.start()
        state = machine.submit(1, Vcpu.get_mp_state).result(timeout=10)
        assert state is MpState.UNINITIALIZED
        assert machine.stop_reason is None
