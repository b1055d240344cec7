"""The QEMU monitor's ``mce`` and xen-mceinj's command line, parsed without a VM."""

from __future__ import annotations

import pytest

from vmce.host.hmp import (
    BROADCAST_MCG_STATUS,
    BROADCAST_STATUS,
    HmpError,
    HmpInfo,
    HmpMce,
    HmpSimple,
    help_text,
    parse,
    plan_mce,
)
from vmce.host.xenmceinj import (
    DEFAULT_ADDR,
    ERROR_TYPES,
    USAGE,
    XenMceInjError,
    parse_args,
    table_text,
)
from vmce.vmce.direct import Merge

# -- HMP -------------------------------------------------------------------------------------


def test_mce_line_as_qemu_reads_it() -> None:
    cmd = parse("mce -b 0 9 0xbd000000000000c0 0x5 0x3000000 0x86")
    assert cmd == HmpMce(True, 0, 9, 0xBD000000000000C0, 5, 0x3000000, 0x86)
    assert parse("mce 1 010 0xbd80000000000134 7 0 0") == HmpMce(
        False, 1, 8, 0xBD80000000000134, 7, 0, 0
    )  # 010 is octal, as strtoull(..., 0) reads it


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("mce 0 9 0xbd 5 0", "missing argument 'misc'"),
        ("mce 0 9 0xbd 5 0 0 7", "too many arguments"),
        ("mce 0 9 0xzz 5 0 0", "invalid status '0xzz'"),
        ("mce 0 9 09 5 0 0", "invalid status '09'"),
        ("mce 0 9 0x1ffffffffffffffff 5 0 0", "too large"),
        ("mce -x 0 9 1 5 0 0", "unsupported option '-x'"),
        ("frobnicate", "unknown command: 'frobnicate'"),
        ("info", "missing subcommand"),
        ("info nothing", "unknown subcommand 'nothing'"),
        ("stop now", "too many arguments"),
        ("", "empty command line"),
        ("mce 'unterminated", "cannot parse"),
    ],
)
def test_bad_lines(line: str, message: str) -> None:
    with pytest.raises(HmpError, match=message):
        parse(line)


def test_other_commands_and_help() -> None:
    assert parse("info registers -a") == HmpInfo("registers", True)
    assert parse("info mce") == HmpInfo("mce")
    assert parse("c") == HmpSimple("cont") and parse("q") == HmpSimple("quit")
    assert parse("help mce") == HmpSimple("help mce")
    assert "mce [-b] cpu bank status mcgstatus addr misc" in help_text("mce")
    assert "info registers" in help_text("info")
    with pytest.raises(HmpError):
        help_text("nope")


def test_plan_broadcast_is_qemus() -> None:
    plan = plan_mce(parse("mce -b 1 9 0xbd000000000000c0 0x5 0x3000000 0x86"), 4)  # type: ignore[arg-type]
    first, *others = plan.loads
    assert (first.vcpu, first.status, first.addr, first.misc, first.mcg_status) == (
        1,
        0xBD000000000000C0,
        0x3000000,
        0x86,
        5,
    )
    assert first.raise_mc and first.merge is Merge.QEMU and plan.uncorrected
    assert [o.vcpu for o in others] == [0, 2, 3]
    assert all(
        (o.status, o.addr, o.misc, o.mcg_status, o.raise_mc)
        == (BROADCAST_STATUS, 0, 0, BROADCAST_MCG_STATUS, True)
        for o in others
    )
    assert BROADCAST_STATUS == 0xA000000000000000 and BROADCAST_MCG_STATUS == 0x5
    assert any("bank 9 is reported in guest bank 1" in n for n in plan.notes)


def test_plan_checks_in_qemus_order_and_words() -> None:
    def plan(line: str, n: int = 2, bc: bool = True) -> object:
        return plan_mce(parse(line), n, broadcast_supported=bc)  # type: ignore[arg-type]

    with pytest.raises(HmpError, match=r"^CPU #2 not found$"):
        plan("mce 2 10 0 0 0 0")
    with pytest.raises(HmpError, match=r"^Invalid MCE bank number$"):
        plan("mce 0 10 0 0 0 0")
    with pytest.raises(HmpError, match=r"^Invalid MCE status code$"):
        plan("mce 0 9 0x3d000000000000c0 5 0 0")
    with pytest.raises(HmpError, match=r"^Guest CPU does not support MCA broadcast$"):
        plan("mce -b 0 9 0xbd000000000000c0 5 0 0", bc=False)
    assert plan("mce 0 0 0xbd000000000000c0 5 0 0")  # bank 0 maps onto bank 1 too


def test_plan_corrected_error_fills_without_mc() -> None:
    p = plan_mce(parse("mce 0 1 0x9c000000123400c0 0x5 0x1000 0x86"), 1)  # type: ignore[arg-type]
    (ld,) = p.loads
    assert not ld.raise_mc and ld.mcg_status is None and not p.uncorrected
    assert any("MSCOD masked" in n for n in p.notes)
    assert any("no #MC" in n for n in p.notes)


# -- xen-mceinj ------------------------------------------------------------------------------


def test_defaults_and_table() -> None:
    o = parse_args([])
    assert (o.cpu, o.addr, o.type, o.lmce, o.dump, o.guest_address) == (
        0,
        DEFAULT_ADDR,
        0,
        False,
        False,
        False,
    )
    assert o.dump_text() == "Xen: gaddr=0x180020"
    t0 = ERROR_TYPES[0]
    assert (t0.bank, t0.status, t0.misc, t0.mcg_status) == (7, 0xBD2000008000017A, 0x86, 5)
    assert "MCE_SRAO_MEM" in table_text() and "Usage: xen-mceinj" in USAGE


def test_the_usual_guest_injection() -> None:
    o = parse_args(["-d", "1", "-p", "0x3000000", "-t", "0"])
    assert (o.domid, o.addr, o.type, o.guest_address) == (1, 0x3000000, 0, True)
    assert o.dump_text() == "Dom1: gaddr=0x3000000" and o.mcg_status == 0x5


def test_fixed_option_bugs() -> None:
    # long options take their value (the tool declared them without one) and --type exists
    o = parse_args(["--cpu=2", "--domain", "1", "--page=0x1000", "--type", "1", "--lmce"])
    assert (o.cpu, o.domid, o.addr, o.type, o.lmce) == (2, 1, 0x1000, 1, True)
    assert o.mcg_status == 0x5 | 0x8
    assert parse_args(["-Dl", "-c3", "-d1"]) == parse_args(["-D", "-l", "-c", "3", "-d", "1"])
    assert parse_args(["-h"]).help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "unknown option '-x'"),  # the tool printed help and exited 0
        (["--cpu"], "--cpu needs a value"),
        (["-c", "1x"], "'1x' is not a number"),  # trailing garbage
        (["-t", "5"], "no error type 5"),  # the tool did not validate the index
        (["-t", "2", "-l"], "No support to inject CMCI as LMCE"),
        (["-c", "99999"], "out of range"),
        (["-d", "0x10000"], "out of range"),
        (["stray"], "unexpected argument 'stray'"),
        (["--dump=1"], "--dump takes no value"),
    ],
)
def test_refused_lines(args: list[str], message: str) -> None:
    with pytest.raises(XenMceInjError, match=message):
        parse_args(args)
