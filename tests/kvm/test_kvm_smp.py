"""Direct boot of 4 vCPUs, each printing its index through the 16550A (smp_hello.s)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kvmguest import Guest

from vmce.kvm.stop import StopKind

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "irqchip"])
def test_four_vcpus_print_their_index(guest: Callable[..., Guest], irqchip: bool) -> None:
    lines: list[str] = []
    g = guest("smp_hello", vcpus=4, boot_info=[4], irqchip=irqchip, on_serial_line=lines.append)
    reason = g.machine.run(timeout=30)
    assert reason.kind is StopKind.GUEST_EXIT and reason.exit_code == 0, reason
    assert sorted(lines) == [f"hello from vCPU {i}" for i in range(4)]
    assert g.machine.serial is not None and g.machine.serial.lines == lines
    if not irqchip:
        # vCPUs 1-3 halted after printing; HLT exits are handled in user space.
        assert all(g.machine.exit_counts[i]["HLT"] >= 1 for i in (1, 2, 3))
