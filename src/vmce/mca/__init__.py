"""Architecture only: MSR numbers, register bit fields and their codecs, error classes."""

from vmce.mca.bits import (
    MCG_CAP,
    MCG_EXT_CTL,
    MCG_STATUS,
    MCI_CTL2,
    MCI_MISC,
    MCI_STATUS,
    REGISTERS,
    Field,
    Register,
)
from vmce.mca.classify import ErrorClass, Mcacod, classify, mcacod_kind
from vmce.mca.msr import BankReg, Msr, bank_msr, ctl2_msr, msr_name, split_bank_msr

__all__ = [
    "MCG_CAP",
    "MCG_EXT_CTL",
    "MCG_STATUS",
    "MCI_CTL2",
    "MCI_MISC",
    "MCI_STATUS",
    "REGISTERS",
    "BankReg",
    "ErrorClass",
    "Field",
    "Mcacod",
    "Msr",
    "Register",
    "bank_msr",
    "classify",
    "ctl2_msr",
    "mcacod_kind",
    "msr_name",
    "split_bank_msr",
]
