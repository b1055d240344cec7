"""``vmce demo``: the seed's design on real vCPUs, side by side with what came before it.

Three guests of the vmce test kernel, one after the other (4 vCPUs, Intel profile):

1. the seed's broadcast (patch 4): an SRAO memory error reaches every vCPU; the guest's
   monarch rendezvous completes and it recovers;
2. the pre-seed injection (vCPU0 only): the other vCPUs never enter the handler; the guest
   panics on Linux's rendezvous timeout;
3. seed point 6: a guest that never set CR4.MCE gets the #MC anyway and goes down (a CPU
   shutdown); the VMM reports it and carries on.

Without a usable /dev/kvm it shows the same three cases on the model alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmce.cli.output import console, emit_json, err_console, fail
from vmce.guest.testguest import Flags, GuestConfig, GuestTimeout, TestGuest, Work
from vmce.guest.verdict import Outcome, Verdict, decide
from vmce.host.catalog import lookup
from vmce.host.memerr import HostBank, HostMca, PhysicalMce
from vmce.host.memory import GuestDomain, HostMemory
from vmce.kvm.stop import StopReason
from vmce.kvm.system import probe
from vmce.mca import MCG_STATUS, MCI_STATUS
from vmce.vmce import Domain, HostProfile, InjectionPolicy

ADDR = 0x3000000


@dataclass(frozen=True)
class Scenario:
    title: str
    policy: InjectionPolicy
    flags: Flags
    expect: Outcome
    meaning: str


SCENARIOS = (
    Scenario(
        "seed: broadcast #MC",
        InjectionPolicy.BROADCAST,
        Flags.NONE,
        Outcome.RECOVERED,
        "every vCPU takes the #MC, the rendezvous completes, the page is offlined",
    ),
    Scenario(
        "pre-seed: vCPU0 only",
        InjectionPolicy.VCPU0,
        Flags.NONE,
        Outcome.PANIC,
        "only vCPU0 takes the #MC; the others never arrive",
    ),
    Scenario(
        "seed point 6: CR4.MCE clear",
        InjectionPolicy.BROADCAST,
        Flags.NO_CR4_MCE,
        Outcome.SHUTDOWN,
        "no readiness check: injected anyway; the guest goes down",
    ),
)


@dataclass
class Story:
    scenario: Scenario
    verdict: Verdict
    lines: list[str]
    boot_s: float
    reaction_s: float


def _story_lines(g: TestGuest) -> list[str]:
    out = []
    for e in g.events:
        if e.kind == "mce-enter":
            ctx = e.str("ctx")
            out.append(f"vCPU{e.int('cpu')} enters #MC handler ({ctx})")
        elif e.kind == "memory-failure":
            out.append(f"page {e.int('pfn'):#x} offlined: {e.str('result')}")
    for ln in g.lines:
        if ln.startswith(("mce: CPUs not responding", "Kernel panic")):
            out.append(ln)
    return out


def _settle(g: TestGuest, timeout: float) -> StopReason | None:
    """Wait until the guest recovered, panicked or stopped (then a moment for its last lines)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stop = g.vm.wait(0.02)
        if stop is not None:
            return stop
        if any(e.kind in ("memory-failure", "panic") for e in g.events):
            return g.vm.wait(0.2)
    return None


def _run_one(s: Scenario, vcpus: int, progress: Progress) -> Story:
    task = progress.add_task(f"{s.title}: booting {vcpus} vCPUs", total=None)
    cfg = GuestConfig(
        ncpus=vcpus,
        work=[Work.KERNEL, Work.USER, Work.IDLE, Work.USER][:vcpus]
        + [Work.USER] * max(0, vcpus - 4),
        flags=s.flags,
    )
    with TestGuest(cfg, policy=s.policy) as g:
        t0 = time.monotonic()
        try:
            g.boot()
        except GuestTimeout as e:
            fail(f"{s.title}: the test guest did not boot: {e}")
        boot = time.monotonic() - t0
        progress.update(task, description=f"{s.title}: injecting an SRAO memory error")
        time.sleep(0.2)
        err = lookup("srao")
        t1 = time.monotonic()
        g.vm.inject(err.record(ADDR), err.mcg_status)
        stop = _settle(g, 3.0)
        stopped_at = time.monotonic()
        if stop is None:
            g.vm.stop("the demo moves on")
        marks = [e.time for e in g.events if e.kind in ("memory-failure", "panic")]
        reaction = (min(marks) if marks else stopped_at) - t1
        verdict = decide(g.lines, g.events, stop, injected=True)
        progress.update(
            task, description=f"{s.title}: {verdict.outcome.value}", total=1, completed=1
        )
        return Story(s, verdict, _story_lines(g), boot, reaction)


def _side_by_side(stories: list[Story]) -> Table:
    """One column per guest: what it shows, its story, its verdict, and timing."""
    table = Table(show_lines=True, expand=True)
    for st in stories:
        table.add_column(st.scenario.title, ratio=1)
    table.add_row(*(f"[dim]{st.scenario.meaning}[/]" for st in stories))
    table.add_row(*("\n".join(st.lines) or "(no #MC handler ran)" for st in stories))
    cells = []
    for st in stories:
        colour = "green" if st.verdict.outcome is Outcome.RECOVERED else "red"
        as_designed = "as designed" if st.verdict.outcome is st.scenario.expect else "UNEXPECTED"
        cells.append(f"[bold {colour}]{st.verdict}[/]\n[dim]{as_designed}[/]")
    table.add_row(*cells)
    table.add_row(
        *(
            f"[dim]boot {st.boot_s * 1000:.0f} ms; verdict "
            f"{st.reaction_s * 1000:.0f} ms after injection[/]"
            for st in stories
        )
    )
    return table


def demo(
    vcpus: Annotated[int, typer.Option(help="vCPUs of each guest", min=2, max=32)] = 4,
    model: Annotated[bool, typer.Option(help="show the model only, without KVM")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdicts as JSON")] = False,
    guest: Annotated[str, typer.Option(help="test (our test kernel) or linux (Debian)")] = "test",
) -> None:
    """Show the seed's broadcast vMCE against vCPU0-only delivery, and seed point 6."""
    kvm = probe()
    if model:
        model_demo(vcpus)
        return
    if guest == "linux":
        if not kvm.usable:
            fail(f"/dev/kvm is not usable here ({kvm.reason}): the Linux demo needs it")
        linux_demo(as_json)
        return
    if guest != "test":
        fail(f"--guest {guest!r}: expected test or linux")
    if not kvm.usable:
        err_console.print(
            f"[yellow]/dev/kvm is not usable here ({kvm.reason}); showing the model only.[/]\n"
        )
        model_demo(vcpus)
        return
    (err_console if as_json else console).print(
        f"vmce demo: the vmce test kernel on {vcpus} KVM vCPUs, Intel profile; an SRAO memory "
        f"error (MCi_STATUS {lookup('srao').status:#x}) at guest address {ADDR:#x}.\n"
    )
    stories = []
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console if as_json else console,
        transient=as_json,
    ) as progress:
        for s in SCENARIOS:
            stories.append(_run_one(s, vcpus, progress))
    ok = all(st.verdict.outcome is st.scenario.expect for st in stories)
    if as_json:
        emit_json(
            {
                "as_designed": ok,
                "guests": [
                    {
                        "scenario": st.scenario.title,
                        "verdict": st.verdict.outcome.value,
                        "reason": st.verdict.reason,
                        "expected": st.scenario.expect.value,
                        "story": st.lines,
                        "boot_ms": round(st.boot_s * 1000),
                        "reaction_ms": round(st.reaction_s * 1000),
                    }
                    for st in stories
                ],
            }
        )
        if not ok:
            raise typer.Exit(1)
        return
    console.print(_side_by_side(stories))
    console.print(
        "\n[bold green]All three guests behaved as the seed's design says; the VMM outlived "
        "all of them.[/]"
        if ok
        else "\n[bold red]A guest did not behave as expected.[/]"
    )
    if not ok:
        raise typer.Exit(1)


def model_demo(vcpus: int) -> None:
    """The same SRAO through the host path on the model alone (no KVM needed)."""
    err = lookup("srao")
    for policy in (InjectionPolicy.BROADCAST, InjectionPolicy.VCPU0):
        profile = HostProfile.intel()
        mem = HostMemory()
        mem.add_ram(0x100000, 0x10000)
        dom = Domain(profile, vcpus, domid=1, policy=policy)
        mem.add_domain(GuestDomain(dom))
        mem.assign(1, 0, 0x100000, 0x10000)
        report = HostMca(profile, mem).handle(
            PhysicalMce(0, 0x5, (HostBank(8, err.status, (0x100000 << 12) + ADDR, 0x86),))
        )
        table = Table(
            "vCPU",
            "#MC pending",
            "MCG_STATUS",
            "MC1_STATUS",
            "MC1_ADDR",
            title=f"policy {policy.value}: {report.banks[0].action}",
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


def linux_demo(as_json: bool) -> None:
    """The first two Linux scenarios side by side, from the cached booted snapshot."""
    from vmce.guest.linux.guest import LinuxConfig
    from vmce.guest.linux.material import cached_material
    from vmce.guest.linux.scenarios import Scenario, run
    from vmce.guest.linux.snapshot import booted_guest, snapshot_path

    material = cached_material()
    if material is None:
        fail("the Debian kernel is not cached yet: run 'vmce guest linux' first")
    config = LinuxConfig()
    out = err_console if as_json else console
    if not snapshot_path(config, material).exists():
        out.print(
            "No booted snapshot yet: booting Debian Linux once (a few minutes on "
            "kvm_pvm); later runs restore it in about a second."
        )
    results = []
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=out,
        transient=as_json,
    ) as progress:
        for scenario in (Scenario.BROADCAST_SRAO, Scenario.VCPU0_SRAO):
            task = progress.add_task(f"{scenario.value}: restoring the booted guest", total=None)
            g, _ = booted_guest(config, material)
            with g:
                progress.update(task, description=f"{scenario.value}: injecting")
                r = run(scenario, g, timeout=90)
            progress.update(
                task,
                description=f"{scenario.value}: {r.verdict.outcome.value}",
                total=1,
                completed=1,
            )
            results.append(r)
    if as_json:
        emit_json(
            {
                "kernel": material.manifest.kernel_package,
                "version": material.manifest.kernel_version,
                "guests": [
                    {
                        "scenario": r.scenario.value,
                        "verdict": r.verdict.outcome.value,
                        "reason": r.verdict.reason,
                        "mce": r.monarch_timeout_us,
                        "seconds": round(r.seconds_to_verdict, 2),
                        "console": r.messages,
                    }
                    for r in results
                ],
            }
        )
        return
    table = Table(
        show_lines=True,
        expand=True,
        title=f"Debian {material.manifest.kernel_package} "
        f"({material.manifest.kernel_version}), 2 vCPUs, Intel profile",
    )
    for r in results:
        table.add_column(r.scenario.description, ratio=1)
    keep = ("mce:", "Memory failure", "Kernel panic", "Disabling lock")
    table.add_row(*("\n".join(m for m in r.messages if m.startswith(keep)) for r in results))
    table.add_row(
        *(
            f"[bold {'green' if r.verdict.outcome is Outcome.RECOVERED else 'red'}]"
            f"{r.verdict}[/]\n[dim]mce={r.monarch_timeout_us}; "
            f"{r.seconds_to_verdict:.1f} s to the verdict[/]"
            for r in results
        )
    )
    console.print(table)
