"""The control socket's asynchronous events and the JSON shapes of command results.

Events (``data`` members in brackets):

* ``CONSOLE`` [line, guest-event?]: one line of the guest's serial console; ``guest-event``
  is the line parsed by the server's ``line_parser`` (the test guest's ``@vmce`` events:
  {kind, ...fields}) when it recognises it.
* ``VMCE_FILLED`` [cpu-index, bank, status, addr, misc, mcg-status, mce, source]: a vCPU's
  vMCE bank was loaded (``mce``: a #MC is pending on it; ``source``: qmp, hmp, mce-inject or
  host).
* ``VMCE_DELIVERED`` [cpu-index, accepted, latency-us, detail]: the VMM delivered (or could
  not deliver) the #MC into the vCPU.
* ``MEMORY_FAILURE`` [recipient, action, flags{action-required, recursive}]: QEMU's event, sent
  when a direct injection raises an uncorrected error in the guest.
* ``GUEST_PANICKED`` [action, message]: the guest panicked (QEMU's name; ``message`` is the
  guest's panic line).
* ``SHUTDOWN`` [guest, reason, message]: the VM stopped; ``reason`` is QEMU's ShutdownCause
  (guest-panic, guest-shutdown, guest-reset for a triple fault, host-qmp-quit, host-error).
* ``STOP`` and ``RESUME``: the vCPUs were paused or resumed.
"""

from __future__ import annotations

from typing import Any

from vmce.host.mceinject import Injection
from vmce.host.memerr import HostMceReport
from vmce.kvm.stop import StopKind, StopReason
from vmce.kvm.vmcevm import McDelivery
from vmce.mca.constants import MCI_STATUS_AR
from vmce.vmce.direct import GUEST_ERROR_BANK, Loaded, LoadResult
from vmce.vmce.state import VCpuSnapshot

CONSOLE = "CONSOLE"
VMCE_FILLED = "VMCE_FILLED"
VMCE_DELIVERED = "VMCE_DELIVERED"
MEMORY_FAILURE = "MEMORY_FAILURE"
GUEST_PANICKED = "GUEST_PANICKED"
SHUTDOWN = "SHUTDOWN"
STOP = "STOP"
RESUME = "RESUME"

EVENTS = (
    CONSOLE,
    VMCE_FILLED,
    VMCE_DELIVERED,
    MEMORY_FAILURE,
    GUEST_PANICKED,
    SHUTDOWN,
    STOP,
    RESUME,
)

PANIC_PREFIX = "Kernel panic - not syncing: "
#: The test guest's exit code for a panic (guest.testguest.ExitCode.PANIC).
GUEST_PANIC_EXIT = 0x02


def console(line: str, guest_event: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"line": line}
    if guest_event is not None:
        data["guest-event"] = guest_event
    return data


def panic_message(line: str) -> str | None:
    """The panic text if ``line`` is the guest's panic line."""
    i = line.find(PANIC_PREFIX)
    return line[i + len(PANIC_PREFIX) :] if i >= 0 else None


def filled(x: Loaded, source: str) -> dict[str, Any]:
    return {
        "cpu-index": x.vcpu,
        "bank": GUEST_ERROR_BANK,
        "status": x.status,
        "addr": x.addr,
        "misc": x.misc,
        "mcg-status": x.mcg_status,
        "mce": x.raise_mc,
        "source": source,
    }


def filled_snapshot(s: VCpuSnapshot, raised: bool) -> dict[str, Any]:
    b = s.banks[GUEST_ERROR_BANK]
    return {
        "cpu-index": s.vcpu_id,
        "bank": GUEST_ERROR_BANK,
        "status": b.status,
        "addr": b.addr,
        "misc": b.misc,
        "mcg-status": s.mcg_status,
        "mce": raised,
        "source": "host",
    }


def delivered(d: McDelivery) -> dict[str, Any]:
    return {
        "cpu-index": d.vcpu_id,
        "accepted": d.accepted,
        "latency-us": round((d.delivered - d.requested) * 1e6),
        "detail": d.detail,
    }


def memory_failure(status: int) -> dict[str, Any]:
    return {
        "recipient": "guest",
        "action": "inject",
        "flags": {"action-required": bool(status & MCI_STATUS_AR), "recursive": False},
    }


def shutdown(stop: StopReason) -> dict[str, Any]:
    """SHUTDOWN's data for a VM that stopped for ``stop``."""
    if stop.kind is StopKind.GUEST_EXIT:
        guest, reason = (
            True,
            "guest-panic" if stop.exit_code == GUEST_PANIC_EXIT else "guest-shutdown",
        )
    elif stop.kind in (StopKind.SHUTDOWN, StopKind.SHUTDOWN_REQUESTED):
        guest, reason = True, "guest-reset"  # a triple fault: QEMU resets, vmce stops
    elif stop.kind is StopKind.SYSTEM_EVENT:
        guest, reason = True, "guest-shutdown"
    elif stop.kind in (StopKind.HOST_STOP, StopKind.TIMEOUT):
        guest, reason = False, "host-signal"
    else:
        guest, reason = False, "host-error"
    return {"guest": guest, "reason": reason, "message": stop.message}


def vcpu_state(s: VCpuSnapshot) -> dict[str, Any]:
    return {
        "cpu-index": s.vcpu_id,
        "mcg-cap": s.mcg_cap,
        "mcg-status": s.mcg_status,
        "mcg-ext-ctl": s.mcg_ext_ctl,
        "mce-pending": s.mce_pending,
        "initialised": s.initialised,
        "banks": [
            {"bank": i, "status": b.status, "addr": b.addr, "misc": b.misc, "ctl2": b.ctl2}
            for i, b in enumerate(s.banks)
        ],
    }


def load_result(r: LoadResult, notes: list[str]) -> dict[str, Any]:
    return {
        "loaded": [
            {
                "cpu-index": x.vcpu,
                "bank": GUEST_ERROR_BANK,
                "status": x.status,
                "addr": x.addr,
                "misc": x.misc,
                "mcg-status": x.mcg_status,
                "mce": x.raise_mc,
            }
            for x in r.loaded
        ],
        "pending": list(r.pending),
        "notes": notes,
    }


def host_report(r: HostMceReport, gpa: int | None) -> dict[str, Any]:
    banks = []
    for b in r.banks:
        d = b.delivery
        banks.append(
            {
                "bank": b.bank,
                "status": b.status,
                "class": b.error_class.value,
                "result": b.result.name.lower(),
                "action": b.action,
                "reason": b.reason,
                "domid": b.domid,
                "gfn": b.gfn,
                "guest-addr": b.guest_addr,
                "offline": b.offline,
                "delivery": None
                if d is None
                else {
                    "ok": d.ok,
                    "text": d.describe(),
                    "filled": list(d.fill.filled),
                    "pending": list(d.inject.pending) if d.inject else [],
                    "crash": d.crash.reason if d.crash else None,
                },
            }
        )
    return {
        "gpa": gpa,
        "host-result": r.result.name.lower(),
        "host-panics": r.host_panics,
        "panic-reason": r.panic_reason,
        "crashed": list(r.crashed),
        "banks": banks,
        "text": r.describe(),
    }


def injection(
    inj: Injection,
    applied: bool,
    reason: str,
    notes: list[str],
    res: LoadResult | None = None,
    host: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "line": inj.line,
        "cpu": inj.cpu,
        "mode": inj.mode.name,
        "targets": [c for c, _ in inj.targets],
        "applied": applied,
        "notes": notes,
    }
    if reason:
        out["reason"] = reason
    if res is not None:
        out.update(load_result(res, notes))
    if host is not None:
        out["host"] = host
    return out
