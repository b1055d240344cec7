"""What happened to a guest, decided from its console and the VMM's stop reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from vmce.guest.events import GuestEvent
from vmce.kvm.stop import StopKind, StopReason

PANIC_PREFIX = "Kernel panic - not syncing: "


class Outcome(Enum):
    """The broad result of a machine-check scenario."""

    RECOVERED = "recovered"
    PANIC = "panic"
    SHUTDOWN = "shutdown"
    HANG = "hang"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "vmm-failure"


@dataclass(frozen=True)
class Verdict:
    """An outcome with its reason in the guest's or the VMM's own words."""

    outcome: Outcome
    reason: str
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.outcome.value}: {self.reason}" if self.reason else self.outcome.value


_VMM_FAILURES = {
    StopKind.VMM_ERROR,
    StopKind.FAIL_ENTRY,
    StopKind.INTERNAL_ERROR,
    StopKind.EMULATION_FAILURE,
    StopKind.UNHANDLED_EXIT,
}


def decide(
    lines: Sequence[str],
    events: Sequence[GuestEvent],
    stop: StopReason | None,
    *,
    injected: bool,
) -> Verdict:
    """The verdict for a run whose console is ``lines``/``events`` and that stopped (or not)."""
    panic = next((ln for ln in lines if ln.startswith(PANIC_PREFIX)), None)
    if panic is not None:
        causes = [ln for ln in lines if "Machine check:" in ln or "not responding" in ln]
        return Verdict(Outcome.PANIC, panic[len(PANIC_PREFIX) :], causes)
    if stop is not None and stop.kind in (StopKind.SHUTDOWN, StopKind.SHUTDOWN_REQUESTED):
        return Verdict(Outcome.SHUTDOWN, stop.message)
    if stop is not None and stop.kind in _VMM_FAILURES:
        return Verdict(Outcome.FAILED, stop.message)
    recovered = [ln for ln in lines if "recovery action for" in ln or "Sending SIGBUS" in ln]
    if injected and recovered:
        return Verdict(Outcome.RECOVERED, recovered[-1], recovered)
    if stop is not None and stop.kind is StopKind.GUEST_EXIT:
        return Verdict(Outcome.EXITED, stop.message)
    handled = [e for e in events if e.kind == "mce-exit"]
    if injected and not handled:
        return Verdict(Outcome.HANG, "the guest never finished its #MC handler")
    if injected:
        return Verdict(Outcome.RECOVERED, "the #MC was handled and the guest goes on")
    return Verdict(Outcome.RUNNING, "")
