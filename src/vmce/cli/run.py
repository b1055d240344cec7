"""``vmce run``: boot the test guest on KVM with the vMCE, optionally inject, watch it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from vmce.cli.output import console, emit_json, fail, parse_u64
from vmce.guest.events import parse_event
from vmce.guest.linux.debs import MaterialError
from vmce.guest.linux.guest import LinuxConfig, LinuxGuest
from vmce.guest.linux.material import prepare
from vmce.guest.linux.snapshot import booted_guest, snapshot_path
from vmce.guest.testguest import Flags, GuestConfig, GuestTimeout, TestGuest, Work
from vmce.guest.verdict import Verdict, decide
from vmce.host.catalog import CATALOG, NamedError, lookup
from vmce.kvm.persist import save_vm
from vmce.kvm.qmp.server import ControlSocketError, QmpServer
from vmce.kvm.stop import StopReason
from vmce.kvm.vmcevm import VmceVm
from vmce.vmce import HostProfile, InjectionPolicy, Vendor

WORK_NAMES = ", ".join(w.name.lower() for w in Work)


def profile_for(vendor: str) -> HostProfile:
    """The host profile a user names: ``intel`` or ``amd``."""
    v = Vendor.parse(vendor)
    if v is Vendor.INTEL:
        return HostProfile.intel()
    if v in (Vendor.AMD, Vendor.HYGON):
        return HostProfile.amd()
    fail(f"vendor {vendor!r}: only intel and amd profiles can run a guest")


def parse_work(text: str, ncpus: int) -> list[Work]:
    """``user,kernel`` -> one Work per CPU, the last one repeated."""
    try:
        items = [Work[w.strip().upper()] for w in text.split(",") if w.strip()]
    except KeyError as e:
        fail(f"--work: unknown work {e.args[0].lower()!r} (expected: {WORK_NAMES})")
    if not items:
        fail("--work needs at least one item")
    return (items + [items[-1]] * ncpus)[:ncpus]


def run(
    vcpus: Annotated[int, typer.Option(help="vCPUs", min=1, max=32)] = 2,
    memory: Annotated[int, typer.Option(help="guest memory in MiB", min=16, max=4096)] = 64,
    vendor: Annotated[str, typer.Option(help="host/guest profile: intel or amd")] = "intel",
    policy: Annotated[str, typer.Option(help="injection policy: broadcast or vcpu0")] = "broadcast",
    work: Annotated[str, typer.Option(help=f"per-CPU work, comma-separated: {WORK_NAMES}")] = (
        "kernel,user"
    ),
    no_cr4_mce: Annotated[bool, typer.Option(help="the guest never sets CR4.MCE")] = False,
    monarch_timeout_us: Annotated[
        int | None, typer.Option(help="the guest's rendezvous timeout (like Linux's mce=N)")
    ] = None,
    inject: Annotated[
        str | None, typer.Option(help=f"inject a named error: {', '.join(CATALOG)}")
    ] = None,
    addr: Annotated[str, typer.Option(help="guest-physical address of the error")] = "0x3000000",
    via_host: Annotated[
        bool, typer.Option(help="inject as a host memory error through the host path")
    ] = False,
    inject_after: Annotated[float, typer.Option(help="seconds after boot to inject")] = 0.2,
    timeout: Annotated[
        float | None,
        typer.Option(help="seconds to run after boot (default 3; with --control: until quit)"),
    ] = None,
    control: Annotated[
        str | None,
        typer.Option(help="serve QMP on this unix socket (mode 0600) for vmce inject, qemu.qmp"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary at the end")] = (
        False
    ),
    guest: Annotated[
        str, typer.Option(help="test (the vmce test kernel) or linux (Debian, from its snapshot)")
    ] = "test",
) -> None:
    """Boot a guest on KVM with the vMCE, optionally inject, and print its console.

    The Linux guest is restored from its booted snapshot (booting once if there is none);
    --work, --no-cr4-mce and --memory apply to the test guest only.
    """
    if guest not in ("test", "linux"):
        fail(f"--guest {guest!r}: expected test or linux")
    try:
        pol = InjectionPolicy(policy)
    except ValueError:
        fail(f"--policy {policy!r}: expected broadcast or vcpu0")
    error = None
    if inject is not None:
        try:
            error = lookup(inject)
        except KeyError as e:
            fail(str(e.args[0]))
    gpa = parse_u64(addr, "--addr")
    if guest == "linux":
        memory = LinuxConfig().memory_mib
    if gpa >= memory << 20:
        fail(f"--addr {gpa:#x} is outside the guest's {memory} MiB")
    cfg = GuestConfig(
        ncpus=vcpus,
        work=parse_work(work, vcpus),
        flags=Flags.NO_CR4_MCE if no_cr4_mce else Flags.NONE,
        monarch_timeout_us=monarch_timeout_us,
    )
    t0 = time.monotonic()
    run_for = timeout if timeout is not None else (None if control else 3.0)
    sinks: list[QmpServer] = []

    output_open = [True]

    def show(line: str) -> None:
        """Print a console line (called on vCPU threads): a closed stdout (``| head``) ends
        the printing, never the VM or the VMM."""
        for server in sinks:
            server.console_line(line)
        if as_json or not output_open[0]:
            return
        try:
            console.print(
                f"[dim]{time.monotonic() - t0:8.3f}[/] {line}",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )
        except (BrokenPipeError, SystemExit, OSError):
            output_open[0] = False

    plan = Plan(error, gpa, via_host, inject_after, run_for, control, as_json)
    if guest == "linux":
        _run_linux(vcpus, vendor, pol, monarch_timeout_us, show, sinks, plan)
        return
    with TestGuest(
        cfg, profile=profile_for(vendor), policy=pol, memory_size=memory << 20, on_line=show
    ) as g:
        try:
            g.boot()
        except GuestTimeout as e:
            fail(f"the test guest did not boot: {e}")
        _drive(g, lambda: g.lines, plan, sinks, show)


@dataclass(frozen=True)
class Plan:
    """What ``vmce run`` does once the guest runs: inject, serve QMP, wait, report."""

    error: NamedError | None
    gpa: int
    via_host: bool
    inject_after: float
    run_for: float | None
    control: str | None
    as_json: bool


def _drive(
    g: TestGuest | LinuxGuest,
    lines: Callable[[], Sequence[str]],
    plan: Plan,
    sinks: list[QmpServer],
    show: Callable[[str], None],
) -> None:
    """Serve the control socket (if asked), inject, wait, and report the verdict."""
    if plan.control is not None:
        sinks.append(_serve(g, plan.control))
        show(f"# vmce: QMP control socket at {plan.control}")
    try:
        stop = _inject_and_wait(
            g, plan.error, plan.gpa, plan.via_host, plan.inject_after, plan.run_for, sinks, show
        )
    finally:
        for server in sinks:
            server.close()
        sinks.clear()
    verdict = decide(
        lines(),
        g.events,
        g.vm.machine.stop_reason if stop else None,
        injected=plan.error is not None or bool(g.vm.deliveries),
    )
    _report(verdict, g, plan.as_json, stop is not None)


def _run_linux(
    vcpus: int,
    vendor: str,
    policy: InjectionPolicy,
    monarch_timeout_us: int | None,
    show: Callable[[str], None],
    sinks: list[QmpServer],
    plan: Plan,
) -> None:
    """``vmce run --guest linux``: the Debian guest restored from its booted snapshot."""
    try:
        material = prepare()
    except MaterialError as e:
        fail(str(e))
    config = LinuxConfig(vcpus=vcpus, profile=profile_for(vendor), policy=policy)
    if monarch_timeout_us is not None:
        config.monarch_timeout_us = monarch_timeout_us
    if not snapshot_path(config, material).exists():
        show("# vmce: no booted snapshot for this configuration yet: booting Linux once")
    g, _ = booted_guest(config, material, on_line=show, on_boot_line=show)
    with g:
        g.vm.domain.policy = policy
        g.start()
        _drive(g, lambda: g.messages, plan, sinks, show)


def _serve(g: TestGuest | LinuxGuest, path: str) -> QmpServer:
    """Start the control socket for ``g``'s VM."""

    def guest_event(line: str) -> dict[str, Any] | None:
        e = parse_event(line)
        return None if e is None else {"kind": e.kind, **e.fields}

    server = QmpServer(g.vm, path, line_parser=guest_event, save=_save_vm)
    try:
        server.start()
    except ControlSocketError as e:
        fail(str(e))
    return server


def _save_vm(vm: VmceVm, path: str, paused: bool) -> Any:
    """The control socket's ``vmce-save`` (a user-paused VM stays paused)."""
    return save_vm(vm, path, resume=not paused)


def _inject_and_wait(
    g: TestGuest | LinuxGuest,
    error: NamedError | None,
    gpa: int,
    via_host: bool,
    inject_after: float,
    run_for: float | None,
    servers: list[QmpServer],
    show: Callable[[str], None],
) -> StopReason | None:
    """Inject the named error (if any) and run until the VM stops, a control client asks to
    quit, or ``run_for`` seconds pass (then the VM is stopped and None returned)."""
    if error is not None:
        time.sleep(inject_after)
        if via_host:
            report = g.vm.memory_error(
                gpa, error.status, misc=error.misc, mcg_status=error.mcg_status
            )
            note = report.describe().replace("\n", "; ")
        else:
            note = g.vm.inject(error.record(gpa), error.mcg_status).describe()
        show(f"# vmce: injected {error.name} at {gpa:#x}: {note}")
    deadline = None if run_for is None else time.monotonic() + run_for
    while True:
        left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        stop = g.vm.wait(max(left, 0.0))
        if stop is not None:
            return stop
        if any(s.quit_requested.is_set() for s in servers):
            g.vm.stop("quit requested on the control socket")
            return g.vm.machine.stop_reason
        if deadline is not None and time.monotonic() >= deadline:
            g.vm.stop(f"vmce run: {run_for} s passed")
            return None


def _report(verdict: Verdict, g: TestGuest | LinuxGuest, as_json: bool, stopped: bool) -> None:
    stop = g.vm.machine.stop_reason
    data: dict[str, Any] = {
        "verdict": verdict.outcome.value,
        "reason": verdict.reason,
        "details": verdict.details,
        "stopped": stopped,
        "stop_reason": stop.message if stop and stopped else None,
        "deliveries": [
            {
                "vcpu": d.vcpu_id,
                "accepted": d.accepted,
                "latency_us": round((d.delivered - d.requested) * 1e6),
                "detail": d.detail,
            }
            for d in g.vm.deliveries
        ],
        "events": [{"kind": e.kind, **e.fields} for e in g.events],
    }
    if as_json:
        emit_json(data)
        return
    if stopped and stop is not None:
        console.print(f"[bold]VM stopped:[/] {stop.message}", soft_wrap=True)
    colour = {"recovered": "green", "running": "green", "exited": "green"}.get(
        verdict.outcome.value, "red"
    )
    console.print(f"[bold {colour}]verdict: {verdict}[/]", soft_wrap=True)
    sys.stdout.flush()
