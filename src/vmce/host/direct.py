"""Direct guest injection: how an mce-inject record lands in the vMCE of one vCPU.

The seed's design fixes the guest's view: two banks, errors always in bank 1, MSCOD masked.
So a record written for any host bank is delivered in guest bank 1, with the record's own
MCG_STATUS; an EXCP record raises #MC on that vCPU, a POLL record only fills the bank (as
CMCI is never injected, the guest finds it when it polls). The other path, through the host's
memory-error handling, is :mod:`vmce.host.memerr`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmce.host.mceinject import Injection, MceRecord, Mode
from vmce.mca.classify import ErrorClass, classify
from vmce.mca.constants import MCI_STATUS_MSCOD_FILTER


@dataclass(frozen=True)
class VcpuLoad:
    """What one vCPU's vMCE gets from one record."""

    vcpu: int
    mcg_status: int
    status: int
    addr: int
    misc: int
    raise_mc: bool
    source_bank: int
    line: int

    @property
    def error_class(self) -> ErrorClass:
        return classify(self.status)


def load_for(cpu: int, record: MceRecord, mode: Mode) -> VcpuLoad:
    """The vMCE load of ``record`` on vCPU ``cpu`` when delivered with ``mode``."""
    return VcpuLoad(
        vcpu=cpu,
        mcg_status=record.mcg_status,
        status=record.status & MCI_STATUS_MSCOD_FILTER,
        addr=record.addr,
        misc=record.misc,
        raise_mc=mode is Mode.EXCP,
        source_bank=record.bank,
        line=record.line,
    )


def plan(injection: Injection) -> list[VcpuLoad]:
    """Every vCPU's load for one resolved injection, the primary first."""
    loads = [load_for(c, r, injection.mode) for c, r in injection.targets]
    loads.sort(key=lambda ld: ld.vcpu != injection.cpu)
    return loads
