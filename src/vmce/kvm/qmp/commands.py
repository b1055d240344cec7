"""The commands of vmce's control socket, executed against a running :class:`VmceVm`.

Every command validates all of its arguments and every precondition before it changes
anything, and an injection is applied whole or not at all:

* Direct guest injection (``vmce-inject``, HMP ``mce``, ``vmce-mce-inject`` with
  ``path: direct``) goes through :func:`vmce.vmce.direct.load_banks`: the record lands in
  guest bank 1 of the chosen vCPUs, all or nothing, refused while a target vCPU is busy.
* Host-path injection (``vmce-memory-error``, ``vmce-xen-mceinj``, ``vmce-mce-inject`` with
  ``path: host``) goes through Xen's host handling (:mod:`vmce.host.memerr`), which decides
  itself who gets what (broadcast, LMCE, nothing). Because Xen crashes the domain when a vCPU
  is still busy or a page is hit twice, these commands refuse such a request unless
  ``force`` is true: a user's command is refused where real hardware could not be.
* A vCPU also counts as busy for :data:`SETTLE_S` after its guest cleared MCIP: the guest is
  still returning from its handler, on the #MC IST stack, and a #MC there re-enters the
  handler on the same stack (Linux has that window too; the test guest's is wider, it prints
  after clearing MCIP). Hardware and Xen would deliver it; a command waits or is refused.
* ``vmce-mce-inject`` runs a file's injections one after the other, each waiting (up to
  ``timeout``) for the vCPUs of the previous one to finish; each injection is whole, and the
  reply says which were applied (``complete`` is false if any was not).
* Commands run one at a time (the server has one command thread), so two clients' injections
  never interleave.

Events are emitted through the ``emit`` callable the server passes in; see :mod:`.events`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmce import __version__
from vmce.host.catalog import CATALOG
from vmce.host.direct import plan as direct_plan
from vmce.host.hmp import BROADCAST_MCG_STATUS, BROADCAST_STATUS
from vmce.host.mceinject import (
    Broadcast,
    Context,
    Injection,
    MceInjectSyntaxError,
    MceRecord,
    Mode,
    parse,
    resolve,
)
from vmce.host.memerr import HostBank, HostMceReport, PhysicalMce
from vmce.host.memory import DOMID_IDLE, PAGE_SHIFT
from vmce.host.xenmceinj import DEFAULT_ADDR, ERROR_TYPES, XenMceInj
from vmce.host.xenmceinj import Delivery as XenDelivery
from vmce.kvm.qmp import events as ev
from vmce.kvm.qmp.protocol import ErrorClass, Kind, Param, QmpError, check_args
from vmce.kvm.vmcevm import MsrAccess, VmceVm
from vmce.mca.constants import MCG_STATUS_MCIP, MCI_STATUS_UC, MCI_STATUS_VAL
from vmce.mca.msr import Msr
from vmce.vmce.direct import GUEST_ERROR_BANK, BankLoad, LoadResult, Merge, busy_vcpus, load_banks
from vmce.vmce.profile import Vendor

U64 = (1 << 64) - 1
MSR_MCG_STATUS = int(Msr.MCG_STATUS)
#: How long ``vmce-mce-inject`` waits for the guest to finish one injection before the next.
DEFAULT_STEP_TIMEOUT = 5.0
#: The DOMID_XEN of xen-mceinj's ``-d`` default: the address is a machine address.
DOMID_XEN = 0x7FF2
#: How long after its guest cleared MCG_STATUS.MCIP a vCPU still counts as busy: the guest is
#: still returning from its handler on the #MC IST stack, and a #MC there re-enters the
#: handler on the same stack (hardware and Xen would deliver it; a command can wait).
SETTLE_S = 0.005

Emit = Callable[[str, dict[str, Any]], None]
#: Saves the VM to a path; the flag says the VM is paused by the user (and must stay so).
SaveFunction = Callable[[VmceVm, str, bool], Any]


@dataclass(frozen=True)
class Command:
    """A command: its parameters, its handler and one line of help."""

    name: str
    params: tuple[Param, ...]
    handler: Callable[[Controller, dict[str, Any]], Any]
    help: str


class Controller:
    """Executes commands for one VM; the server calls :meth:`execute` on its command thread."""

    def __init__(
        self,
        vm: VmceVm,
        emit: Emit,
        on_quit: Callable[[], None] = lambda: None,
        save: SaveFunction | None = None,
    ) -> None:
        self.vm = vm
        self.emit = emit
        self.on_quit = on_quit
        self.save = save
        self.paused = False
        self._lock = threading.RLock()
        #: vCPU -> when (time.monotonic) its guest last cleared MCG_STATUS.MCIP.
        self._cleared: dict[int, float] = {}

    def note_msr(self, access: MsrAccess) -> None:
        """An MSR trace hook (vCPU threads): remember when a guest clears MCIP."""
        if not access.write or access.msr != MSR_MCG_STATUS or access.value is None:
            return
        if not access.value & MCG_STATUS_MCIP:
            self._cleared[access.vcpu_id] = access.time

    def settling(self, vcpus: Sequence[int] | None = None) -> tuple[int, ...]:
        """vCPUs whose guest cleared MCIP less than :data:`SETTLE_S` ago."""
        now = time.monotonic()
        ids = range(self.nr_vcpus) if vcpus is None else vcpus
        return tuple(
            sorted(v for v in set(ids) if now - self._cleared.get(v, -SETTLE_S) < SETTLE_S)
        )

    def require_settled(self, vcpus: Sequence[int] | None = None) -> None:
        """Refuse while a target vCPU may still be returning from its #MC handler."""
        recent = self.settling(vcpus)
        if recent:
            names = ", ".join(f"vCPU {v}" for v in recent)
            raise QmpError(
                f"not injected: {names} has not finished the previous machine check (it cleared "
                f"MCIP less than {SETTLE_S * 1000:g} ms ago and may still be returning from its "
                "handler)"
            )

    # -- entry ---------------------------------------------------------------------------

    def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run command ``name``; raises :class:`QmpError` for the error reply."""
        cmd = COMMANDS.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", ErrorClass.COMMAND_NOT_FOUND)
        args = check_args(cmd.params, arguments)
        with self._lock:
            return cmd.handler(self, args)

    # -- helpers -------------------------------------------------------------------------

    @property
    def nr_vcpus(self) -> int:
        return self.vm.domain.nr_vcpus

    def run_state(self) -> str:
        """QEMU's RunState name for the VM."""
        stop = self.vm.machine.stop_reason
        if stop is not None:
            return "guest-panicked" if stop.exit_code == 0x02 else "shutdown"
        return "paused" if self.paused else "running"

    def require_running(self) -> None:
        stop = self.vm.machine.stop_reason
        if stop is not None:
            raise QmpError(f"the VM is not running: {stop.message}")
        crashed = self.vm.domain.crashed
        if crashed is not None:
            raise QmpError(f"the domain has crashed: {crashed.reason}")

    def broadcast_supported(self) -> bool:
        """QEMU's ``cpu_x86_support_mca_broadcast``: Intel family 6 model >= 14, or later."""
        cpu = self.vm.config.guest_cpu()
        if cpu.vendor is not Vendor.INTEL:
            return False
        return cpu.family > 6 or (cpu.family == 6 and cpu.model >= 14)

    def apply_loads(self, loads: Sequence[BankLoad], source: str) -> LoadResult:
        """Load bank 1 of the given vCPUs (all or nothing) and deliver the #MCs together."""
        self.require_running()
        self.require_settled([ld.vcpu for ld in loads])
        with self.vm.batch():
            result = load_banks(self.vm.domain, loads)
            if result.ok:
                for x in result.loaded:
                    self.emit(ev.VMCE_FILLED, ev.filled(x, source))
        if not result.ok:
            raise QmpError(result.describe())
        return result

    def host_mce(self, mce: PhysicalMce) -> HostMceReport:
        """Run a host machine check through Xen's host path; report every vCPU filled."""
        self.require_running()
        with self.vm.batch():
            report = self.vm.host_mca.handle(mce)
            for out in report.banks:
                d = out.delivery
                if d is not None and d.fill.ok:
                    for vid in d.fill.filled:
                        snap = self.vm.domain.vcpus[vid].snapshot()
                        self.emit(ev.VMCE_FILLED, ev.filled_snapshot(snap, d.inject is not None))
        return report

    def check_host_path(self, gfns: Sequence[int], force: bool) -> None:
        """Refuse what Xen's host path would answer by crashing the domain (unless forced)."""
        if force:
            return
        self.require_settled()
        busy = busy_vcpus(self.vm.domain)
        if busy:
            names = ", ".join(f"vCPU {v}" for v in busy)
            raise QmpError(
                f"{names} has not finished the previous machine check: Xen's host path would "
                "crash the domain (fill_vmsr_data -EBUSY); not injected (force: true injects "
                "anyway)"
            )
        mem = self.vm.host_memory
        for gfn in gfns:
            mfn = mem.gfn_to_mfn(self.vm.domain.domid, gfn)
            page = mem.pages.get(mfn)
            if page is not None and page.broken:
                raise QmpError(
                    f"guest page {gfn:#x} is already broken: Xen would crash the domain "
                    "(offline_page AGAIN); not injected (force: true injects anyway)"
                )

    def gpa_to_maddr(self, gpa: int) -> int:
        if not 0 <= gpa < self.vm.config.memory_size:
            raise QmpError(
                f"guest-physical address {gpa:#x} is outside the guest's "
                f"{self.vm.config.memory_size >> 20} MiB"
            )
        mfn = self.vm.host_memory.gfn_to_mfn(self.vm.domain.domid, gpa >> PAGE_SHIFT)
        return (mfn << PAGE_SHIFT) | (gpa & ((1 << PAGE_SHIFT) - 1))

    def running_on(self, cpu: int | None) -> tuple[int, int]:
        """(domid, vcpu) the host CPU ``cpu`` was running: host CPU n runs vCPU n (1:1), any
        other host CPU is idle; ``None`` means an asynchronous error (idle)."""
        if cpu is not None and 0 <= cpu < self.nr_vcpus:
            return self.vm.domain.domid, cpu
        return DOMID_IDLE, 0xFFFF

    def wait_idle(self, vcpus: Sequence[int], timeout: float) -> str:
        """Wait until no vCPU of ``vcpus`` is busy; '' or the reason it did not happen."""
        deadline = time.monotonic() + timeout
        while True:
            stop = self.vm.machine.stop_reason
            if stop is not None:
                return f"the VM stopped: {stop.message}"
            if not busy_vcpus(self.vm.domain, vcpus) and not self.settling(vcpus):
                return ""
            if time.monotonic() >= deadline:
                busy = ", ".join(str(v) for v in busy_vcpus(self.vm.domain, vcpus))
                return f"vCPU {busy} still busy with the previous machine check after {timeout} s"
            time.sleep(0.002)

    # -- life cycle ----------------------------------------------------------------------

    def stop(self) -> None:
        self.require_running()
        if self.paused:
            return
        if not self.vm.pause():
            self.vm.resume()
            raise QmpError("the vCPUs did not stop within 5 s")
        self.paused = True
        self.emit(ev.STOP, {})

    def cont(self) -> None:
        stop = self.vm.machine.stop_reason
        if stop is not None:
            raise QmpError(f"the VM cannot run again: {stop.message}")
        if not self.paused:
            return
        self.vm.resume()
        self.paused = False
        self.emit(ev.RESUME, {})


# --------------------------------------------------------------------------------------------
# Command handlers


def _qmp_capabilities(c: Controller, a: dict[str, Any]) -> Any:
    # Only reached once negotiation is complete (the server handles the first one).
    raise QmpError(
        "Capabilities negotiation is already complete, command 'qmp_capabilities' ignored",
        ErrorClass.COMMAND_NOT_FOUND,
    )


def _query_version(c: Controller, a: dict[str, Any]) -> Any:
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"vmce {__version__}",
    }


def _query_commands(c: Controller, a: dict[str, Any]) -> Any:
    return [{"name": name} for name in COMMANDS]


def _query_status(c: Controller, a: dict[str, Any]) -> Any:
    state = c.run_state()
    return {"running": state == "running", "singlestep": False, "status": state}


def _query_cpus_fast(c: Controller, a: dict[str, Any]) -> Any:
    out = []
    for i, runner in enumerate(c.vm.machine.runners):
        thread = getattr(runner, "_thread", None)
        out.append(
            {
                "cpu-index": i,
                "qom-path": f"/machine/unattached/device[{i}]",
                "thread-id": getattr(thread, "native_id", None) or 0,
                "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                "target": "x86_64",
                "state": runner.state.value,
            }
        )
    return out


def _query_vmce(c: Controller, a: dict[str, Any]) -> Any:
    dom = c.vm.domain
    ids = range(dom.nr_vcpus)
    if "cpu-index" in a:
        if a["cpu-index"] >= dom.nr_vcpus:
            raise QmpError(f"CPU #{a['cpu-index']} not found", ErrorClass.DEVICE_NOT_FOUND)
        ids = range(a["cpu-index"], a["cpu-index"] + 1)
    return {
        "domid": dom.domid,
        "vendor": dom.profile.vendor.value,
        "policy": dom.policy.value,
        "crashed": dom.crashed.reason if dom.crashed else None,
        "vcpus": [ev.vcpu_state(dom.vcpus[i].snapshot()) for i in ids],
    }


def _stop(c: Controller, a: dict[str, Any]) -> Any:
    c.stop()
    return {}


def _cont(c: Controller, a: dict[str, Any]) -> Any:
    c.cont()
    return {}


def _quit(c: Controller, a: dict[str, Any]) -> Any:
    c.on_quit()
    return {}


def _human_monitor_command(c: Controller, a: dict[str, Any]) -> Any:
    from vmce.kvm.qmp.hmp import run_hmp  # the monitor uses this module's commands

    return run_hmp(c, a["command-line"], a.get("cpu-index", 0))


def _vmce_inject(c: Controller, a: dict[str, Any]) -> Any:
    cpus: list[int] = a.get("cpus", [0])
    if not cpus:
        raise QmpError("Parameter 'cpus' must name at least one vCPU")
    for v in cpus:
        if v >= c.nr_vcpus:
            raise QmpError(f"CPU #{v} not found", ErrorClass.DEVICE_NOT_FOUND)
    if len(set(cpus)) != len(cpus):
        raise QmpError("Parameter 'cpus' names a vCPU twice")
    status = a["status"]
    mode = a.get("mode", "auto")
    raise_mc = mode == "excp" or (mode == "auto" and bool(status & MCI_STATUS_UC))
    mcg = a["mcg-status"] if raise_mc else None
    loads = [
        BankLoad(v, status, a.get("addr", 0), a.get("misc", 0), mcg, raise_mc, Merge.QEMU)
        for v in cpus
    ]
    if a.get("broadcast", False):
        if not c.broadcast_supported():
            raise QmpError("Guest CPU does not support MCA broadcast")
        loads += [
            BankLoad(v, BROADCAST_STATUS, 0, 0, BROADCAST_MCG_STATUS, True, Merge.QEMU)
            for v in range(c.nr_vcpus)
            if v not in cpus
        ]
    result = c.apply_loads(loads, "qmp")
    if raise_mc:
        c.emit(ev.MEMORY_FAILURE, ev.memory_failure(status))
    notes = []
    bank = a.get("bank", GUEST_ERROR_BANK)
    if bank != GUEST_ERROR_BANK:
        notes.append(f"bank {bank} is reported in guest bank {GUEST_ERROR_BANK}")
    if not raise_mc:
        notes.append("no #MC raised: the guest sees the bank when it polls")
    return ev.load_result(result, notes)


def _vmce_memory_error(c: Controller, a: dict[str, Any]) -> Any:
    name = a.get("error")
    if name is not None and "status" in a:
        raise QmpError("Parameters 'error' and 'status' are mutually exclusive")
    err = CATALOG[name or "srao"]
    status = a.get("status", err.status)
    gpa = a["gpa"]
    maddr = c.gpa_to_maddr(gpa)
    c.check_host_path([gpa >> PAGE_SHIFT], a.get("force", False))
    domid, vcpu = c.running_on(a.get("cpu"))
    mce = PhysicalMce(
        cpu=a.get("cpu", 0),
        mcg_status=a.get("mcg-status", err.mcg_status),
        banks=(HostBank(a.get("bank", 9), status, maddr, a.get("misc", err.misc)),),
        running_domid=domid,
        running_vcpu=vcpu,
    )
    return ev.host_report(c.host_mce(mce), gpa)


def _xen_mceinj(c: Controller, a: dict[str, Any]) -> Any:
    opts = XenMceInj(
        dump=a.get("dump", False),
        cpu=a.get("cpu", 0),
        domid=a.get("domain", DOMID_XEN),
        addr=a.get("page", DEFAULT_ADDR),
        type=a.get("type", 0),
        lmce=a.get("lmce", False),
    )
    if opts.type >= len(ERROR_TYPES):
        raise QmpError(f"Parameter 'type' expects a value in 0..{len(ERROR_TYPES) - 1}")
    if opts.lmce and opts.error.delivery is XenDelivery.CMCI:
        raise QmpError("No support to inject CMCI as LMCE")
    dom = c.vm.domain
    if opts.guest_address:
        if opts.domid != dom.domid:
            raise QmpError(f"domain {opts.domid} does not exist (this VMM runs d{dom.domid})")
        if opts.addr >= c.vm.config.memory_size:
            raise QmpError(f"gaddr exceeds max_gpa: {opts.addr:#x} >= {c.vm.config.memory_size:#x}")
    elif opts.domid != DOMID_XEN:
        raise QmpError(f"domain {opts.domid:#x} is reserved; use a guest domid or DOMID_XEN")
    if opts.dump:
        return {"dump": opts.dump_text(), "injected": False}
    profile = dom.profile
    if opts.lmce and not profile.lmce:
        raise QmpError("the host does not support LMCE (xc_mca_op inject_v2: EINVAL)")
    if opts.error.delivery is XenDelivery.CMCI:
        if not profile.is_intel:
            raise QmpError("the host has no CMCI (xc_mca_op inject_v2: EINVAL)")
        c.require_running()
        return {
            "injected": True,
            "type": opts.error.name,
            "delivery": "CMCI",
            "host-result": "logged",
            "note": "CMCI-signalled errors are logged for dom0; Xen never forwards them to a guest",
        }
    maddr = c.gpa_to_maddr(opts.addr) if opts.guest_address else opts.addr
    gfns = [opts.addr >> PAGE_SHIFT] if opts.guest_address else _guest_gfns(c, maddr)
    c.check_host_path(gfns, a.get("force", False))
    domid, vcpu = c.running_on(opts.cpu)
    t = opts.error
    mce = PhysicalMce(
        cpu=opts.cpu,
        mcg_status=opts.mcg_status,
        banks=(HostBank(t.bank, t.status, maddr, t.misc),),
        running_domid=domid,
        running_vcpu=vcpu,
    )
    out = ev.host_report(c.host_mce(mce), opts.addr if opts.guest_address else None)
    out.update({"injected": True, "type": t.name, "delivery": t.delivery.value})
    return out


def _guest_gfns(c: Controller, maddr: int) -> list[int]:
    """The guest frame behind machine address ``maddr``, if the guest owns it."""
    mfn = maddr >> PAGE_SHIFT
    gfn = c.vm.host_memory.m2p.get(mfn)
    return [] if gfn is None else [gfn]


def _mce_inject(c: Controller, a: dict[str, Any]) -> Any:
    source = a.get("source", "<qmp>")
    try:
        records = parse(a["text"], source)
    except MceInjectSyntaxError as e:
        raise QmpError(str(e)) from None
    try:
        injections = resolve(records, list(range(c.nr_vcpus)))
    except ValueError as e:
        raise QmpError(f"{source}: {e}") from None
    if not injections:
        raise QmpError(f"{source}: no record to inject (only HOLD records, or none)")
    path = a.get("path", "direct")
    step_timeout = float(a.get("timeout", DEFAULT_STEP_TIMEOUT))
    force = a.get("force", False)
    if path == "host":
        for inj in injections:  # every address is checked before anything is injected
            for _, rec in inj.targets:
                c.gpa_to_maddr(rec.addr)
    results: list[dict[str, Any]] = []
    previous: list[int] = []
    for i, inj in enumerate(injections):
        notes = injection_notes(inj, path)
        if i and previous:
            why = c.wait_idle(previous, step_timeout)
            if why:
                results.append(ev.injection(inj, False, why, notes))
                continue
        try:
            if path == "direct":
                loads = _direct_loads(inj)
                res = c.apply_loads(loads, "mce-inject")
                results.append(ev.injection(inj, True, "", notes, res))
                previous = list(res.pending)
            else:
                reports = _host_inject(c, inj, force)
                results.append(ev.injection(inj, True, "", notes, host=reports))
                previous = list(range(c.nr_vcpus))
        except QmpError as e:
            if i == 0:
                raise
            results.append(ev.injection(inj, False, e.desc, notes))
    applied = sum(1 for r in results if r["applied"])
    return {
        "source": source,
        "path": path,
        "injections": results,
        "applied": applied,
        "complete": applied == len(injections),
    }


def _direct_loads(inj: Injection) -> list[BankLoad]:
    return [
        BankLoad(
            ld.vcpu,
            ld.status,
            ld.addr,
            ld.misc,
            ld.mcg_status if ld.raise_mc else None,
            ld.raise_mc,
            Merge.REPLACE,
        )
        for ld in direct_plan(inj)
    ]


def _host_inject(c: Controller, inj: Injection, force: bool) -> list[dict[str, Any]]:
    """One injection through the host: each CPU's record that holds an error (VAL set) is a
    host bank of a machine check on that host CPU; POLL records are only logged by Xen."""
    if inj.mode is Mode.POLL:
        c.require_running()
        return [{"cpu": inj.cpu, "host-result": "logged", "note": _POLL_HOST_NOTE}]
    recs = [(cpu, r) for cpu, r in inj.targets if r.status & MCI_STATUS_VAL]
    if len(recs) > 1 and not force:
        raise QmpError(
            f"{len(recs)} error records in one machine check: Xen's host path fills the domain "
            "once per record, and the second fill finds vCPU0 busy and crashes the domain; not "
            "injected (force: true injects anyway)"
        )
    c.check_host_path([r.addr >> PAGE_SHIFT for _, r in recs], force)
    out = []
    for cpu, rec in recs:
        domid, vcpu = c.running_on(cpu)
        mce = PhysicalMce(
            cpu=cpu,
            mcg_status=rec.mcg_status,
            banks=(HostBank(rec.bank, rec.status, c.gpa_to_maddr(rec.addr), rec.misc),),
            running_domid=domid,
            running_vcpu=vcpu,
        )
        report = ev.host_report(c.host_mce(mce), rec.addr)
        report["cpu"] = cpu
        out.append(report)
    return out


_POLL_HOST_NOTE = "polled errors are logged for dom0; Xen never forwards them to a guest"


def injection_notes(inj: Injection, path: str) -> list[str]:
    """What of the record vmce cannot or does not reproduce, in words."""
    notes: list[str] = []
    records: list[MceRecord] = [r for _, r in inj.targets]
    primary = next(r for c, r in inj.targets if c == inj.cpu)
    if path == "direct":
        banks = sorted(
            {r.bank for r in records if r.status & MCI_STATUS_VAL and r.bank != GUEST_ERROR_BANK}
        )
        if banks:
            notes.append(
                f"bank {', '.join(map(str, banks))} reported in guest bank {GUEST_ERROR_BANK}"
            )
        if inj.mode is Mode.POLL:
            notes.append(
                "POLL: bank filled without #MC (no CMCI); the guest sees it only when it polls"
            )
    if any(r.context is not Context.RANDOM for r in records):
        notes.append(
            "IN_IRQ/IN_PROC not honoured: a vCPU takes the #MC wherever it runs (its work "
            "decides kernel or user context)"
        )
    if any(r.rip or r.cs is not None for r in records):
        notes.append("RIP is not injected: the guest's handler sees the interrupted RIP")
    if primary.broadcast & (Broadcast.IRQBROADCAST | Broadcast.NMIBROADCAST):
        notes.append("IRQBROADCAST/NMIBROADCAST: the vMCE raises #MC on each vCPU directly")
    if any(r.tsc or r.time or r.socketid or r.apicid or r.mcgcap or r.processor for r in records):
        notes.append("TSC/TIME/SOCKETID/APICID/MCGCAP/PROCESSOR are log fields, not injected")
    return notes


def _save(c: Controller, a: dict[str, Any]) -> Any:
    if c.save is None:
        raise QmpError("save is not available in this build")
    c.require_running()
    try:
        report = c.save(c.vm, a["path"], c.paused)
    except (OSError, ValueError, RuntimeError) as e:
        raise QmpError(f"save failed: {e}") from None
    out: dict[str, Any] = {"path": str(getattr(report, "path", a["path"]))}
    for key, attr in (
        ("size", "size"),
        ("seconds", "seconds"),
        ("paused-seconds", "paused_seconds"),
    ):
        value = getattr(report, attr, None)
        if isinstance(value, int | float):
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# The table

_CPU = Param("cpu-index", Kind.INT, maximum=4095)
_FORCE = Param("force", Kind.BOOL, help="inject even where Xen would crash the domain")

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "qmp_capabilities",
            (Param("enable", Kind.STR_LIST),),
            _qmp_capabilities,
            "negotiate capabilities (none are offered)",
        ),
        Command("query-version", (), _query_version, "the server's version"),
        Command("query-commands", (), _query_commands, "the commands this server knows"),
        Command("query-status", (), _query_status, "running, paused, shutdown, guest-panicked"),
        Command("query-cpus-fast", (), _query_cpus_fast, "the vCPUs"),
        Command("query-vmce", (_CPU,), _query_vmce, "each vCPU's vMCE state"),
        Command("stop", (), _stop, "pause every vCPU"),
        Command("cont", (), _cont, "resume"),
        Command("quit", (), _quit, "stop the VM and end the VMM"),
        Command(
            "human-monitor-command",
            (Param("command-line", Kind.STR, required=True), _CPU),
            _human_monitor_command,
            "one HMP command line (mce, info registers, ...)",
        ),
        Command(
            "vmce-inject",
            (
                Param("cpus", Kind.INT_LIST, maximum=4095),
                Param("bank", Kind.INT, maximum=255),
                Param("status", Kind.UINT64, required=True),
                Param("mcg-status", Kind.UINT64, required=True),
                Param("addr", Kind.UINT64),
                Param("misc", Kind.UINT64),
                Param("broadcast", Kind.BOOL),
                Param("mode", Kind.STR, choices=("auto", "excp", "poll")),
            ),
            _vmce_inject,
            "a raw bank record into chosen vCPUs' bank 1 (QEMU's mce, generalised)",
        ),
        Command(
            "vmce-memory-error",
            (
                Param("gpa", Kind.UINT64, required=True),
                Param("error", Kind.STR, choices=tuple(CATALOG)),
                Param("status", Kind.UINT64),
                Param("misc", Kind.UINT64),
                Param("mcg-status", Kind.UINT64),
                Param("bank", Kind.INT, maximum=255),
                Param("cpu", Kind.INT, maximum=4095),
                _FORCE,
            ),
            _vmce_memory_error,
            "a host memory error at a guest-physical address, through Xen's host path",
        ),
        Command(
            "vmce-mce-inject",
            (
                Param("text", Kind.STR, required=True),
                Param("source", Kind.STR),
                Param("path", Kind.STR, choices=("direct", "host")),
                Param("timeout", Kind.NUMBER),
                _FORCE,
            ),
            _mce_inject,
            "an mce-inject record set",
        ),
        Command(
            "vmce-xen-mceinj",
            (
                Param("domain", Kind.INT, maximum=0xFFFF),
                Param("cpu", Kind.INT, maximum=4095),
                Param("page", Kind.UINT64),
                Param("type", Kind.INT, maximum=0xFFFF),
                Param("lmce", Kind.BOOL),
                Param("dump", Kind.BOOL),
                _FORCE,
            ),
            _xen_mceinj,
            "xen-mceinj's injection, through Xen's host path",
        ),
        Command("vmce-save", (Param("path", Kind.STR, required=True),), _save, "save the VM"),
    )
}
