"""``vmce demo``: the seed's design shown side by side with the pre-seed injection."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from vmce.cli.output import console
from vmce.host.memerr import HostBank, HostMca, PhysicalMce
from vmce.host.memory import GuestDomain, HostMemory
from vmce.mca import MCG_STATUS, MCI_STATUS
from vmce.vmce import Domain, HostProfile, InjectionPolicy

BASE_MFN = 0x100000
SRAO_SCRUB = 0xBD000000004000CF


def _model_run(policy: InjectionPolicy, vcpus: int, gfn: int) -> tuple[Domain, str]:
    """One host SRAO memory error on a page of a fresh domain, through the host path."""
    profile = HostProfile.intel()
    mem = HostMemory()
    mem.add_ram(BASE_MFN, 0x10000)
    dom = Domain(profile, vcpus, domid=1, policy=policy)
    mem.add_domain(GuestDomain(dom))
    mem.assign(1, 0, BASE_MFN, 0x10000)
    addr = ((BASE_MFN + gfn) << 12) | 0x40
    report = HostMca(profile, mem).handle(
        PhysicalMce(0, 0x5, (HostBank(8, SRAO_SCRUB, addr, 0x86),))
    )
    return dom, report.banks[0].action


def demo(
    vcpus: Annotated[int, typer.Option(help="vCPUs of the guest", min=1, max=64)] = 4,
) -> None:
    """Show one SRAO memory error delivered with the seed's broadcast and with vCPU0 only."""
    gfn = 0x6000
    console.print(
        f"Host SRAO memory error (MCi_STATUS {SRAO_SCRUB:#x}) on the page backing guest "
        f"gfn {gfn:#x}, {vcpus} vCPUs, Intel host profile.\n"
    )
    for policy, verdict in (
        (
            InjectionPolicy.BROADCAST,
            "every vCPU takes the #MC: a Linux guest's monarch rendezvous completes -> recovers",
        ),
        (
            InjectionPolicy.VCPU0,
            "only vCPU0 takes the #MC: the others never enter the handler -> the guest panics "
            "with 'Timeout: Not all CPUs entered broadcast exception handler'",
        ),
    ):
        dom, action = _model_run(policy, vcpus, gfn)
        table = Table(
            "vCPU",
            "#MC pending",
            "MCG_STATUS",
            "MC1_STATUS",
            "MC1_ADDR",
            title=f"policy {policy.value}: host action: {action}",
        )
        for v in dom.vcpus:
            b = v.banks[1]
            table.add_row(
                str(v.id),
                "yes" if v.mce_pending else "no",
                MCG_STATUS.render(v.mcg_status),
                MCI_STATUS.render(b.status),
                f"{b.addr:#x}",
            )
        console.print(table)
        console.print(f"  -> {verdict}\n")
