"""Xen's ``xen-mceinj`` command line and error table (xen-vmce.md section 7), parsed purely.

``xen-mceinj [-D] [-c CPU] [-d DOMID] [-p ADDR] [-t TYPE] [-l] [-h]`` describes a host machine
check: the error table row ``TYPE`` (MCG_STATUS, host bank, STATUS, MISC, #MC or CMCI) on host
CPU ``CPU`` at address ``ADDR``, a guest-physical address of ``DOMID`` or, for the default
DOMID_XEN, a machine address. vmce runs it through the host path (:mod:`vmce.host.memerr`), as
Xen does with the interposed MSRs.

The tool's known option bugs are fixed, not copied:

* ``--cpu``, ``--domain``, ``--page`` take their argument (the tool declares them without one)
  and ``--type`` exists (the tool's long-option table lacks it); ``--opt=value`` works too.
* An unknown option, a missing value or a stray argument is an error (exit status 2), not the
  help text with exit status 0.
* ``-t`` is checked against the table and ``-c``/``-d``/``-p`` against their ranges, with a
  message naming the option; numbers keep the tool's base auto-detection (``0x..``, ``0..``)
  and its refusal of trailing garbage.
* ``-l`` with the CMCI type is refused with the tool's message ("No support to inject CMCI as
  LMCE").
* The table's rows 0 and 1 keep their printed names, but :attr:`ErrorType.what` says what the
  bits mean (the names are swapped relative to their MCACODs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from vmce.host.memory import DOMID_XEN
from vmce.mca.constants import MCG_STATUS_LMCE

#: The tool's default address (``-p``).
DEFAULT_ADDR = 0x180020
#: Highest CPU number Xen accepts (NR_CPUS on a large build).
MAX_CPU = 4095
#: Domain ids of real domains (below DOMID_FIRST_RESERVED).
DOMID_FIRST_RESERVED = 0x7FF0

USAGE = """\
Usage: xen-mceinj [-D] [-c CPU] [-d DOMID] [-p ADDR] [-t TYPE] [-l] [-h]
  -D, --dump          only print the target address, inject nothing
  -c, --cpu=CPU       host CPU that takes the machine check (default 0)
  -d, --domain=DOMID  domain owning ADDR; ADDR is then guest-physical
                      (default DOMID_XEN: ADDR is a machine address)
  -p, --page=ADDR     address reported in MCi_ADDR (default 0x180020)
  -t, --type=TYPE     error type, one of the table below (default 0)
  -l, --lmce          inject as an Intel local machine check (LMCE)
  -h, --help          this help
"""


class Delivery(Enum):
    """How the host raises the error."""

    MCE = "#MC"
    CMCI = "CMCI"


@dataclass(frozen=True)
class ErrorType:
    """One row of the tool's error table."""

    index: int
    name: str
    mcg_status: int
    bank: int
    status: int
    misc: int
    delivery: Delivery
    what: str


ERROR_TYPES: tuple[ErrorType, ...] = (
    ErrorType(
        0,
        "MCE_SRAO_MEM",
        0x5,
        7,
        0xBD2000008000017A,
        0x86,
        Delivery.MCE,
        "SRAO L3 explicit write-back error (MCACOD 0x17a)",
    ),
    ErrorType(
        1,
        "MCE_SRAO_LLC",
        0x5,
        8,
        0xBD000000004000CF,
        0x86,
        Delivery.MCE,
        "SRAO memory patrol-scrub error (MCACOD 0xcf)",
    ),
    ErrorType(
        2,
        "CMCI_UCNA_LLC",
        0x0,
        9,
        0xBC20000080000136,
        0x86,
        Delivery.CMCI,
        "UCNA (uncorrected, no action) raised by CMCI",
    ),
    ErrorType(
        3,
        "AMD L1 icache parity",
        0x5,
        1,
        0x9400000000000151,
        0x86,
        Delivery.MCE,
        "corrected instruction-cache error",
    ),
    ErrorType(
        4,
        "MCE_SRAO_MEM (Fatal)",
        0x5,
        7,
        0xBF2000008000017A,
        0x86,
        Delivery.MCE,
        "as type 0 with PCC: fatal, the host panics",
    ),
)


class XenMceInjError(ValueError):
    """A command line the (fixed) tool refuses; ``str()`` is the message."""


@dataclass(frozen=True)
class XenMceInj:
    """A parsed ``xen-mceinj`` command line."""

    dump: bool = False
    cpu: int = 0
    domid: int = DOMID_XEN
    addr: int = DEFAULT_ADDR
    type: int = 0
    lmce: bool = False
    help: bool = False

    @property
    def error(self) -> ErrorType:
        return ERROR_TYPES[self.type]

    @property
    def guest_address(self) -> bool:
        """Whether ADDR is a guest-physical address of :attr:`domid` (not a machine address)."""
        return self.domid < DOMID_FIRST_RESERVED

    @property
    def mcg_status(self) -> int:
        """MCG_STATUS as the tool interposes it (LMCE added with ``-l``)."""
        return self.error.mcg_status | (MCG_STATUS_LMCE if self.lmce else 0)

    def dump_text(self) -> str:
        """What ``-D`` prints."""
        who = f"Dom{self.domid}" if self.guest_address else "Xen"
        return f"{who}: gaddr={self.addr:#x}"


def table_text() -> str:
    """The error table as the help prints it."""
    rows = [
        f"  {t.index}: {t.name:<22} bank {t.bank}  status {t.status:#018x}  "
        f"MCG_STATUS {t.mcg_status:#x}  {t.delivery.value}  ({t.what})"
        for t in ERROR_TYPES
    ]
    return "Error types (-t):\n" + "\n".join(rows) + "\n"


_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_VALUED = {
    "-c": "cpu",
    "--cpu": "cpu",
    "-d": "domain",
    "--domain": "domain",
    "-p": "page",
    "--page": "page",
    "-t": "type",
    "--type": "type",
}
_FLAGS = {
    "-D": "dump",
    "--dump": "dump",
    "-l": "lmce",
    "--lmce": "lmce",
    "-h": "help",
    "--help": "help",
}


def _number(option: str, text: str, limit: int) -> int:
    if not _NUMBER.fullmatch(text):
        raise XenMceInjError(f"{option}: '{text}' is not a number (e.g. 0x3000000, 017, 42)")
    value = (
        int(text, 16) if text[:2].lower() == "0x" else int(text, 8) if text[0] == "0" else int(text)
    )
    if value > limit:
        raise XenMceInjError(f"{option}: {text} is out of range (at most {limit:#x})")
    return value


def _split(args: list[str]) -> list[tuple[str, str | None]]:
    """(option, value) pairs; values joined from ``-cN``, ``--cpu=N`` or the next word."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word.startswith("--"):
            name, eq, inline = word.partition("=")
            value: str | None = inline if eq else None
        elif word.startswith("-") and len(word) > 1:
            name, value = word[:2], (word[2:] or None)
        else:
            raise XenMceInjError(f"unexpected argument '{word}' (options only; see -h)")
        if name in _FLAGS:
            if value is not None:
                if name.startswith("--"):
                    raise XenMceInjError(f"{name} takes no value")
                # bundled short flags such as -Dl
                out.append((name, None))
                args = [*args[:i], f"-{value}", *args[i:]]
                continue
            out.append((name, None))
        elif name in _VALUED:
            if value is None:
                if i >= len(args):
                    raise XenMceInjError(f"{name} needs a value")
                value = args[i]
                i += 1
            out.append((name, value))
        else:
            raise XenMceInjError(f"unknown option '{word}' (see -h)")
    return out


def parse_args(args: list[str]) -> XenMceInj:
    """Parse ``xen-mceinj`` options; raises :class:`XenMceInjError`."""
    fields: dict[str, object] = {}
    for name, value in _split(args):
        key = _FLAGS.get(name) or _VALUED[name]
        if value is None:
            fields[key] = True
        elif key == "cpu":
            fields["cpu"] = _number(name, value, MAX_CPU)
        elif key == "domain":
            fields["domid"] = _number(name, value, 0xFFFF)
        elif key == "page":
            fields["addr"] = _number(name, value, (1 << 64) - 1)
        else:
            t = _number(name, value, 1 << 32)
            if t >= len(ERROR_TYPES):
                raise XenMceInjError(
                    f"{name}: no error type {t} (0..{len(ERROR_TYPES) - 1}; see -h)"
                )
            fields["type"] = t
    opts = XenMceInj(**fields)  # type: ignore[arg-type]
    if opts.lmce and opts.error.delivery is Delivery.CMCI:
        raise XenMceInjError("No support to inject CMCI as LMCE")
    return opts
