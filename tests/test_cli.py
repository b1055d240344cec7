"""The ``vmce`` command driven as a user would: a subprocess, its output and exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clihelp import vmce
from vmce.save.hvmctx import Descriptor, Header, HvmContext
from vmce.vmce import Domain, HostProfile

ROOT = Path(__file__).resolve().parent.parent


def test_decode_status_text() -> None:
    r = vmce("decode", "0xbd000000123400c0", "--misc", "0x86")
    assert r.returncode == 0, r.stderr
    assert "VAL|UC|EN|MISCV|ADDRV|S MSCOD=0x1234 MCACOD=0x00c0" in r.stdout
    assert "SRAO" in r.stdout and "0xbd000000000000c0" in r.stdout
    assert "address physical: True" in r.stdout


@pytest.mark.parametrize(
    ("value", "kind", "render"),
    [
        ("0x5", "mcg-status", "MCIP|RIPV"),
        ("0x1000c02", "mcg-cap", "SER_P|TES_P|CMCI_P COUNT=0x02"),
        ("0x86", "misc", "MODE=0x2 LSB=0x06"),
        ("010", "mcg-status", "LMCE"),
    ],
)
def test_decode_json(value: str, kind: str, render: str) -> None:
    r = vmce("decode", value, "--kind", kind, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["render"] == render


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["decode", "0x1ffffffffffffffff"], "does not fit in 64 bits"),
        (["decode", "banana"], "is not a number"),
        (["decode", "-k", "nope", "1"], "unknown --kind 'nope'"),
        (["decode", "09"], "is not a number"),
    ],
)
def test_decode_bad_input(args: list[str], message: str) -> None:
    r = vmce(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_hvmctx_dump(tmp_path: Path) -> None:
    d = Domain(HostProfile.intel(), 2)
    d.wrmsr(1, 0x281, 0x40000001)
    f = tmp_path / "ctx.bin"
    f.write_bytes(HvmContext.from_domain(d, gtsc_khz=2000).encode())
    r = vmce("hvmctx", "dump", str(f), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["header"]["gtsc_khz"] == 2000
    rec = data["records"][1]
    assert rec["type"] == "VMCE_VCPU" and rec["instance"] == 1
    assert rec["vmce"]["mci_ctl2_bank1"] == "0x40000001"
    assert rec["vmce"]["caps_decoded"] == "SER_P|TES_P|CMCI_P COUNT=0x02"
    text = vmce("hvmctx", "dump", str(f))
    assert "VMCE_VCPU" in text.stdout and "v3 (Xen 4.10)" in text.stdout


def test_hvmctx_dump_bad_blob(tmp_path: Path) -> None:
    f = tmp_path / "bad.bin"
    f.write_bytes(Descriptor(1, 0, 24).pack() + Header(magic=7).pack())
    r = vmce("hvmctx", "dump", str(f))
    assert r.returncode == 2 and "bad magic 0x7" in r.stderr and "Traceback" not in r.stderr
    r = vmce("hvmctx", "dump", str(tmp_path / "missing.bin"))
    assert r.returncode == 2 and "No such file" in r.stderr


def test_mce_inject_check_examples() -> None:
    r = vmce(
        "mce-inject",
        "check",
        str(ROOT / "examples/mce-inject/srao_mem_scrub"),
        "--cpus",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    inj = json.loads(r.stdout)["injections"]
    assert len(inj) == 1 and inj[0]["mode"] == "EXCP"
    vc = inj[0]["vcpus"]
    assert [v["vcpu"] for v in vc] == [0, 1, 2]
    assert vc[0]["status"] == "0xbd000000000000c0" and vc[0]["class"] == "SRAO"
    assert vc[0]["bank"] == 1 and vc[0]["source_bank"] == 2
    assert vc[1]["mcg_status"] == "0x5" and vc[1]["status"] == "0x2000000000000000"
    r = vmce("mce-inject", "check", str(ROOT / "examples/mce-inject/srar_usr_dcu"), "--json")
    vc = json.loads(r.stdout)["injections"][0]["vcpus"]
    assert len(vc) == 1 and vc[0]["class"] == "SRAR"  # NOBROADCAST


def test_mce_inject_check_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "half.mce"
    f.write_text("CPU 0 BANK 1\nSTATUS UNCORRECTED\nADDR\n")
    r = vmce("mce-inject", "check", str(f))
    assert r.returncode == 2
    assert r.stderr.strip() == f"vmce: error: {f}:3:5: ADDR expects a number, found end of input"
    f.write_text("CPU 9 STATUS UC\n")
    r = vmce("mce-inject", "check", str(f), "--cpus", "2")
    assert r.returncode == 2 and "CPU 9 is not online" in r.stderr


def test_demo_model_runs() -> None:
    r = vmce("demo", "--vcpus", "2", "--model")
    assert r.returncode == 0, r.stderr
    assert "policy broadcast" in r.stdout and "policy vcpu0" in r.stdout
