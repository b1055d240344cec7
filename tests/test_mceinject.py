"""Tests for the mce-inject input language (vmce.host.mceinject; reference section 3.10)."""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmce.host.mceinject import (
    Broadcast,
    Context,
    Injection,
    Kw,
    MceInjectSyntaxError,
    MceRecord,
    Mode,
    Processor,
    TokenKind,
    broadcast_records,
    default_mode,
    parse,
    parse_file,
    resolve,
    target_cpu,
    tokenize,
)
from vmce.mca.constants import (
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_ADDRV,
    MCI_STATUS_EN,
    MCI_STATUS_MISCV,
    MCI_STATUS_S,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
)

U64 = (1 << 64) - 1


def one(text: str) -> MceRecord:
    """The single record of ``text``."""
    records = parse(text)
    assert len(records) == 1
    return records[0]


def variants(word: str) -> list[str]:
    """Upper, lower and mixed-case spellings of a keyword."""
    mixed = "".join(c.lower() if i % 2 else c.upper() for i, c in enumerate(word))
    return sorted({word.upper(), word.lower(), mixed, word.capitalize()})


# ------------------------------------------------------------------------------------------
# Tokenizer


def test_tokens_carry_line_and_column() -> None:
    toks = tokenize("CPU 0 # c\n  status\tUC 0x1f\n")
    got = [(t.kind, t.text, t.line, t.column) for t in toks]
    assert got == [
        (TokenKind.KEYWORD, "CPU", 1, 1),
        (TokenKind.NUMBER, "0", 1, 5),
        (TokenKind.KEYWORD, "status", 2, 3),
        (TokenKind.KEYWORD, "UC", 2, 10),
        (TokenKind.NUMBER, "0x1f", 2, 13),
        (TokenKind.EOF, "", 2, 17),
    ]
    assert toks[2].keyword is Kw.STATUS
    assert toks[4].value == 0x1F


def test_punctuation_and_symbols() -> None:
    toks = tokenize("RIP 0x10:<0x5>{do_machine_check}")
    kinds = [t.kind for t in toks]
    assert kinds == [
        TokenKind.KEYWORD,
        TokenKind.NUMBER,
        TokenKind.PUNCT,
        TokenKind.PUNCT,
        TokenKind.NUMBER,
        TokenKind.PUNCT,
        TokenKind.PUNCT,
        TokenKind.SYMBOL,
        TokenKind.PUNCT,
        TokenKind.EOF,
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("7", 7),
        ("42", 42),
        ("0x1f", 31),
        ("0X1F", 31),
        ("0xdeadBABE", 0xDEADBABE),
        ("017", 15),
        ("00", 0),
        ("12343434", 12343434),
        ("0xffffffffffffffff", U64),
        ("18446744073709551615", U64),
        ("01777777777777777777777", U64),
    ],
)
def test_numbers_in_c_syntax(text: str, value: int) -> None:
    assert one(f"CPU 0 ADDR {text}").addr == value


def test_empty_and_comment_only_inputs_have_no_records() -> None:
    assert parse("") == []
    assert parse("\n\n  \t\n") == []
    assert parse("# nothing\n   # at all\n#") == []


def test_comments_run_to_end_of_line() -> None:
    text = (
        "# header\nCPU 0 BANK 1 # trailing STATUS FATAL\nSTATUS VAL#glued\n# tail without newline"
    )
    r = one(text)
    assert (r.bank, r.status) == (1, MCI_STATUS_VAL)


def test_crlf_line_endings() -> None:
    r = one("CPU 1\r\nBANK 2\r\nSTATUS CORRECTED\r\n")
    assert (r.cpu, r.bank, r.status) == (1, 2, MCI_STATUS_VAL | MCI_STATUS_EN)


# ------------------------------------------------------------------------------------------
# Keywords


STATUS_CASES = {
    "VAL": 1 << 63,
    "OVER": 1 << 62,
    "UC": 1 << 61,
    "EN": 1 << 60,
    "PCC": 1 << 57,
    "S": 1 << 56,
    "AR": 1 << 55,
    "TES_YELLOW": 1 << 54,
    "CORRECTED": (1 << 63) | (1 << 60),
    "UNCORRECTED": (1 << 63) | (1 << 61) | (1 << 60),
    "FATAL": (1 << 63) | (1 << 61) | (1 << 60) | (1 << 57),
    "UCNA": 0,
    "SRAO": 1 << 56,
    "SRAR": (1 << 56) | (1 << 55),
}

MCG_CASES = {"RIPV": 1, "EIPV": 2, "MCIP": 4, "LMCES": 8, "TES_P": 0x800, "SEAM_NR": 0x1000}


@pytest.mark.parametrize(
    ("word", "value"),
    [(v, value) for word, value in STATUS_CASES.items() for v in variants(word)],
)
def test_status_symbols(word: str, value: int) -> None:
    assert one(f"CPU 0 STATUS {word}").status == value


@pytest.mark.parametrize(
    ("word", "value"),
    [(v, value) for word, value in MCG_CASES.items() for v in variants(word)],
)
def test_mcgstatus_symbols(word: str, value: int) -> None:
    assert one(f"cpu 0 MCGSTATUS {word}").mcg_status == value


def test_value_lists_or_symbols_and_numbers() -> None:
    r = one("CPU 0 STATUS VAL uc 0x134 0x1000 MCGSTATUS ripv 0x10 MCIP")
    assert r.status == (1 << 63) | (1 << 61) | 0x1134
    assert r.mcg_status == 0x15


def test_empty_value_lists_are_zero_as_in_mce_y() -> None:
    r = one("CPU 0 STATUS BANK 3 MCGSTATUS")
    assert (r.status, r.bank, r.mcg_status) == (0, 3, 0)


@pytest.mark.parametrize(
    ("word", "attr"),
    [
        (v, attr)
        for word, attr in [
            ("BANK", "bank"),
            ("TSC", "tsc"),
            ("TIME", "time"),
            ("SOCKETID", "socketid"),
            ("APICID", "apicid"),
            ("MCGCAP", "mcgcap"),
        ]
        for v in variants(word)
    ],
)
def test_number_terms(word: str, attr: str) -> None:
    r = one(f"CPU 0 {word} 0x2a")
    assert getattr(r, attr) == 42
    assert r.status == 0


@pytest.mark.parametrize("word", variants("ADDR"))
def test_addr_sets_addrv(word: str) -> None:
    r = one(f"CPU 0 STATUS UC {word} 0x1234")
    assert (r.addr, r.status) == (0x1234, MCI_STATUS_UC | MCI_STATUS_ADDRV)


@pytest.mark.parametrize("word", variants("MISC"))
def test_misc_sets_miscv(word: str) -> None:
    r = one(f"CPU 0 STATUS UC {word} 0x8c")
    assert (r.misc, r.status) == (0x8C, MCI_STATUS_UC | MCI_STATUS_MISCV)


def test_addr_zero_still_sets_addrv() -> None:
    assert one("CPU 0 ADDR 0").status == MCI_STATUS_ADDRV


@pytest.mark.parametrize(
    ("text", "cs", "rip"),
    [
        ("RIP 12343434", None, 12343434),
        ("rip 0x10:0xdeadbabe", 0x10, 0xDEADBABE),
        ("RIP 0x73 : 0x1eadbabe", 0x73, 0x1EADBABE),
        ("RIP 0x10:<0xffffffff8100ab3c>{mce_start}", 0x10, 0xFFFFFFFF8100AB3C),
        ("RIP 0x10:< 0x1234 > { poll }", 0x10, 0x1234),  # any identifier as the symbol
    ],
)
def test_rip_forms(text: str, cs: int | None, rip: int) -> None:
    r = one(f"CPU 0 {text}")
    assert (r.cs, r.rip) == (cs, rip)


@pytest.mark.parametrize("word", variants("PROCESSOR"))
def test_processor(word: str) -> None:
    assert one(f"CPU 0 {word} 0:0x306c3").processor == Processor(0, 0x306C3)


@pytest.mark.parametrize(
    ("word", "broadcast"),
    [
        (v, b)
        for w, b in [
            ("NOBROADCAST", Broadcast.NOBROADCAST),
            ("IRQBROADCAST", Broadcast.IRQBROADCAST),
            ("NMIBROADCAST", Broadcast.NMIBROADCAST),
        ]
        for v in variants(w)
    ],
)
def test_broadcast_words(word: str, broadcast: Broadcast) -> None:
    r = one(f"CPU 0 STATUS UC {word}")
    assert (r.mode, r.broadcast) == (Mode.EXCP, broadcast)


@pytest.mark.parametrize(
    ("word", "context"),
    [(v, Context.IN_IRQ) for v in variants("IN_IRQ")]
    + [(v, Context.IN_PROC) for v in variants("IN_PROC")],
)
def test_context_words(word: str, context: Context) -> None:
    assert one(f"CPU 0 STATUS UC {word}").context is context


@pytest.mark.parametrize("word", variants("HOLD"))
def test_hold(word: str) -> None:
    assert one(f"CPU 0 STATUS UC {word}").hold


@pytest.mark.parametrize(
    ("word", "mode"),
    [(v, Mode.POLL) for v in variants("POLL")] + [(v, Mode.EXCP) for v in variants("EXCP")],
)
def test_explicit_mode_overrides_the_default(word: str, mode: Mode) -> None:
    assert one(f"CPU 0 STATUS UC {word}").mode is mode
    assert one(f"CPU 0 STATUS VAL {word}").mode is mode


def test_record_defaults() -> None:
    r = one("CPU 3 BANK 1")
    assert r == MceRecord(cpu=3, bank=1, mode=Mode.POLL, broadcast=Broadcast.NOBROADCAST)
    assert (r.context, r.hold, r.cs, r.processor) == (Context.RANDOM, False, None, None)


# ------------------------------------------------------------------------------------------
# Record starts and record boundaries


@pytest.mark.parametrize("word", variants("CPU"))
def test_cpu_start(word: str) -> None:
    r = one(f"{word} 5 STATUS VAL")
    assert (r.cpu, r.bank, r.line) == (5, 0, 1)


def test_cpu_bank_start() -> None:
    r = one("CPU 2 7 STATUS VAL")
    assert (r.cpu, r.bank) == (2, 7)


@pytest.mark.parametrize("word", variants("MCE"))
def test_mce_start_has_no_cpu(word: str) -> None:
    r = one(f"{word} BANK 1")
    assert r.cpu is None
    assert target_cpu(r) == 0


@pytest.mark.parametrize(
    "text",
    [
        "CPU 1: MACHINE CHECK EXCEPTION: 5 BANK 4: 0xb200000000070f0f\n"
        "RIP 0x10:<0xffffffff8100ab3c>{mce_start}\nTSC 0x2ba4d0b0cf4",
        "cpu 1 : Machine Check Exception : 5 Bank 4 : 0xb200000000070f0f "
        "rip 0x10:<0xffffffff8100ab3c> {mce_start} tsc 0x2ba4d0b0cf4",
    ],
)
def test_kernel_log_form(text: str) -> None:
    r = one(text)
    assert (r.cpu, r.bank, r.mcg_status) == (1, 4, 5)
    assert r.status == 0xB200000000070F0F
    assert (r.cs, r.rip, r.tsc) == (0x10, 0xFFFFFFFF8100AB3C, 0x2BA4D0B0CF4)
    assert r.mode is Mode.EXCP


def test_several_records_per_line() -> None:
    rs = parse("CPU 0 STATUS UC CPU 1 2 STATUS VAL MCE BANK 3 CPU 4 BANK 5 HOLD\nCPU 6 TSC 1")
    assert [(r.cpu, r.bank, r.line) for r in rs] == [
        (0, 0, 1),
        (1, 2, 1),
        (None, 3, 1),
        (4, 5, 1),
        (6, 0, 2),
    ]
    assert [r.mode for r in rs] == [Mode.EXCP, Mode.POLL, Mode.POLL, Mode.POLL, Mode.POLL]


def test_record_line_is_where_it_started() -> None:
    rs = parse("# x\n\nCPU 0\n  BANK 1\n\nCPU 1 BANK 2\n")
    assert [r.line for r in rs] == [3, 6]


def test_repeated_terms_overwrite_as_in_mce_y() -> None:
    r = one("CPU 0 BANK 1 BANK 2 STATUS UC STATUS VAL MCGSTATUS MCIP MCGSTATUS RIPV")
    assert (r.bank, r.status, r.mcg_status) == (2, MCI_STATUS_VAL, MCG_STATUS_RIPV)


def test_status_after_addr_replaces_addrv() -> None:
    # mce.y: ADDR ORs ADDRV into m.status, a later STATUS assigns m.status.
    r = one("CPU 0 ADDR 0x1000 MISC 0x8c STATUS UC")
    assert (r.addr, r.misc, r.status) == (0x1000, 0x8C, MCI_STATUS_UC)


def test_rip_without_cs_keeps_an_earlier_cs() -> None:
    assert (one("CPU 0 RIP 0x73:0x10 RIP 0x20").cs, one("CPU 0 RIP 0x20").cs) == (0x73, None)


def test_last_context_and_mode_win_and_broadcast_words_accumulate() -> None:
    r = one("CPU 0 STATUS VAL IN_IRQ IN_PROC POLL EXCP NOBROADCAST IRQBROADCAST")
    assert (r.context, r.mode) == (Context.IN_PROC, Mode.EXCP)
    assert r.broadcast == Broadcast.NOBROADCAST | Broadcast.IRQBROADCAST


# ------------------------------------------------------------------------------------------
# Delivery defaults


@pytest.mark.parametrize(
    ("status", "mode"),
    [("UC", Mode.EXCP), ("FATAL", Mode.EXCP), ("CORRECTED", Mode.POLL), ("VAL S AR", Mode.POLL)],
)
def test_default_mode_follows_uc(status: str, mode: Mode) -> None:
    r = one(f"CPU 0 STATUS {status}")
    assert r.mode is mode is default_mode(r.status)


def test_default_mode_uses_the_final_status() -> None:
    assert one("CPU 0 STATUS UC STATUS VAL").mode is Mode.POLL
    assert one("CPU 0 STATUS VAL STATUS UC").mode is Mode.EXCP


@pytest.mark.parametrize("words", ["POLL", "POLL IRQBROADCAST NMIBROADCAST", "NMIBROADCAST"])
def test_poll_implies_nobroadcast(words: str) -> None:
    for status in ("UC", "VAL"):
        r = one(f"CPU 0 STATUS {status} {words}")
        if r.mode is Mode.POLL:
            assert r.broadcast == Broadcast.NOBROADCAST


def test_uncorrected_exception_broadcasts_by_default() -> None:
    assert one("CPU 0 STATUS UNCORRECTED").broadcast == Broadcast.DEFAULT


# ------------------------------------------------------------------------------------------
# Real input files (mce-inject test/*, mce-test cases/coverage/soft-inj/*/data/*)

REAL_FILES: dict[str, tuple[str, dict[str, object]]] = {
    "mce-inject/test/fatal": (
        "# WARNING\n# this will panic your machine!\n# don't try casually\n"
        "CPU 0\nSTATUS fatal\nRIP 12343434\n\n",
        dict(cpu=0, bank=0, status=0xB200000000000000, mcg_status=0, rip=12343434, cs=None),
    ),
    "mce-inject/test/uncorrected-seam-nr": (
        "# this is used for testing MCE during TDX SEAM non-root mode\n"
        "CPU 0 BANK 1\nMCGSTATUS RIPV EIPV MCIP LMCES SEAM_NR\nNOBROADCAST\n"
        "STATUS UNCORRECTED AR S 0x134\nADDR 0x1234\nMISC 0x8\nRIP 0xdeadbabe\n",
        dict(
            bank=1,
            mcg_status=0x100F,
            status=0xBD80000000000134,
            addr=0x1234,
            misc=0x8,
            rip=0xDEADBABE,
            cs=None,
            broadcast=Broadcast.NOBROADCAST,
        ),
    ),
    "mce-inject/test/corrected-yellow": (
        "# Log corrected errors with yellow status.\n"
        "CPU 0 BANK 3\nMCGSTATUS TES_P\nSTATUS CORRECTED TES_YELLOW\n",
        dict(bank=3, mcg_status=0x800, status=0x9040000000000000, mode=Mode.POLL),
    ),
    "panic/data/fatal": (
        "CPU 0 BANK 4\nMCGSTATUS MCIP\nSTATUS FATAL S\nRIP 12343434\nMISC 11\n",
        dict(bank=4, mcg_status=4, status=0xBB00000000000000, rip=12343434, misc=11),
    ),
    "panic/data/fatal_no_en": (
        "CPU 0 BANK 4\nMCGSTATUS MCIP\nSTATUS UC VAL PCC S\nRIP 0x10:12343434\nMISC 11\n",
        dict(status=0xAB00000000000000, cs=0x10, rip=12343434, mode=Mode.EXCP),
    ),
    "panic/data/fatal_timeout": (
        "CPU 0 BANK 4\nMCGSTATUS MCIP\nSTATUS FATAL S\nRIP 0x10:0x12343434\nMISC 0xb\n"
        "NOBROADCAST\n",
        dict(
            mcg_status=4,
            status=0xBB00000000000000,
            cs=0x10,
            rip=0x12343434,
            misc=0xB,
            broadcast=Broadcast.NOBROADCAST,
        ),
    ),
    "panic_npcc/data/uc_no_mcip": (
        "CPU 0 BANK 1\nSTATUS UNCORRECTED S\nADDR 0x1234\nRIP 0x10:0xdeadbabe\n",
        dict(bank=1, mcg_status=0, status=0xB500000000000000, addr=0x1234, cs=0x10),
    ),
    "panic_npcc/data/uc_no_eripv": (
        "CPU 0 BANK 1\nSTATUS UNCORRECTED S\nMCGSTATUS MCIP\nADDR 0x1234\nRIP 0x10:0xdeadbabe\n",
        dict(mcg_status=4, status=0xB500000000000000, rip=0xDEADBABE),
    ),
    "panic_npcc/data/uncorrected": (
        "# this should just kill the process\nCPU 0 BANK 2\nSTATUS UNCORRECTED S\n"
        "MCGSTATUS EIPV MCIP\nADDR 0x1234\nRIP 0x10:0xdeadbabe\nIN_PROC",
        dict(bank=2, mcg_status=6, status=0xB500000000000000, context=Context.IN_PROC),
    ),
    "panic_npcc/data/unknown": (
        "# this should just kill the process\nCPU 0 BANK 2\nSTATUS UC S\n",
        dict(bank=2, status=0x2100000000000000, mode=Mode.EXCP),
    ),
    "panic_ucr/data/s0_ar1": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED AR\nMCGSTATUS RIPV EIPV MCIP\nADDR 0x1234\n"
        "RIP 0x10:0xdeadbabe\n",
        dict(status=0xB480000000000000, mcg_status=7),
    ),
    "panic_ucr/data/srar_over": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAR OVER\nMCGSTATUS EIPV MCIP\nADDR 0x1234\n"
        "RIP 0x73:0x1eadbabe\n",
        dict(status=0xF580000000000000, mcg_status=6, cs=0x73, rip=0x1EADBABE),
    ),
    "panic_ucr/data/srar_unkown": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAR\nMCGSTATUS EIPV MCIP\nADDR 0x1234\n"
        "RIP 0x73:0x2eadbabe\n",
        dict(status=0xB580000000000000, misc=0, rip=0x2EADBABE),
    ),
    "panic_ucr/data/srao_mem_scrub_noripv": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAO 0xc0\nMCGSTATUS MCIP\nADDR 0x1234\nMISC 0x8c\n",
        dict(status=0xBD000000000000C0, mcg_status=4, addr=0x1234, misc=0x8C),
    ),
    "recoverable_ucr/data/srao_mem_scrub": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAO 0xc0\nMCGSTATUS RIPV MCIP\nADDR 0x1234\n"
        "MISC 0x8c\nRIP 0x73:0x1eadbabe\n",
        dict(
            cpu=0,
            bank=2,
            status=0xBD000000000000C0,
            mcg_status=5,
            addr=0x1234,
            misc=0x8C,
            cs=0x73,
            rip=0x1EADBABE,
            mode=Mode.EXCP,
            broadcast=Broadcast.DEFAULT,
            context=Context.RANDOM,
            hold=False,
        ),
    ),
    "recoverable_ucr/data/srao_ewb": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAO 0x17a\nMCGSTATUS RIPV MCIP\nADDR 0x1234\n"
        "MISC 0x8c\nRIP 0x73:0x1eadbabe\n",
        dict(status=0xBD0000000000017A, mcg_status=5),
    ),
    "recoverable_ucr/data/srao_unknown": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAO\nMCGSTATUS RIPV MCIP\nADDR 0x1234\n"
        "RIP 0x73:0x1eadbabe\n",
        dict(status=0xB500000000000000, mcg_status=5),
    ),
    "recoverable_ucr/data/srar_usr_dcu": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAR 0x134\nMCGSTATUS RIPV MCIP EIPV\n"
        "ADDR 0x12345000\nMISC 0x8c\nRIP 0x73:0x1eadbabe\nNOBROADCAST\n",
        dict(
            status=0xBD80000000000134,
            mcg_status=7,
            addr=0x12345000,
            misc=0x8C,
            broadcast=Broadcast.NOBROADCAST,
            mode=Mode.EXCP,
        ),
    ),
    "recoverable_ucr/data/srar_usr_dcu_irq": (
        "CPU 3 BANK 2\nSTATUS UNCORRECTED SRAR 0x134\nMCGSTATUS RIPV MCIP EIPV\n"
        "ADDR 0x12345000\nMISC 0x8c\nRIP 0x73:0x1eadbabe\nIRQBROADCAST\n",
        dict(cpu=3, status=0xBD80000000000134, broadcast=Broadcast.IRQBROADCAST),
    ),
    "poll_noser/data/uc_poll": (
        "CPU 1 BANK 4\nMCGSTATUS MCIP\nSTATUS UNCORRECTED\nRIP 12343434\nMISC 11\nPOLL\n",
        dict(
            cpu=1,
            status=0xB800000000000000,
            mode=Mode.POLL,
            broadcast=Broadcast.NOBROADCAST,
        ),
    ),
    "function/kvm/host/SRAO": (
        "CPU 0 BANK 2\nSTATUS UNCORRECTED SRAO 0x17a\nMCGSTATUS MCIP RIPV\nMISC 0x8c\n",
        dict(status=0xB90000000000017A, mcg_status=5, misc=0x8C, addr=0),
    ),
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_file(name: str) -> None:
    text, expected = REAL_FILES[name]
    r = one(text)
    assert {k: getattr(r, k) for k in expected} == expected
    assert parse(r.render()) == [r]


def test_srao_mem_scrub_status_arithmetic() -> None:
    text, _ = REAL_FILES["recoverable_ucr/data/srao_mem_scrub"]
    uncorrected = MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN
    assert (
        one(text).status == uncorrected | MCI_STATUS_S | 0xC0 | MCI_STATUS_ADDRV | MCI_STATUS_MISCV
    )
    assert one(text).status == 0xBD000000000000C0


def test_mce_inject_test_corrected_has_two_polled_records() -> None:
    text = (
        "# \n# log two corrected machine checks\nCPU 0 BANK 1\nSTATUS CORRECTED\nADDR 0xabcd\n"
        "#  \nCPU 1 BANK 2\nSTATUS CORRECTED\nADDR 0x1234\n"
    )
    a, b = parse(text)
    assert (a.cpu, a.bank, a.status, a.addr, a.line) == (0, 1, 0x9400000000000000, 0xABCD, 3)
    assert (b.cpu, b.bank, b.status, b.addr, b.line) == (1, 2, 0x9400000000000000, 0x1234, 7)
    assert a.mode is b.mode is Mode.POLL
    assert a.broadcast == b.broadcast == Broadcast.NOBROADCAST


def test_mce_inject_test_uncorrected_is_invalid_in_its_own_grammar() -> None:
    # The real file puts EIPV (an MCGSTATUS bit) in STATUS; mce.y rejects that too.
    text = "# this should just kill the process\nCPU 0 BANK 1\nSTATUS uncorrected EIPV\n"
    with pytest.raises(MceInjectSyntaxError) as e:
        parse(text, "test/uncorrected")
    assert (e.value.line, e.value.column) == (3, 20)
    assert str(e.value) == "test/uncorrected:3:20: STATUS does not take 'EIPV' (MCGSTATUS does)"


# ------------------------------------------------------------------------------------------
# HOLD grouping and broadcast

UCNA = "CPU 0 BANK 2\nSTATUS UNCORRECTED UCNA\nADDR 0x1234\nMISC 0x8c\nPOLL\nHOLD\nCPU 1 BANK 0"
CORRECTED_HOLD = (
    "#\n# log corrected machine checks\nCPU 0 BANK 1\nSTATUS CORRECTED\nADDR 0xabcd\nHOLD\n"
    "CPU 1 BANK 0\n#\nCPU 1 BANK 2\nSTATUS CORRECTED\nMISC 0xabcd\nADDR 0x1234\nHOLD\n"
    "CPU 0 BANK 0\n"
)
FATAL_SEVERITY = (
    "CPU 0 BANK 3\nMCGSTATUS RIPV EIPV MCIP\n# S is regarded as SRAO for SER_P = 1\n"
    "STATUS UNCORRECTED S\nRIP 0x10:0x12343434\nMISC 0x2314\nADDR 0xabcd1234\nHOLD\n\n"
    "CPU 1 BANK 1\nMCGSTATUS MCIP\nSTATUS FATAL S\nRIP 0x10:0xabcdcdcd\n"
)


def test_ucna_poll_hold_goes_with_the_next_record() -> None:
    held, trigger = parse(UCNA)
    assert held.status == 0xBC00000000000000
    assert (held.mode, held.hold, held.broadcast) == (Mode.POLL, True, Broadcast.NOBROADCAST)
    assert (trigger.cpu, trigger.bank, trigger.status, trigger.mode) == (1, 0, 0, Mode.POLL)
    [inj] = resolve([held, trigger], [0, 1, 2, 3])
    assert inj == Injection(cpu=1, targets=[(0, held), (1, trigger)], mode=Mode.POLL, line=7)


def test_corrected_hold_pairs() -> None:
    rs = parse(CORRECTED_HOLD)
    first, second = resolve(rs, [0, 1])
    assert first.targets == [(0, rs[0]), (1, rs[1])]
    assert second.targets == [(0, rs[3]), (1, rs[2])]
    assert rs[2].status == 0x9C00000000000000
    assert [i.line for i in (first, second)] == [7, 14]


def test_fatal_severity_held_record_replaces_the_synthetic_one() -> None:
    held, fatal = parse(FATAL_SEVERITY)
    [inj] = resolve([held, fatal], [0, 1, 2])
    synthetic = MceRecord(
        cpu=2, status=MCI_STATUS_UC, mcg_status=MCG_STATUS_MCIP | MCG_STATUS_RIPV, mode=Mode.EXCP
    )
    assert inj.targets == [(0, held), (1, fatal), (2, synthetic)]
    assert inj.mode is Mode.EXCP


def test_default_broadcast_synthesis() -> None:
    text, _ = REAL_FILES["recoverable_ucr/data/srao_mem_scrub"]
    r = one(text)
    others = broadcast_records(r, [0, 1, 2, 3], {})
    assert [o.cpu for o in others] == [1, 2, 3]
    for o in others:
        assert o.status == MCI_STATUS_UC  # no VAL
        assert o.mcg_status == MCG_STATUS_MCIP | MCG_STATUS_RIPV
        assert (o.bank, o.addr, o.misc, o.rip, o.mode) == (0, 0, 0, 0, Mode.EXCP)
        assert (o.broadcast, o.context, o.hold) == (Broadcast.DEFAULT, Context.RANDOM, False)


def test_synthetic_record_copies_only_mcip_and_uc() -> None:
    r = one("CPU 1 STATUS VAL EN PCC MCGSTATUS RIPV EIPV EXCP")
    [o] = broadcast_records(r, [0, 1], {})
    assert (o.cpu, o.status, o.mcg_status) == (0, 0, 0)
    r = one("CPU 1 STATUS UC MCGSTATUS EIPV")
    [o] = broadcast_records(r, [0, 1], {})
    assert (o.status, o.mcg_status) == (MCI_STATUS_UC, MCG_STATUS_RIPV)


def test_irqbroadcast_and_nmibroadcast_still_broadcast() -> None:
    for word in ("IRQBROADCAST", "NMIBROADCAST"):
        r = one(f"CPU 0 STATUS UC {word}")
        assert len(broadcast_records(r, [0, 1, 2], {})) == 2


def test_nobroadcast_still_delivers_held_records() -> None:
    held = one("CPU 2 STATUS VAL EXCP HOLD")
    r = one("CPU 0 STATUS UC NOBROADCAST")
    assert broadcast_records(r, [0, 1, 2, 3], {2: held}) == [held]


def test_poll_never_broadcasts() -> None:
    r = one("CPU 0 STATUS UNCORRECTED POLL")
    assert broadcast_records(r, [0, 1, 2], {}) == []
    [inj] = resolve([r], [0, 1, 2])
    assert inj.targets == [(0, r)]
    assert inj.mode is Mode.POLL


def test_resolve_groups_in_file_order_and_clears_held_records() -> None:
    rs = parse(
        "CPU 1 STATUS VAL EXCP HOLD\n"
        "CPU 1 STATUS VAL EN EXCP HOLD\n"  # replaces the first HOLD for CPU 1
        "CPU 0 STATUS UC\n"
        "CPU 1 STATUS VAL NOBROADCAST EXCP\n"
        "CPU 0 STATUS VAL HOLD\n"  # trailing HOLD: never injected
    )
    first, second = resolve(rs, [0, 1])
    assert first.targets == [(0, rs[2]), (1, rs[1])]
    assert second.targets == [(1, rs[3])]
    assert [first.cpu, second.cpu] == [0, 1]


def test_primary_cpu_ignores_its_own_held_record() -> None:
    rs = parse("CPU 0 STATUS VAL HOLD CPU 0 STATUS UC NOBROADCAST")
    [inj] = resolve(rs, [0, 1])
    assert inj.targets == [(0, rs[1])]


def test_mce_record_goes_to_cpu_0() -> None:
    [inj] = resolve(parse("MCE STATUS VAL"), [0, 1])
    assert inj.cpu == 0


def test_resolve_rejects_offline_cpus() -> None:
    with pytest.raises(ValueError, match="line 2: CPU 7 is not online"):
        resolve(parse("\nCPU 7 STATUS UC"), [0, 1])
    with pytest.raises(ValueError, match="CPU 9 is not online"):
        resolve(parse("CPU 9 STATUS UC HOLD"), [0, 1])


# ------------------------------------------------------------------------------------------
# Errors

BAD_INPUTS = [
    ("garbage!", 1, 1, "unknown keyword 'garbage'"),
    ("CPU 0\nSTATSU UC\n", 2, 1, "unknown keyword 'STATSU'"),
    ("CPU 0 BANK 1\nSTATUS CORRECTED\nADDR", 3, 5, "ADDR expects a number, found end of input"),
    ("CPU 0 BANK 1\nADDR\n\n", 2, 5, "ADDR expects a number, found end of input"),
    ("CPU 0 ADDR BANK 1", 1, 12, "ADDR expects a number, found 'BANK'"),
    ("CPU 2 STATUS 0x1 TIME", 1, 22, "TIME expects a number, found end of input"),
    ("CPU", 1, 4, "CPU expects a number, found end of input"),
    ("CPU 0 BANK 1\nSTATUS UC\nMISC 0x", 3, 6, "malformed number '0x': 0x needs hex digits only"),
    ("CPU 0 ADDR 0x1g", 1, 12, "malformed number '0x1g': 0x needs hex digits only"),
    ("CPU 0 ADDR 09", 1, 12, "malformed number '09': a leading 0 means octal (digits 0-7)"),
    ("CPU 0 ADDR 12abc", 1, 12, "malformed number '12abc'"),
    (
        "CPU 0 BANK 1\n  ADDR 0x1ffffffffffffffff\n",
        2,
        8,
        "number 0x1ffffffffffffffff does not fit in 64 bits",
    ),
    (
        "CPU 0 TSC 18446744073709551616",
        1,
        11,
        "number 18446744073709551616 does not fit in 64 bits",
    ),
    ("CPU 0 BANK 256", 1, 12, "BANK 256 does not fit in 8 bits"),
    ("CPU 0 0x100", 1, 7, "CPU n bank 0x100 does not fit in 8 bits"),
    ("CPU 0x100000000 BANK 1", 1, 5, "CPU 0x100000000 does not fit in 32 bits"),
    ("CPU 0 RIP 0x100:0x5", 1, 11, "RIP code segment 0x100 does not fit in 8 bits"),
    ("CPU 0 RIP 0x10:", 1, 16, "RIP cs: expects a number, found end of input"),
    (
        "MCE\nSTATUS UC\nRIP 0x10:<0x1234>{do_mc",
        3,
        24,
        "RIP cs:<ip>{symbol} expects '}', found end of input",
    ),
    ("MCE RIP 1:<2>{3}", 1, 15, "RIP cs:<ip>{ expects a symbol name, found '3'"),
    ("CPU 0 PROCESSOR 0 0x306c3", 1, 19, "PROCESSOR vendor:cpuid expects ':', found '0x306c3'"),
    (
        "STATUS UC\nCPU 0 BANK 1\n",
        1,
        1,
        "'STATUS' before any record; a record starts with CPU or MCE",
    ),
    ("# c\n\n  0x5", 3, 3, "'0x5' before any record; a record starts with CPU or MCE"),
    (":", 1, 1, "':' before any record; a record starts with CPU or MCE"),
    ("CPU 0\nCPU 1 STATUS UC", 2, 1, "record started at line 1 has no terms, found 'CPU'"),
    ("CPU 0 BANK 1\nMCE", 2, 4, "record started at line 2 has no terms, found end of input"),
    ("CPU 0 1", 1, 8, "record started at line 1 has no terms, found end of input"),
    ("CPU 0 BANK 1 MCGSTATUS MCIP UC", 1, 29, "MCGSTATUS does not take 'UC' (STATUS does)"),
    ("CPU 0 UC", 1, 7, "'UC' is a STATUS value outside a STATUS list"),
    ("CPU 0 STATUS UC ripv", 1, 17, "STATUS does not take 'ripv' (MCGSTATUS does)"),
    ("CPU 0 BANK 1 2", 1, 14, "expected a keyword, found '2'"),
    ("CPU 0 BANK 1 STATUS UC @", 1, 24, "unexpected character '@'"),
    ("CPU 0 BANK -1", 1, 12, "unexpected character '-'"),
    ("CPU 0 STATUS UC }", 1, 17, "expected a keyword, found '}'"),
    (
        "CPU 0 MACHINE",
        1,
        7,
        "'MACHINE' belongs only in the kernel-log form "
        "'CPU n: MACHINE CHECK EXCEPTION: mcgstatus BANK b: status'",
    ),
    (
        "CPU 0: MACHINE CHECK EXCEPTION: 4 BANK 4 0xb2",
        1,
        42,
        "kernel-log form 'CPU n: MACHINE CHECK EXCEPTION: mcgstatus BANK b: status' "
        "expects ':', found '0xb2'",
    ),
    (
        "CPU 0: MACHINE CHECK ERROR",
        1,
        22,
        "kernel-log form 'CPU n: MACHINE CHECK EXCEPTION: mcgstatus BANK b: status' "
        "expects 'EXCEPTION', found 'ERROR'",
    ),
    (
        "CPU 0: MACHINE CHECK EXCEPTION: 4 BANK 4:",
        1,
        42,
        "kernel-log STATUS expects a number, found end of input",
    ),
    ("CPU 0 STATUS UC\t\u00e9", 1, 17, "unexpected character '\u00e9'"),
]


@pytest.mark.parametrize(("text", "line", "column", "problem"), BAD_INPUTS)
def test_bad_input(text: str, line: int, column: int, problem: str) -> None:
    with pytest.raises(MceInjectSyntaxError) as e:
        parse(text, "faults.mce")
    err = e.value
    assert (err.source, err.line, err.column, err.problem) == ("faults.mce", line, column, problem)
    assert str(err) == f"faults.mce:{line}:{column}: {problem}"
    assert "\n" not in str(err)
    assert isinstance(err, ValueError)


def test_first_error_in_file_order_is_reported() -> None:
    with pytest.raises(MceInjectSyntaxError) as e:
        parse("CPU 0 STATSU 1\nADDR 0x\n")
    assert (e.value.line, e.value.problem) == (1, "unknown keyword 'STATSU'")


def test_parse_file(tmp_path: Path) -> None:
    good = tmp_path / "srao.mce"
    good.write_text(REAL_FILES["recoverable_ucr/data/srao_mem_scrub"][0])
    assert parse_file(good)[0].status == 0xBD000000000000C0
    bad = tmp_path / "half.mce"
    bad.write_text("CPU 0 BANK 2\nSTATUS UNCORRECTED\nADDR\n")
    with pytest.raises(MceInjectSyntaxError) as e:
        parse_file(bad)
    assert str(e.value) == f"{bad}:3:5: ADDR expects a number, found end of input"


def test_record_constructor_checks_field_widths() -> None:
    with pytest.raises(ValueError, match="bank=0x100 does not fit in 8 bits"):
        MceRecord(bank=256)
    with pytest.raises(ValueError, match="status"):
        MceRecord(status=1 << 64)
    with pytest.raises(ValueError, match="cpuid"):
        MceRecord(processor=Processor(0, 1 << 32))


# ------------------------------------------------------------------------------------------
# Rendering


def test_render_is_canonical() -> None:
    text, _ = REAL_FILES["recoverable_ucr/data/srao_mem_scrub"]
    assert one(text).render() == (
        "CPU 0\nBANK 2\nMCGSTATUS RIPV MCIP\nSTATUS VAL UC EN S 0xc0\nADDR 0x1234\nMISC 0x8c\n"
        "RIP 0x73:0x1eadbabe\n"
    )


def test_render_puts_addr_without_addrv_before_status() -> None:
    r = one("MCE ADDR 0x1000 STATUS UC IN_IRQ HOLD")
    assert r.render() == "MCE\nBANK 0\nADDR 0x1000\nSTATUS UC\nIN_IRQ\nHOLD\n"
    assert parse(r.render()) == [r]


def test_render_delivery_words() -> None:
    r = one("CPU 1 STATUS VAL EXCP NOBROADCAST IRQBROADCAST IN_PROC PROCESSOR 0:0x306c3 TIME 5")
    assert r.render().splitlines()[3:] == [
        "TIME 5",
        "PROCESSOR 0:0x306c3",
        "EXCP",
        "NOBROADCAST",
        "IRQBROADCAST",
        "IN_PROC",
    ]


TERM_WORDS = {kw.value for kw in Kw} - set(STATUS_CASES) - set(MCG_CASES)
u64 = st.integers(0, U64)
interesting_status = st.sampled_from([0, *STATUS_CASES.values(), 0xBD000000000000C0])
broadcasts = st.sets(
    st.sampled_from([Broadcast.NOBROADCAST, Broadcast.IRQBROADCAST, Broadcast.NMIBROADCAST])
).map(lambda s: functools.reduce(operator.or_, s, Broadcast.DEFAULT))


@st.composite
def records(draw: st.DrawFn) -> MceRecord:
    """Any record the parser can produce (POLL records carry NOBROADCAST)."""
    mode = draw(st.sampled_from(Mode))
    broadcast = Broadcast.NOBROADCAST if mode is Mode.POLL else draw(broadcasts)
    small = st.integers(0, 5)
    return MceRecord(
        cpu=draw(st.none() | st.integers(0, (1 << 32) - 1) | small),
        bank=draw(st.integers(0, 255)),
        status=draw(u64 | interesting_status),
        mcg_status=draw(u64 | st.integers(0, 0x1FFF)),
        addr=draw(u64 | small),
        misc=draw(u64 | small),
        rip=draw(u64 | small),
        cs=draw(st.none() | st.integers(0, 255)),
        tsc=draw(u64 | small),
        time=draw(u64 | small),
        socketid=draw(st.integers(0, (1 << 32) - 1) | small),
        apicid=draw(st.integers(0, (1 << 32) - 1) | small),
        mcgcap=draw(u64 | small),
        processor=draw(
            st.none() | st.builds(Processor, st.integers(0, 255), st.integers(0, (1 << 32) - 1))
        ),
        mode=mode,
        broadcast=broadcast,
        hold=draw(st.booleans()),
        context=draw(st.sampled_from(Context)),
    )


@given(records())
def test_render_parse_round_trip(record: MceRecord) -> None:
    text = record.render()
    assert parse(text) == [record]
    for line in text.splitlines():  # one term (or record start) per line
        first, *rest = line.split()
        assert first in TERM_WORDS
        assert not TERM_WORDS & set(rest)


@given(st.lists(records(), max_size=5))
def test_concatenated_renders_round_trip(rs: list[MceRecord]) -> None:
    text = "".join(r.render() for r in rs)
    parsed = parse(text)
    assert parsed == rs
    assert [p.line for p in parsed] == [
        sum(r.render().count("\n") for r in rs[:i]) + 1 for i in range(len(rs))
    ]


VOCAB = [
    *[kw.value for kw in Kw],
    *[kw.value.lower() for kw in Kw],
    "0",
    "1",
    "0x10",
    "017",
    "0x",
    "09",
    "12abc",
    "0x1ffffffffffffffff",
    "256",
    ":",
    "<",
    ">",
    "{",
    "}",
    "#",
    "\n",
    "sym",
    "@",
    "-",
]


def check_only_syntax_errors(text: str) -> None:
    try:
        rs = parse(text, "fuzz")
    except MceInjectSyntaxError as e:
        assert str(e).startswith(f"fuzz:{e.line}:{e.column}: ")
        assert 1 <= e.line <= text.count("\n") + 1
        assert e.column >= 1
        return
    for r in rs:
        assert parse(r.render()) == [r]


@given(st.text())
def test_arbitrary_text_only_raises_syntax_errors(text: str) -> None:
    check_only_syntax_errors(text)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(VOCAB), max_size=30), st.sampled_from([" ", "", "\n", "\t"]))
def test_token_soup_only_raises_syntax_errors(words: list[str], sep: str) -> None:
    check_only_syntax_errors(sep.join(words))
