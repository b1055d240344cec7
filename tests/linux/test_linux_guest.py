"""Stock Debian Linux taking vmce's machine checks: boot once per profile, restore per test.

The first run on a machine fetches the Debian packages and boots (about 2 minutes per
profile on kvm_pvm); the snapshot is cached, so later runs only restore.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmce.guest.linux.guest import LinuxConfig
from vmce.guest.linux.material import Material, prepare
from vmce.guest.linux.scenarios import FREE_PAGE, HOST_ERROR_GPA, Scenario, run
from vmce.guest.linux.snapshot import booted_guest
from vmce.guest.verdict import Outcome
from vmce.vmce import HostProfile

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

TIMEOUT_PANIC = "Timeout: Not all CPUs entered broadcast exception handler"


@pytest.fixture(scope="session")
def material() -> Material:
    return prepare()


def intel() -> LinuxConfig:
    return LinuxConfig()


def amd() -> LinuxConfig:
    return LinuxConfig(profile=HostProfile.amd())


@pytest.fixture
def run_scenario(material: Material) -> Iterator[object]:
    made = []

    def go(scenario: Scenario, config: LinuxConfig):  # type: ignore[no-untyped-def]
        guest, _ = booted_guest(config, material)
        made.append(guest)
        return run(scenario, guest, timeout=90)

    yield go
    for g in made:
        g.close()


def test_broadcast_srao_recovers(run_scenario) -> None:  # type: ignore[no-untyped-def]
    r = run_scenario(Scenario.BROADCAST_SRAO, intel())
    assert r.verdict.outcome is Outcome.RECOVERED, r.messages
    pfn = FREE_PAGE >> 12
    assert r.verdict.reason == (
        f"Memory failure: {pfn:#x}: recovery action for free buddy page: Recovered"
    )
    assert "mce: [Hardware Error]: Machine check events logged" in r.messages
    assert r.monarch_timeout_us == 2000


def test_vcpu0_only_panics_on_the_rendezvous_timeout(run_scenario) -> None:  # type: ignore[no-untyped-def]
    r = run_scenario(Scenario.VCPU0_SRAO, intel())
    assert r.verdict.outcome is Outcome.PANIC, r.messages
    assert r.verdict.reason == TIMEOUT_PANIC
    assert any("CPUs not responding to MCE broadcast" in m for m in r.messages)


def test_mc_while_mcip_set_shuts_the_guest_down(run_scenario) -> None:  # type: ignore[no-untyped-def]
    r = run_scenario(Scenario.MCIP_SET, intel())
    assert r.verdict.outcome is Outcome.SHUTDOWN, r.messages
    assert "MCIP" in r.verdict.reason and "triple fault" in r.verdict.reason


def test_host_memory_error_reaches_the_guest_at_its_own_address(run_scenario) -> None:  # type: ignore[no-untyped-def]
    r = run_scenario(Scenario.HOST_MEMORY_ERROR, intel())
    assert r.verdict.outcome is Outcome.RECOVERED, r.messages
    # mce=print_all shows the record: MSCOD (0x0040 in the host's status) is gone ...
    assert any("Machine Check Exception: 5 Bank 1: bd000000000000cf" in m for m in r.messages)
    # ... and the address is the guest-physical one (masked to MISC's LSB 6 by Linux).
    gaddr = HOST_ERROR_GPA & ~0x3F
    assert any(f"ADDR {gaddr:x} MISC 86" in m for m in r.messages), r.messages
    assert f"Memory failure: {HOST_ERROR_GPA >> 12:#x}:" in r.verdict.reason


def test_amd_profile_has_no_recovery(run_scenario) -> None:  # type: ignore[no-untyped-def]
    r = run_scenario(Scenario.AMD_SRAO, amd())
    assert r.verdict.outcome is Outcome.PANIC, r.messages
    assert r.verdict.reason == "Fatal local machine check"
    assert any(
        "Machine check: Uncorrected error without MCA Recovery" in m
        for m in r.verdict.details + r.messages
    )


def test_vmce_run_guest_linux_cli(material: Material) -> None:
    """vmce run --guest linux, as a user types it, from the cached snapshot."""
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmce.cli.main",
            "run",
            "--guest",
            "linux",
            "--inject",
            "srao",
            "--addr",
            "0x5000000",
            "--timeout",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert data["verdict"] == "recovered"
    assert (
        data["reason"] == "Memory failure: 0x5000: recovery action for free buddy page: Recovered"
    )
