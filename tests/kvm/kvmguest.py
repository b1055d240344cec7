"""A Machine running a test stub, with the probe ports attached (used by the fixtures)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from stubbuild import BOOT_INFO, CODE_BASE, RAM_SIZE, kernel_stack

from vmce.kvm.boot import DirectBoot
from vmce.kvm.devices.probe import DEFAULT_BASE, DEFAULT_LENGTH, ProbePorts
from vmce.kvm.machine import Machine, MachineConfig


class Guest:
    """A Machine running a stub, with the probe ports attached."""

    def __init__(self, machine: Machine, probe_ports: ProbePorts) -> None:
        self.machine = machine
        self.probe = probe_ports

    def values(self, offset: int, vcpu_id: int | None = None) -> list[int]:
        return self.probe.values(offset, vcpu_id)

    def value64(self, offset: int, vcpu_id: int | None = None, nth: int = 0) -> int:
        low = self.values(offset, vcpu_id)[nth]
        high = self.values(offset + 1, vcpu_id)[nth]
        return low | high << 32

    def wait_value(self, offset: int, count: int = 1, timeout: float = 10.0) -> bool:
        return self.probe.wait_for(
            lambda writes: sum(w.offset == offset for w in writes) >= count, timeout
        )


def make_guest(image: bytes, vcpus: int = 1, boot_info: Sequence[int] = (), **kw: Any) -> Guest:
    """A direct-boot Machine with ``image`` at CODE_BASE, ``boot_info`` qwords at BOOT_INFO,
    per-vCPU kernel stacks and the probe ports; ``kw`` are further MachineConfig fields."""
    stacks = [kernel_stack(i) for i in range(vcpus)]
    config = MachineConfig(
        boot=DirectBoot(CODE_BASE, BOOT_INFO, stacks), vcpus=vcpus, memory_size=RAM_SIZE, **kw
    )
    machine = Machine(config)
    try:
        probe_ports = ProbePorts()
        machine.bus.register(DEFAULT_BASE, DEFAULT_LENGTH, probe_ports, "probe")
        machine.memory.write(CODE_BASE, image)
        machine.memory.write(BOOT_INFO, struct.pack(f"<{len(boot_info)}Q", *boot_info))
    except BaseException:
        machine.close()
        raise
    return Guest(machine, probe_ports)
