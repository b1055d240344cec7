"""``vmce inject`` as a user runs it, against a control socket served by a fake VM, and the
sample mce-inject files' coverage of the language."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from clihelp import vmce
from qmpfake import FakeVm
from vmce.host.mceinject import Kw, TokenKind, tokenize
from vmce.kvm.qmp.server import QmpServer

DATA = Path(__file__).resolve().parent / "data" / "mce-inject"


def test_sample_files_use_every_keyword() -> None:
    used = {
        t.keyword
        for f in DATA.iterdir()
        for t in tokenize(f.read_text(), f.name)
        if t.kind is TokenKind.KEYWORD
    }
    assert used == set(Kw), sorted(k.value for k in set(Kw) - used)


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[tuple[str, FakeVm]]:
    vm = FakeVm(2)
    path = str(tmp_path / "vm.sock")
    srv = QmpServer(vm, path)  # type: ignore[arg-type]
    srv.start()
    yield path, vm
    srv.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of"),
        (["--hmp", "info status", "--query"], "give exactly one of"),
        (["--hmp", "mce 0 9"], "--hmp: mce: missing argument 'status'"),
        (["--xen", "-t", "9"], "xen-mceinj: -t: no error type 9"),
        (["--xen", "--bogus"], "unknown option '--bogus'"),
        (["/nonexistent/file"], "/nonexistent/file: No such file or directory"),
        (["--path", "sideways", str(DATA / "fatal")], "--path 'sideways'"),
    ],
)
def test_bad_input_is_refused_before_sending(args: list[str], message: str) -> None:
    r = vmce("inject", "--vm", "/nonexistent.sock", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_file_names_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("CPU 0 BANK 1\nSTATUS UNCORRECTED 0x\n")
    r = vmce("inject", "--vm", "/nonexistent.sock", str(bad))
    assert r.returncode == 2 and f"{bad}:2:20: malformed number '0x'" in r.stderr


def test_xen_help_and_no_vmm() -> None:
    r = vmce("inject", "--vm", "/nonexistent.sock", "--xen", "-h")
    assert r.returncode == 0 and "Usage: xen-mceinj" in r.stdout and "MCE_SRAO_LLC" in r.stdout
    r = vmce("inject", "--vm", "/nonexistent.sock", "--query")
    assert r.returncode == 3 and "cannot connect to /nonexistent.sock" in r.stdout


def test_three_syntaxes_against_a_vmm(sock: tuple[str, FakeVm]) -> None:
    path, _vm = sock
    r = vmce("inject", "--vm", path, "--hmp", "mce -b 0 9 0xbd000000000000c0 5 0x3000 0x86")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("vmce: bank 9 is reported in guest bank 1")
    r = vmce("inject", "--vm", path, "--hmp", "mce 0 10 0xbd000000000000c0 5 0 0")
    assert r.returncode == 1 and r.stdout == "Error: Invalid MCE bank number\n"
    r = vmce("inject", "--vm", path, "--xen", "-d", "1", "-p", "0x3000000", "-t", "0", "--json")
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)["return"]
    assert reply["banks"][0]["guest-addr"] == 0x3000000 and reply["type"] == "MCE_SRAO_MEM"
    r = vmce("inject", "--vm", path, "--xen", "-D", "-d", "1", "-p", "0x5000")
    assert r.returncode == 0 and r.stdout.strip() == "Dom1: gaddr=0x5000"
    r = vmce("inject", "--vm", path, str(DATA / "ucna_poll"), "--watch", "--for", "0.3")
    assert r.returncode == 0, r.stderr
    assert "line 2: POLL on CPU 0: bank 1 of vCPU0; #MC on none" in r.stdout
    assert "VMCE_FILLED cpu-index=0 bank=1" in r.stdout and "mce=False" in r.stdout
    r = vmce("inject", "--vm", path, "--query")
    assert r.returncode == 0 and "vCPU 0: MCG_STATUS=0x0 MC1_STATUS=0xbc00000000000000" in (
        r.stdout
    )
