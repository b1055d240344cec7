"""Boot modes and their application to fresh vCPUs (boot tables in RAM, entry registers).

* :class:`DirectBoot`: every vCPU starts in 64-bit mode at ``entry`` with RDI = vCPU index,
  RSI = ``boot_info`` and RSP = its own stack; used by test guests, no INIT/SIPI.
* :class:`BspBoot`: only vCPU 0 starts (64-bit mode, RSI = ``boot_info``, kvm-linux.md 4.3);
  the APs stay in the in-kernel LAPIC's wait-for-SIPI state, so an irqchip is required.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmce.kvm.abi import MpState
from vmce.kvm.memory import GuestMemory
from vmce.kvm.vcpu import Vcpu
from vmce.kvm.x86 import longmode
from vmce.kvm.x86.layout import BootLayout


@dataclass(frozen=True)
class DirectBoot:
    """All vCPUs enter 64-bit mode at ``entry``: RDI = index, RSI = ``boot_info``, RSP = stack."""

    entry: int
    boot_info: int
    stacks: Sequence[int]


@dataclass(frozen=True)
class BspBoot:
    """vCPU 0 enters 64-bit mode at ``entry`` with RSI = ``boot_info``; APs wait for SIPI."""

    entry: int
    boot_info: int
    stack: int


def _enter_long_mode(
    vcpu: Vcpu, layout: BootLayout, index: int, nr: int, rip: int, rsp: int, rsi: int
) -> None:
    sregs = vcpu.get_sregs()
    longmode.long_mode_sregs(sregs, layout, index, nr)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(longmode.entry_regs(rip, rsp, rdi=index, rsi=rsi))
    vcpu.set_fpu(longmode.initial_fpu())


def apply_boot(
    memory: GuestMemory,
    vcpus: Sequence[Vcpu],
    boot: DirectBoot | BspBoot,
    layout: BootLayout,
    *,
    irqchip: bool,
) -> None:
    """Write page tables, GDT and TSSes, and set the entry state of the vCPUs that start now."""
    if isinstance(boot, DirectBoot):
        stacks = list(boot.stacks)
        longmode.write_boot_tables(memory, layout, stacks)
        for i, vcpu in enumerate(vcpus):
            _enter_long_mode(vcpu, layout, i, len(vcpus), boot.entry, stacks[i], boot.boot_info)
            if irqchip and i > 0:
                # With an in-kernel LAPIC, APs start UNINITIALIZED (waiting for SIPI).
                vcpu.set_mp_state(MpState.RUNNABLE)
        return
    longmode.write_boot_tables(memory, layout, [boot.stack])
    _enter_long_mode(vcpus[0], layout, 0, 1, boot.entry, boot.stack, boot.boot_info)
