"""Named machine-check errors a user can ask for by name (``vmce run --inject srao``).

Encodings follow QEMU's and the mce-test suite's (kvm-linux.md 2.5 and 3.6): MISC 0x86 says
"physical address, LSB 6".
"""

from __future__ import annotations

from dataclasses import dataclass

from vmce.vmce import BankRecord


@dataclass(frozen=True)
class NamedError:
    """A catalogue entry: the bank record (without address) and the MCG_STATUS to raise."""

    name: str
    status: int
    mcg_status: int
    misc: int
    description: str

    def record(self, addr: int) -> BankRecord:
        return BankRecord(self.status, addr, self.misc)


CATALOG: dict[str, NamedError] = {
    e.name: e
    for e in (
        NamedError(
            "srao",
            0xBD000000000000C0,
            0x5,
            0x86,
            "SRAO memory patrol-scrub error (action optional)",
        ),
        NamedError(
            "srao-l3",
            0xBD2000000000017A,
            0x5,
            0x86,
            "SRAO L3 explicit write-back error (action optional)",
        ),
        NamedError("srar", 0xBD80000000000134, 0x7, 0x86, "SRAR data load error (action required)"),
        NamedError(
            "srar-ifetch",
            0xBD80000000000150,
            0x7,
            0x86,
            "SRAR instruction fetch error (action required)",
        ),
        NamedError(
            "ucna",
            0xBC00000000000136,
            0x0,
            0x86,
            "UCNA: uncorrected, no action required (logged, no #MC in Linux)",
        ),
        NamedError("fatal", 0xBF000000000000C0, 0x5, 0x86, "fatal: processor context corrupt"),
        NamedError("corrected", 0x9C000000000000C0, 0x5, 0x86, "corrected memory error"),
    )
}


def lookup(name: str) -> NamedError:
    """The catalogue entry called ``name``; ``KeyError`` lists the names."""
    try:
        return CATALOG[name.lower()]
    except KeyError:
        names = ", ".join(CATALOG)
        raise KeyError(f"unknown error {name!r} (known: {names})") from None
