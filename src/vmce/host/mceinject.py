"""The input language of Linux's ``mce-inject`` tool: tokenizer, parser, renderer, delivery plan.

The language (reference section 3.10; the real grammar is mce-inject's ``mce.lex``/``mce.y``)
describes machine checks as the kernel once printed them, one ``struct mce`` per record::

    CPU 0 BANK 2                      # a record starts with CPU n [bank], MCE, or the
    STATUS UNCORRECTED SRAO 0xc0      #   kernel-log form CPU n: MACHINE CHECK EXCEPTION: ...
    MCGSTATUS RIPV MCIP
    ADDR 0x1234 MISC 0x8c             # ADDR/MISC also set ADDRV/MISCV in STATUS
    RIP 0x73:0x1eadbabe

:func:`parse` turns text into :class:`MceRecord` values with the same semantics as ``mce.y``
(every record starts from zero, later terms overwrite earlier ones, ``STATUS``/``MCGSTATUS``
replace the whole register). :func:`resolve` then plans delivery the way ``mce-inject.c`` does:
``HOLD`` records wait for the next non-``HOLD`` record, and an exception is broadcast to every
other online CPU unless ``NOBROADCAST`` (or ``POLL``) says otherwise.

As in ``mce.y``, a record needs at least one term (``CPU 1 BANK 0`` is the usual trigger after
``HOLD``) and ``STATUS``/``MCGSTATUS`` lists may be empty (value 0).

Differences from the C tool are deliberate. It rejects what the tool silently mangles: malformed
numbers (``0x``, ``09``, ``12abc``), numbers wider than 64 bits (strtoull saturates) and values
wider than their ``struct mce`` field (``BANK 256`` would be truncated); its line numbers are
exact. It accepts a few harmless things the tool's lexer does not: ``\r`` as white space, ``0X``
as a hex prefix, a final comment without a newline, and any identifier as the ``{sym}`` of
``RIP cs:<ip>{sym}``. The kernel-log start sets the record's CPU to ``n`` (the tool sets only
``m.cpu``, not ``m.extcpu``, and so injects such a record on CPU 0).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum, Flag
from pathlib import Path

from vmce.mca.bits import MCI_STATUS, U64
from vmce.mca.constants import (
    MCG_STATUS_EIPV,
    MCG_STATUS_LMCE,
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_ADDRV,
    MCI_STATUS_AR,
    MCI_STATUS_EN,
    MCI_STATUS_MISCV,
    MCI_STATUS_OVER,
    MCI_STATUS_PCC,
    MCI_STATUS_S,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
)

__all__ = [
    "Broadcast",
    "Context",
    "Injection",
    "Kw",
    "MceInjectSyntaxError",
    "MceRecord",
    "Mode",
    "Processor",
    "Token",
    "TokenKind",
    "broadcast_records",
    "default_mode",
    "iter_tokens",
    "parse",
    "parse_file",
    "resolve",
    "target_cpu",
    "tokenize",
]

# --------------------------------------------------------------------------------------------
# Errors


class MceInjectSyntaxError(ValueError):
    """A problem in an mce-inject file; ``str()`` is ``source:line:column: problem``."""

    def __init__(self, source: str, line: int, column: int, problem: str) -> None:
        self.source = source
        self.line = line
        self.column = column
        self.problem = problem
        super().__init__(f"{source}:{line}:{column}: {problem}")


# --------------------------------------------------------------------------------------------
# Vocabulary


class Kw(Enum):
    """Every keyword of the language (the key table of ``mce.lex``)."""

    # record starts and the kernel-log form
    CPU = "CPU"
    MCE = "MCE"
    MACHINE = "MACHINE"
    CHECK = "CHECK"
    EXCEPTION = "EXCEPTION"
    # terms taking values
    STATUS = "STATUS"
    MCGSTATUS = "MCGSTATUS"
    BANK = "BANK"
    ADDR = "ADDR"
    MISC = "MISC"
    RIP = "RIP"
    TSC = "TSC"
    TIME = "TIME"
    SOCKETID = "SOCKETID"
    APICID = "APICID"
    MCGCAP = "MCGCAP"
    PROCESSOR = "PROCESSOR"
    # delivery words
    NOBROADCAST = "NOBROADCAST"
    IRQBROADCAST = "IRQBROADCAST"
    NMIBROADCAST = "NMIBROADCAST"
    HOLD = "HOLD"
    IN_IRQ = "IN_IRQ"
    IN_PROC = "IN_PROC"
    POLL = "POLL"
    EXCP = "EXCP"
    # STATUS values
    VAL = "VAL"
    OVER = "OVER"
    UC = "UC"
    EN = "EN"
    PCC = "PCC"
    S = "S"
    AR = "AR"
    TES_YELLOW = "TES_YELLOW"
    CORRECTED = "CORRECTED"
    UNCORRECTED = "UNCORRECTED"
    FATAL = "FATAL"
    UCNA = "UCNA"
    SRAO = "SRAO"
    SRAR = "SRAR"
    # MCGSTATUS values
    RIPV = "RIPV"
    EIPV = "EIPV"
    MCIP = "MCIP"
    LMCES = "LMCES"
    TES_P = "TES_P"
    SEAM_NR = "SEAM_NR"


#: MCi_STATUS bit 54, the upper bit of the 2-bit threshold status ("yellow" = 0b10).
MCI_STATUS_TES_YELLOW = 2 << MCI_STATUS.field("THRESHOLD").lo
#: mce.h's MCG_STATUS_TES_P (bit 11) and MCG_STATUS_SEAM_NR (bit 12, TDX SEAM non-root).
MCG_STATUS_TES_P = 1 << 11
MCG_STATUS_SEAM_NR = 1 << 12

#: Values ``STATUS`` accepts; a list of them is ORed together (numbers are ORed in as well).
STATUS_VALUES: dict[Kw, int] = {
    Kw.VAL: MCI_STATUS_VAL,
    Kw.OVER: MCI_STATUS_OVER,
    Kw.UC: MCI_STATUS_UC,
    Kw.EN: MCI_STATUS_EN,
    Kw.PCC: MCI_STATUS_PCC,
    Kw.S: MCI_STATUS_S,
    Kw.AR: MCI_STATUS_AR,
    Kw.TES_YELLOW: MCI_STATUS_TES_YELLOW,
    Kw.CORRECTED: MCI_STATUS_VAL | MCI_STATUS_EN,
    Kw.UNCORRECTED: MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN,
    Kw.FATAL: MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN | MCI_STATUS_PCC,
    Kw.UCNA: 0,
    Kw.SRAO: MCI_STATUS_S,
    Kw.SRAR: MCI_STATUS_S | MCI_STATUS_AR,
}

#: Values ``MCGSTATUS`` accepts.
MCG_STATUS_VALUES: dict[Kw, int] = {
    Kw.RIPV: MCG_STATUS_RIPV,
    Kw.EIPV: MCG_STATUS_EIPV,
    Kw.MCIP: MCG_STATUS_MCIP,
    Kw.LMCES: MCG_STATUS_LMCE,
    Kw.TES_P: MCG_STATUS_TES_P,
    Kw.SEAM_NR: MCG_STATUS_SEAM_NR,
}

_VALUE_LISTS: dict[Kw, dict[Kw, int]] = {
    Kw.STATUS: STATUS_VALUES,
    Kw.MCGSTATUS: MCG_STATUS_VALUES,
}

_KERNEL_LOG_WORDS = (Kw.MACHINE, Kw.CHECK, Kw.EXCEPTION)


class Mode(Enum):
    """How a record is raised; the value is its ``MCJ_EXCEPTION`` bit in ``inject_flags``."""

    POLL = 0  # found by machine_check_poll (no #MC)
    EXCP = 8  # raised as a #MC exception


class Context(Enum):
    """Where the kernel injects the record; the value is the ``MCJ_CTX_*`` code."""

    RANDOM = 0
    IN_PROC = 1
    IN_IRQ = 2


class Broadcast(Flag):
    """Broadcast words of a record (mce-inject's ``enum mceflags`` bits); they accumulate.

    Only ``NOBROADCAST`` changes which CPUs receive records; ``IRQBROADCAST`` picks IRQ instead
    of the default NMI for how the kernel kicks CPUs whose records have random context, and
    ``NMIBROADCAST`` is accepted but changes nothing.
    """

    DEFAULT = 0
    NOBROADCAST = 1 << 0
    IRQBROADCAST = 1 << 3
    NMIBROADCAST = 1 << 4


_BROADCAST_WORDS: dict[Kw, Broadcast] = {
    Kw.NOBROADCAST: Broadcast.NOBROADCAST,
    Kw.IRQBROADCAST: Broadcast.IRQBROADCAST,
    Kw.NMIBROADCAST: Broadcast.NMIBROADCAST,
}
_CONTEXT_WORDS: dict[Kw, Context] = {Kw.IN_IRQ: Context.IN_IRQ, Kw.IN_PROC: Context.IN_PROC}
_MODE_WORDS: dict[Kw, Mode] = {Kw.POLL: Mode.POLL, Kw.EXCP: Mode.EXCP}

#: Width in bits of the ``struct mce`` field behind each record attribute narrower than 64 bits
#: (the C tool truncates silently; this parser rejects values that do not fit).
FIELD_BITS: dict[str, int] = {
    "cpu": 32,
    "bank": 8,
    "cs": 8,
    "socketid": 32,
    "apicid": 32,
    "vendor": 8,
    "cpuid": 32,
}


def _fits(attr: str, value: int) -> bool:
    """Whether ``value`` fits the ``struct mce`` field behind record attribute ``attr``."""
    return 0 <= value < (1 << FIELD_BITS.get(attr, 64))


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Processor:
    """``PROCESSOR vendor:cpuid``: the kernel's CPU vendor code and CPUID(1).EAX."""

    vendor: int
    cpuid: int


@dataclass(kw_only=True)
class MceRecord:
    """One ``struct mce`` to inject, with its delivery options. Unset fields are zero.

    ``cpu`` is ``None`` for a record started with ``MCE`` (the tool then injects on CPU 0),
    ``cs`` is ``None`` unless ``RIP`` named a code segment. ``mode`` and ``broadcast`` are the
    effective values: ``mode`` defaults to EXCP when STATUS has UC, else POLL, and a POLL
    record's ``broadcast`` is always ``NOBROADCAST``. ``line`` (where the record started) is not
    part of equality.
    """

    cpu: int | None = None
    bank: int = 0
    status: int = 0
    mcg_status: int = 0
    addr: int = 0
    misc: int = 0
    rip: int = 0
    cs: int | None = None
    tsc: int = 0
    time: int = 0
    socketid: int = 0
    apicid: int = 0
    mcgcap: int = 0
    processor: Processor | None = None
    mode: Mode = Mode.POLL
    broadcast: Broadcast = Broadcast.DEFAULT
    hold: bool = False
    context: Context = Context.RANDOM
    line: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        for attr, value in self._numbers():
            if not _fits(attr, value):
                bits = FIELD_BITS.get(attr, 64)
                raise ValueError(f"{attr}={value:#x} does not fit in {bits} bits")

    def _numbers(self) -> Iterator[tuple[str, int]]:
        """(attribute, value) for every number the record holds, for the width check."""
        for attr in ("cpu", "bank", "status", "mcg_status", "addr", "misc", "rip", "cs"):
            value = getattr(self, attr)
            if value is not None:
                yield attr, value
        for attr in ("tsc", "time", "socketid", "apicid", "mcgcap"):
            yield attr, getattr(self, attr)
        if self.processor is not None:
            yield "vendor", self.processor.vendor
            yield "cpuid", self.processor.cpuid

    def render(self) -> str:
        """The record in canonical mce-inject syntax, one term per line; parses back to itself."""
        return "\n".join(_render_lines(self)) + "\n"


def default_mode(status: int) -> Mode:
    """The tool's mode when neither POLL nor EXCP is given: EXCP if STATUS has UC, else POLL."""
    return Mode.EXCP if status & MCI_STATUS_UC else Mode.POLL


def target_cpu(record: MceRecord) -> int:
    """The CPU a record is injected on (``MCE`` records leave the CPU zeroed: CPU 0)."""
    return 0 if record.cpu is None else record.cpu


# --------------------------------------------------------------------------------------------
# Tokenizer


class TokenKind(Enum):
    """What a token is."""

    KEYWORD = "keyword"
    NUMBER = "number"
    SYMBOL = "symbol"  # an identifier that is not a keyword (only valid inside ``{}``)
    PUNCT = "punctuation"
    EOF = "end of input"


@dataclass(frozen=True)
class Token:
    """One token with its 1-based position; ``value`` for numbers, ``keyword`` for keywords."""

    kind: TokenKind
    text: str
    line: int
    column: int
    value: int = 0
    keyword: Kw | None = None

    def describe(self) -> str:
        """How error messages name this token."""
        return "end of input" if self.kind is TokenKind.EOF else repr(self.text)


_LEXEME = re.compile(
    r"(?P<newline>\n)|(?P<space>[ \t\r\f\v]+)|(?P<comment>\#[^\n]*)"
    r"|(?P<number>[0-9][0-9A-Za-z_]*)|(?P<word>[A-Za-z_][0-9A-Za-z_]*)"
    r"|(?P<punct>[:{}<>])|(?P<other>.)",
    re.DOTALL,
)
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_OCTAL = re.compile(r"0[0-7]*")
_DECIMAL = re.compile(r"[1-9][0-9]*")


def _number_value(text: str) -> int | str:
    """The value of a C integer literal, or the reason it is malformed or too wide."""
    if _HEX.fullmatch(text):
        value = int(text, 16)
    elif _OCTAL.fullmatch(text):
        value = int(text, 8)
    elif _DECIMAL.fullmatch(text):
        value = int(text, 10)
    elif text[:2].lower() == "0x":
        return f"malformed number {text!r}: 0x needs hex digits only"
    elif text[0] == "0" and text.isdigit():
        return f"malformed number {text!r}: a leading 0 means octal (digits 0-7)"
    else:
        return f"malformed number {text!r}"
    if value > U64:
        return f"number {text} does not fit in 64 bits"
    return value


def _make_token(kind: str, text: str, line: int, column: int, source: str) -> Token:
    if kind == "number":
        value = _number_value(text)
        if isinstance(value, str):
            raise MceInjectSyntaxError(source, line, column, value)
        return Token(TokenKind.NUMBER, text, line, column, value=value)
    if kind == "word":
        keyword = Kw.__members__.get(text.upper())
        kind_ = TokenKind.SYMBOL if keyword is None else TokenKind.KEYWORD
        return Token(kind_, text, line, column, keyword=keyword)
    if kind == "punct":
        return Token(TokenKind.PUNCT, text, line, column)
    raise MceInjectSyntaxError(source, line, column, f"unexpected character {text!r}")


def iter_tokens(text: str, source: str = "<input>") -> Iterator[Token]:
    """Tokens of ``text`` on demand (so the first error in file order is the one reported),
    ending with one EOF token placed just after the last token."""
    line, line_start = 1, 0
    end_line, end_column = 1, 1
    for m in _LEXEME.finditer(text):
        kind = m.lastgroup or "other"
        if kind == "newline":
            line, line_start = line + 1, m.end()
            continue
        if kind in ("space", "comment"):
            continue
        column = m.start() - line_start + 1
        yield _make_token(kind, m.group(), line, column, source)
        end_line, end_column = line, column + len(m.group())
    yield Token(TokenKind.EOF, "", end_line, end_column)


def tokenize(text: str, source: str = "<input>") -> list[Token]:
    """All tokens of ``text``, ending with an EOF token; raises on the first lexical error."""
    return list(iter_tokens(text, source))


# --------------------------------------------------------------------------------------------
# Parser


@dataclass(frozen=True)
class _NumberTerm:
    """A term taking one number: the record attribute it sets and status bits it also sets."""

    attr: str
    also_status: int = 0


_NUMBER_TERMS: dict[Kw, _NumberTerm] = {
    Kw.BANK: _NumberTerm("bank"),
    Kw.ADDR: _NumberTerm("addr", MCI_STATUS_ADDRV),
    Kw.MISC: _NumberTerm("misc", MCI_STATUS_MISCV),
    Kw.TSC: _NumberTerm("tsc"),
    Kw.TIME: _NumberTerm("time"),
    Kw.SOCKETID: _NumberTerm("socketid"),
    Kw.APICID: _NumberTerm("apicid"),
    Kw.MCGCAP: _NumberTerm("mcgcap"),
}

_KERNEL_LOG_FORM = "CPU n: MACHINE CHECK EXCEPTION: mcgstatus BANK b: status"


class _Parser:
    """Recursive descent over the token stream, one record at a time (the grammar of mce.y)."""

    def __init__(self, tokens: Iterator[Token], source: str) -> None:
        self._tokens = tokens
        self._cur: Token | None = None  # lookahead, read only when needed
        self._source = source
        self._mode: Mode | None = None

    # -- token access

    def _peek(self) -> Token:
        """The next token, without consuming it."""
        if self._cur is None:
            self._cur = next(self._tokens)
        return self._cur

    def _next(self) -> Token:
        """Consume and return the next token (EOF repeats forever)."""
        tok = self._peek()
        if tok.kind is not TokenKind.EOF:
            self._cur = None
        return tok

    def _error(self, tok: Token, problem: str) -> MceInjectSyntaxError:
        """A syntax error located at ``tok``."""
        return MceInjectSyntaxError(self._source, tok.line, tok.column, problem)

    def _number_token(self, what: str) -> Token:
        """The next token, which must be a number, for the term named ``what``."""
        tok = self._next()
        if tok.kind is not TokenKind.NUMBER:
            raise self._error(tok, f"{what} expects a number, found {tok.describe()}")
        return tok

    def _check_width(self, tok: Token, what: str, attr: str) -> int:
        """``tok``'s value, if it fits the ``struct mce`` field behind ``attr``."""
        if not _fits(attr, tok.value):
            raise self._error(tok, f"{what} {tok.text} does not fit in {FIELD_BITS[attr]} bits")
        return tok.value

    def _number(self, what: str, attr: str = "") -> int:
        """The next token as a number for ``what``, checked against ``attr``'s field width."""
        return self._check_width(self._number_token(what), what, attr)

    def _accept(self, punct: str) -> bool:
        """Consume ``punct`` if it is next; whether it was."""
        tok = self._peek()
        if tok.kind is TokenKind.PUNCT and tok.text == punct:
            self._next()
            return True
        return False

    def _expect(self, want: str, context: str) -> None:
        """Consume punctuation or a keyword spelled ``want`` (any case), or fail."""
        tok = self._next()
        if tok.text.upper() != want or tok.kind not in (TokenKind.PUNCT, TokenKind.KEYWORD):
            raise self._error(tok, f"{context} expects {want!r}, found {tok.describe()}")

    # -- records

    def records(self) -> list[MceRecord]:
        """Every record up to EOF."""
        out: list[MceRecord] = []
        while self._peek().kind is not TokenKind.EOF:
            out.append(self._record())
        return out

    def _at_record_end(self) -> bool:
        """Whether the next token ends the current record (a record start or EOF)."""
        tok = self._peek()
        return tok.kind is TokenKind.EOF or tok.keyword in (Kw.CPU, Kw.MCE)

    def _record(self) -> MceRecord:
        """One record: its start, its terms, then the effective mode and broadcast."""
        record = self._record_start()
        self._mode = None
        terms = 0
        while not self._at_record_end():
            self._term(record)
            terms += 1
        if not terms:  # mce.y: a record needs at least one term
            tok = self._peek()
            problem = f"record started at line {record.line} has no terms, found {tok.describe()}"
            raise self._error(tok, problem)
        record.mode = default_mode(record.status) if self._mode is None else self._mode
        if record.mode is Mode.POLL:
            record.broadcast = Broadcast.NOBROADCAST
        return record

    def _record_start(self) -> MceRecord:
        """``CPU n``, ``CPU n bank``, ``MCE`` or the kernel-log start, as a fresh record."""
        tok = self._next()
        if tok.keyword is Kw.MCE:
            return MceRecord(line=tok.line)
        if tok.keyword is not Kw.CPU:
            raise self._not_a_start(tok)
        record = MceRecord(cpu=self._number("CPU", "cpu"), line=tok.line)
        if self._peek().kind is TokenKind.NUMBER:
            record.bank = self._number("CPU n bank", "bank")
        elif self._peek().text == ":":
            self._kernel_log_start(record)
        return record

    def _not_a_start(self, tok: Token) -> MceInjectSyntaxError:
        """The error for a token where a record must start."""
        if tok.kind is TokenKind.SYMBOL:
            return self._error(tok, f"unknown keyword {tok.text!r}")
        problem = f"{tok.describe()} before any record; a record starts with CPU or MCE"
        return self._error(tok, problem)

    def _kernel_log_start(self, record: MceRecord) -> None:
        """The rest of ``CPU n: MACHINE CHECK EXCEPTION: <mcgstatus> BANK <b>: <status>``."""
        context = f"kernel-log form '{_KERNEL_LOG_FORM}'"
        self._expect(":", context)
        for word in _KERNEL_LOG_WORDS:
            self._expect(word.value, context)
        self._expect(":", context)
        record.mcg_status = self._number("kernel-log MCG status")
        self._expect(Kw.BANK.value, context)
        record.bank = self._number("BANK", "bank")
        self._expect(":", context)
        record.status = self._number("kernel-log STATUS")

    # -- terms

    def _term(self, record: MceRecord) -> None:
        """One term, applied to ``record`` with mce.y's semantics."""
        tok = self._next()
        kw = tok.keyword
        if kw is None:
            raise self._not_a_term(tok)
        if kw is Kw.STATUS:
            record.status = self._value_list(kw)
        elif kw is Kw.MCGSTATUS:
            record.mcg_status = self._value_list(kw)
        elif kw in _NUMBER_TERMS:
            term = _NUMBER_TERMS[kw]
            setattr(record, term.attr, self._number(kw.value, term.attr))
            record.status |= term.also_status
        elif kw is Kw.RIP:
            self._rip(record)
        elif kw is Kw.PROCESSOR:
            vendor = self._number("PROCESSOR", "vendor")
            self._expect(":", "PROCESSOR vendor:cpuid")
            record.processor = Processor(vendor, self._number("PROCESSOR vendor:", "cpuid"))
        elif not self._delivery_word(record, kw):
            raise self._not_a_term(tok)

    def _value_list(self, kw: Kw) -> int:
        """A possibly empty list of symbols and numbers, ORed together (as in mce.y)."""
        table = _VALUE_LISTS[kw]
        value = 0
        while True:
            tok = self._peek()
            if tok.kind is TokenKind.NUMBER:
                value |= tok.value
            elif tok.keyword is not None and tok.keyword in table:
                value |= table[tok.keyword]
            elif any(tok.keyword in other for other in _VALUE_LISTS.values()):
                owner = _value_list_of(tok)
                raise self._error(tok, f"{kw.value} does not take {tok.describe()} ({owner} does)")
            else:
                return value
            self._next()

    def _rip(self, record: MceRecord) -> None:
        """``RIP ip``, ``RIP cs:ip`` or the kernel-log ``RIP cs:<ip>{symbol}``."""
        first = self._number_token("RIP")
        if not self._accept(":"):
            record.rip = first.value
            return
        record.cs = self._check_width(first, "RIP code segment", "cs")
        if not self._accept("<"):
            record.rip = self._number("RIP cs:")
            return
        record.rip = self._number("RIP cs:<")
        self._expect(">", "RIP cs:<ip>{symbol}")
        self._expect("{", "RIP cs:<ip>{symbol}")
        tok = self._next()
        if tok.kind not in (TokenKind.SYMBOL, TokenKind.KEYWORD):
            raise self._error(tok, f"RIP cs:<ip>{{ expects a symbol name, found {tok.describe()}")
        self._expect("}", "RIP cs:<ip>{symbol}")

    def _delivery_word(self, record: MceRecord, kw: Kw) -> bool:
        """Apply a delivery word; False if ``kw`` is not one."""
        if kw in _BROADCAST_WORDS:
            record.broadcast |= _BROADCAST_WORDS[kw]
        elif kw in _CONTEXT_WORDS:
            record.context = _CONTEXT_WORDS[kw]
        elif kw in _MODE_WORDS:
            self._mode = _MODE_WORDS[kw]
        elif kw is Kw.HOLD:
            record.hold = True
        else:
            return False
        return True

    def _not_a_term(self, tok: Token) -> MceInjectSyntaxError:
        """The error for a token where a term must be, naming what the token is."""
        if tok.kind is TokenKind.SYMBOL:
            return self._error(tok, f"unknown keyword {tok.text!r}")
        owner = _value_list_of(tok)
        if owner:
            return self._error(tok, f"{tok.describe()} is a {owner} value outside a {owner} list")
        if tok.keyword in _KERNEL_LOG_WORDS:
            problem = f"{tok.describe()} belongs only in the kernel-log form '{_KERNEL_LOG_FORM}'"
            return self._error(tok, problem)
        return self._error(tok, f"expected a keyword, found {tok.describe()}")


def _value_list_of(tok: Token) -> str:
    """``STATUS`` or ``MCGSTATUS`` if ``tok`` is one of their symbols, else ``''``."""
    for kw, table in _VALUE_LISTS.items():
        if tok.keyword in table:
            return kw.value
    return ""


def parse(text: str, source: str = "<input>") -> list[MceRecord]:
    """Parse mce-inject text into records; ``source`` names the input in error messages."""
    return _Parser(iter_tokens(text, source), source).records()


def parse_file(path: str | os.PathLike[str]) -> list[MceRecord]:
    """Parse an mce-inject file (UTF-8; undecodable bytes become an error where they stand)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return parse(text, str(path))


# --------------------------------------------------------------------------------------------
# Rendering


def _hex(value: int) -> str:
    """A number as the renderer writes it: ``0`` or lowercase hex with ``0x``."""
    return "0" if value == 0 else f"{value:#x}"


def _single_bits(table: dict[Kw, int], *, high_first: bool) -> list[tuple[Kw, int]]:
    """The one-bit symbols of a value table, one per bit (aliases such as SRAO = S dropped)."""
    by_bit: dict[int, Kw] = {}
    for kw, value in table.items():
        if value and value & (value - 1) == 0:
            by_bit.setdefault(value, kw)
    return [(by_bit[bit], bit) for bit in sorted(by_bit, reverse=high_first)]


#: Rendering order: STATUS high bit first (VAL UC EN ...), MCGSTATUS low first (RIPV EIPV MCIP).
_STATUS_BITS = _single_bits(STATUS_VALUES, high_first=True)
_MCG_STATUS_BITS = _single_bits(MCG_STATUS_VALUES, high_first=False)


def _value_words(value: int, bits: Sequence[tuple[Kw, int]]) -> str:
    """``value`` as a value list: the named bits, then any remaining bits as one number."""
    words = [kw.value for kw, mask in bits if value & mask]
    rest = value
    for _, mask in bits:
        rest &= ~mask
    if rest or not words:
        words.append(_hex(rest))
    return " ".join(words)


def _status_lines(record: MceRecord) -> list[str]:
    """STATUS with ADDR/MISC around it: STATUS replaces the register, ADDR/MISC OR in their
    valid bit, so a term whose bit is set goes after STATUS and one whose bit is clear before."""
    before: list[str] = []
    after: list[str] = []
    status = record.status
    for kw, value, valid in (
        (Kw.ADDR, record.addr, MCI_STATUS_ADDRV),
        (Kw.MISC, record.misc, MCI_STATUS_MISCV),
    ):
        if status & valid:
            after.append(f"{kw.value} {_hex(value)}")
            status &= ~valid
        elif value:
            before.append(f"{kw.value} {_hex(value)}")
    return [*before, f"STATUS {_value_words(status, _STATUS_BITS)}", *after]


def _delivery_lines(record: MceRecord) -> list[str]:
    """Delivery words, leaving out what is implied (default mode, POLL's NOBROADCAST)."""
    lines: list[str] = []
    if record.mode is not default_mode(record.status):
        lines.append(record.mode.name)
    if record.mode is Mode.EXCP:
        lines += [kw.value for kw, flag in _BROADCAST_WORDS.items() if flag in record.broadcast]
    lines += [kw.value for kw, ctx in _CONTEXT_WORDS.items() if ctx is record.context]
    if record.hold:
        lines.append(Kw.HOLD.value)
    return lines


def _render_lines(record: MceRecord) -> list[str]:
    """The lines of :meth:`MceRecord.render`; zero-valued optional terms are left out."""
    lines = ["MCE" if record.cpu is None else f"CPU {record.cpu}", f"BANK {record.bank}"]
    if record.mcg_status:
        lines.append(f"MCGSTATUS {_value_words(record.mcg_status, _MCG_STATUS_BITS)}")
    lines += _status_lines(record)
    if record.cs is not None:
        lines.append(f"RIP {_hex(record.cs)}:{_hex(record.rip)}")
    elif record.rip:
        lines.append(f"RIP {_hex(record.rip)}")
    for kw, value, text in (
        (Kw.TSC, record.tsc, _hex(record.tsc)),
        (Kw.TIME, record.time, str(record.time)),
        (Kw.SOCKETID, record.socketid, str(record.socketid)),
        (Kw.APICID, record.apicid, str(record.apicid)),
        (Kw.MCGCAP, record.mcgcap, _hex(record.mcgcap)),
    ):
        if value:
            lines.append(f"{kw.value} {text}")
    if record.processor is not None:
        lines.append(f"PROCESSOR {record.processor.vendor}:{_hex(record.processor.cpuid)}")
    return lines + _delivery_lines(record)


# --------------------------------------------------------------------------------------------
# Delivery plan (mce-inject.c)


@dataclass(frozen=True)
class Injection:
    """One injection by the tool: a non-HOLD record on ``cpu`` plus what every other CPU gets.

    ``targets`` lists (cpu, record) in the order of ``online_cpus``, the primary included.
    """

    cpu: int
    targets: list[tuple[int, MceRecord]]
    mode: Mode
    line: int


def _secondary(record: MceRecord, cpu: int) -> MceRecord:
    """The record the tool synthesises for a CPU that has nothing held: it only has to take the
    #MC, so MCIP is copied, RIPV set for UC, and STATUS is the UC bit alone (no VAL)."""
    uc = record.status & MCI_STATUS_UC
    mcg = (record.mcg_status & MCG_STATUS_MCIP) | (MCG_STATUS_RIPV if uc else 0)
    return MceRecord(cpu=cpu, status=uc, mcg_status=mcg, mode=Mode.EXCP, line=record.line)


def _others(
    record: MceRecord, online_cpus: Sequence[int], held: dict[int, MceRecord]
) -> list[tuple[int, MceRecord]]:
    """(cpu, record) for every online CPU but the primary; see :func:`broadcast_records`."""
    primary = target_cpu(record)
    suppress = record.mode is Mode.POLL or Broadcast.NOBROADCAST in record.broadcast
    out: list[tuple[int, MceRecord]] = []
    for cpu in online_cpus:
        if cpu == primary:
            continue
        if cpu in held:
            out.append((cpu, held[cpu]))
        elif not suppress:
            out.append((cpu, _secondary(record, cpu)))
    return out


def broadcast_records(
    record: MceRecord, online_cpus: list[int], held: dict[int, MceRecord]
) -> list[MceRecord]:
    """What the other online CPUs get when ``record`` is injected, in ``online_cpus`` order.

    A CPU with a HOLD record in ``held`` (keyed by CPU) always gets it, even under NOBROADCAST.
    Any other CPU gets a synthetic record (see :func:`_secondary`), unless the record is POLL or
    says NOBROADCAST. The primary CPU's own held record is dropped, as the tool does.
    """
    return [r for _, r in _others(record, online_cpus, held)]


def _require_online(record: MceRecord, online_cpus: Sequence[int]) -> int:
    """The record's CPU, which must be online (the tool's ``cpu_id_to_index`` check)."""
    cpu = target_cpu(record)
    if cpu not in online_cpus:
        raise ValueError(f"record at line {record.line}: CPU {cpu} is not online")
    return cpu


def resolve(records: list[MceRecord], online_cpus: list[int]) -> list[Injection]:
    """Group HOLD records with the next non-HOLD record and plan each injection, in file order.

    A later HOLD record for the same CPU replaces an earlier one; HOLD records left at the end
    of the input are never injected (as with the tool). Raises ``ValueError`` if a record names
    a CPU that is not in ``online_cpus``. Contexts are passed through as written (the tool also
    turns a RANDOM primary into IN_PROC, and ``--no-random`` every RANDOM record).
    """
    held: dict[int, MceRecord] = {}
    out: list[Injection] = []
    for record in records:
        cpu = _require_online(record, online_cpus)
        if record.hold:
            held[cpu] = record
            continue
        others = dict(_others(record, online_cpus, held))
        targets = [
            (c, record if c == cpu else others[c]) for c in online_cpus if c == cpu or c in others
        ]
        out.append(Injection(cpu, targets, record.mode, record.line))
        held = {}
    return out
