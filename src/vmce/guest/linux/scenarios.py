"""Machine-check scenarios on a booted Linux guest, each ending in a verdict.

Every scenario restores the booted snapshot, injects, and reads the kernel's own messages:
``Memory failure: ...: Recovered`` for a recovery, ``Kernel panic - not syncing: <reason>`` for
a panic, the VMM's stop reason for a shutdown, and silence for a hang. The verdict records
the ``mce=`` monarch timeout the guest booted with, since it decides how long a hang lasts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from vmce.guest.linux.guest import LinuxGuest
from vmce.guest.verdict import Outcome, Verdict, decide
from vmce.host.catalog import lookup
from vmce.vmce import InjectionPolicy

FREE_PAGE = 0x6000000  # 96 MiB: a free page of a freshly booted 256 MiB guest
HOST_ERROR_GPA = 0x6543210


class Scenario(Enum):
    BROADCAST_SRAO = "broadcast-srao"
    VCPU0_SRAO = "vcpu0-srao"
    MCIP_SET = "mcip-set"
    HOST_MEMORY_ERROR = "host-memory-error"
    AMD_SRAO = "amd-srao"

    @property
    def description(self) -> str:
        return _TEXT[self]


_TEXT = {
    Scenario.BROADCAST_SRAO: "SRAO memory scrub on a free page, broadcast to every vCPU (seed)",
    Scenario.VCPU0_SRAO: "the same error to vCPU0 only (pre-seed Xen)",
    Scenario.MCIP_SET: "a second #MC while MCG_STATUS.MCIP is still set",
    Scenario.HOST_MEMORY_ERROR: "a host memory error on a page the guest owns (host path)",
    Scenario.AMD_SRAO: "SRAO memory scrub on an AMD guest profile",
}


@dataclass
class ScenarioResult:
    """A verdict plus what was injected and what the kernel said."""

    scenario: Scenario
    verdict: Verdict
    monarch_timeout_us: int | None
    injected: str
    seconds_to_verdict: float
    messages: list[str] = field(default_factory=list)


SETTLE_LINES = ("Memory failure:", "Kernel panic - not syncing:")


def _settle(g: LinuxGuest, since: int, timeout: float) -> None:
    """Wait for a recovery or a panic after console line ``since``, or a stop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if g.vm.machine.stop_reason is not None:
            return
        if any(m in ln for ln in g.lines[since:] for m in SETTLE_LINES):
            g.vm.wait(1.0)  # let the rest of the report arrive
            return
        g.vm.wait(0.1)


def run(scenario: Scenario, guest: LinuxGuest, *, timeout: float = 120.0) -> ScenarioResult:
    """Run ``scenario`` on a restored, not yet started ``guest``."""
    err = lookup("srao")
    since = len(guest.lines)
    guest.start()
    t0 = time.monotonic()
    injected = ""
    if scenario is Scenario.VCPU0_SRAO:
        guest.vm.domain.policy = InjectionPolicy.VCPU0
    if scenario in (Scenario.BROADCAST_SRAO, Scenario.VCPU0_SRAO, Scenario.AMD_SRAO):
        d = guest.vm.inject(err.record(FREE_PAGE), err.mcg_status)
        injected = d.describe()
    elif scenario is Scenario.MCIP_SET:
        guest.vm.pause()
        first = guest.vm.inject(err.record(FREE_PAGE), err.mcg_status)
        second = guest.vm.inject(err.record(FREE_PAGE + 0x1000), err.mcg_status)
        injected = f"{first.describe()}; then {second.describe()}"
        guest.vm.resume()
    else:
        scrub = lookup("srao").status | 0x00400000 | 0xF  # MSCOD 0x40, MCACOD 0xCF
        report = guest.vm.memory_error(HOST_ERROR_GPA, scrub, misc=0x86)
        injected = report.describe().replace("\n", "; ")
    _settle(guest, since, timeout)
    elapsed = time.monotonic() - t0
    stop = guest.vm.machine.stop_reason
    messages = guest.messages[since:]
    verdict = decide(messages, [], stop, injected=True)
    if verdict.outcome is Outcome.HANG:
        verdict = Verdict(Outcome.HANG, f"no recovery, panic or stop within {timeout:.0f} s")
    return ScenarioResult(
        scenario, verdict, guest.config.monarch_timeout_us, injected, elapsed, messages
    )


OnLine = Callable[[str], None]
