"""Error classes of an MCi_STATUS value, as the Intel SDM and Xen's host handler grade them."""

from __future__ import annotations

from enum import Enum

from vmce.mca.constants import (
    MCI_MISC_ADDR_MODE,
    MCI_MISC_PHYSMOD,
    MCI_STATUS_ADDRV,
    MCI_STATUS_AR,
    MCI_STATUS_EN,
    MCI_STATUS_MCACOD,
    MCI_STATUS_MISCV,
    MCI_STATUS_OVER,
    MCI_STATUS_PCC,
    MCI_STATUS_S,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
)


class ErrorClass(Enum):
    """Xen's ``mce_severity`` types (reference section 5.2), in the order it tests them."""

    INVALID = "invalid"
    FATAL = "fatal"
    CORRECTED = "CE"
    SRAR = "SRAR"
    SRAO = "SRAO"
    UCNA = "UCNA"

    @property
    def description(self) -> str:
        return _CLASS_TEXT[self]


_CLASS_TEXT = {
    ErrorClass.INVALID: "no valid error (VAL clear)",
    ErrorClass.FATAL: "fatal: processor context corrupt or unrecoverable",
    ErrorClass.CORRECTED: "corrected error",
    ErrorClass.SRAR: "software recoverable, action required",
    ErrorClass.SRAO: "software recoverable, action optional",
    ErrorClass.UCNA: "uncorrected, no action required",
}


class Mcacod(Enum):
    """The MCACOD values Xen's Intel memory-error path acts on (exact match on bits 15:0)."""

    MEMORY_SCRUB = "memory patrol-scrub error"
    L3_WRITEBACK = "L3 explicit write-back error"
    DATA_LOAD = "data load error"
    INSTRUCTION_FETCH = "instruction fetch error"
    OTHER = "other"

    @property
    def description(self) -> str:
        return self.value


def classify(status: int, *, ser: bool = True) -> ErrorClass:
    """Grade ``status`` as Xen's Intel ``mce_severity`` does; ``ser`` is the host's SER_P."""
    if not status & MCI_STATUS_VAL:
        return ErrorClass.INVALID
    if status & MCI_STATUS_PCC:
        return ErrorClass.FATAL
    if not status & MCI_STATUS_UC:
        return ErrorClass.CORRECTED
    if not ser:
        return ErrorClass.FATAL
    if status & MCI_STATUS_S:
        if status & MCI_STATUS_AR:
            return ErrorClass.FATAL if status & MCI_STATUS_OVER else ErrorClass.SRAR
        return ErrorClass.SRAO
    return ErrorClass.UCNA


def mcacod_kind(status: int) -> Mcacod:
    """Which of the memory-error MCACODs ``status`` carries, if any."""
    code = status & MCI_STATUS_MCACOD
    if 0x00C0 <= code <= 0x00CF:
        return Mcacod.MEMORY_SCRUB
    if code == 0x017A:
        return Mcacod.L3_WRITEBACK
    if code == 0x0134:
        return Mcacod.DATA_LOAD
    if code == 0x0150:
        return Mcacod.INSTRUCTION_FETCH
    return Mcacod.OTHER


def is_recoverable(status: int, *, ser: bool = True) -> bool:
    """Xen's "recoverable" scan of one bank (a bank failing it makes the host panic)."""
    uc = bool(status & MCI_STATUS_UC)
    en = bool(status & MCI_STATUS_EN)
    over = bool(status & MCI_STATUS_OVER)
    pcc = bool(status & MCI_STATUS_PCC)
    s = bool(status & MCI_STATUS_S)
    ar = bool(status & MCI_STATUS_AR)
    if not uc:
        return True
    if not ser:
        return False
    if not en and not over:
        return True  # spurious
    if s and ar:
        return not over and not pcc and en
    if s:
        return not pcc and en
    return not over and en and not pcc and not ar


def address_is_physical(status: int, misc: int) -> bool:
    """Intel rule: ADDRV and MISCV set and MISC address mode == 2 (physical)."""
    return (
        bool(status & MCI_STATUS_ADDRV)
        and bool(status & MCI_STATUS_MISCV)
        and (misc & MCI_MISC_ADDR_MODE) == MCI_MISC_PHYSMOD
    )


class AmdAddressKind(Enum):
    """How an AMD host classifies an error address by its error-code type (section 1.6)."""

    PHYSICAL = "physical"
    VIRTUAL = "virtual"
    UNKNOWN = "unknown"


def amd_address_kind(status: int) -> AmdAddressKind:
    """Bus (bit 11) or memory (bit 8) codes are physical; TLB (bit 4) virtual."""
    code = status & 0xFFFF
    if code & 0x0800 or code & 0x0100:
        return AmdAddressKind.PHYSICAL
    if code & 0x0010:
        return AmdAddressKind.VIRTUAL
    return AmdAddressKind.UNKNOWN
