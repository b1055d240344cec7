"""KVM test set-up: skip ``@pytest.mark.kvm`` tests loudly when /dev/kvm is not usable, and
build guest stubs / machines for the tests that run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kvmguest import Guest, make_guest
from stubbuild import build, tools_missing

from vmce.kvm.system import probe

# VMCE_KVM_DEVICE=/nonexistent shows what a machine without KVM gets.
_availability = probe(os.environ.get("VMCE_KVM_DEVICE", "/dev/kvm"))
_stub_tools = tools_missing()


def _skip_reason() -> str | None:
    if not _availability.usable:
        return f"/dev/kvm not usable here: {_availability.reason}; KVM tests skipped"
    if _stub_tools is not None:
        return f"cannot build guest stubs here: {_stub_tools}; KVM tests skipped"
    return None


def pytest_report_header(config: pytest.Config) -> str:
    reason = _skip_reason()
    return reason.upper() if reason else f"KVM: {_availability.reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("kvm") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reason = _skip_reason()
    if reason is not None:
        terminalreporter.write_sep("!", reason, red=True, bold=True)


@pytest.fixture(scope="session")
def stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stubs")


@pytest.fixture(scope="session")
def stub(stub_dir: Path) -> Callable[[str], bytes]:
    """``stub(name)``: the flat binary of guests/stubs/<name>.s."""
    return lambda name: build(name, stub_dir)


@pytest.fixture
def guest(stub: Callable[[str], bytes]) -> Iterator[Callable[..., Guest]]:
    """Factory: ``guest(name, vcpus=1, boot_info=(qwords...), **MachineConfig fields)``."""
    made: list[Guest] = []

    def make(name: str, vcpus: int = 1, boot_info: Sequence[int] = (), **kw: Any) -> Guest:
        g = make_guest(stub(name), vcpus, boot_info, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.machine.close()
