"""Suite-wide policy: where /dev/kvm is usable, a skipped KVM test is a failure.

KVM tests carry the ``kvm`` marker. Without a usable /dev/kvm they skip with a loud reason;
with one, any skip among them fails the run, so CI cannot go green without running them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

# Shared test helpers (clihelp.py) import as top-level modules from every test directory.
sys.path.insert(0, str(Path(__file__).parent))

_skipped_kvm: list[str] = []


def kvm_usable() -> tuple[bool, str]:
    """Whether /dev/kvm can be opened read-write, and why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"/dev/kvm not usable here ({e.strerror}); KVM tests skipped"
    os.close(fd)
    return True, ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and item.get_closest_marker("kvm") is not None:
        _skipped_kvm.append(item.nodeid)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    usable, _ = kvm_usable()
    if usable and _skipped_kvm:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    usable, why = kvm_usable()
    if not usable:
        terminalreporter.write_line(f"WARNING: {why}", yellow=True, bold=True)
    elif _skipped_kvm:
        terminalreporter.write_line(
            f"FAILED: /dev/kvm is usable but {len(_skipped_kvm)} KVM test(s) were skipped:",
            red=True,
            bold=True,
        )
        for nodeid in _skipped_kvm:
            terminalreporter.write_line(f"  {nodeid}", red=True)
