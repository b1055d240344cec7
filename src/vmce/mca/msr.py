"""MSR numbers of the x86 Machine Check Architecture and the bank-MSR arithmetic.

Bank MSRs follow Xen literally: for ``m`` in ``0x400..0x47f`` the bank is ``(m - 0x400) // 4``
and the register kind is selected by ``m & 0xFFFFFC03`` (see the reference, section 1.1).
"""

from __future__ import annotations

from enum import IntEnum


class Msr(IntEnum):
    """Architectural MSR indices involved in machine-check handling."""

    P5_MC_ADDR = 0x0
    P5_MC_TYPE = 0x1
    FEATURE_CONTROL = 0x3A
    MCG_CAP = 0x179
    MCG_STATUS = 0x17A
    MCG_CTL = 0x17B
    MCG_EIP = 0x189
    MC0_CTL2 = 0x280
    MC0_CTL = 0x400
    MC0_STATUS = 0x401
    MC0_ADDR = 0x402
    MC0_MISC = 0x403
    VMX_BASIC = 0x480
    MCG_EXT_CTL = 0x4D0
    F10_MC4_MISC1 = 0xC0000408
    F10_MC4_MISC2 = 0xC0000409
    F10_MC4_MISC3 = 0xC000040A
    K8_HWCR = 0xC0010015


class BankReg(IntEnum):
    """The four registers of a legacy MCA bank, by their offset within the bank."""

    CTL = 0
    STATUS = 1
    ADDR = 2
    MISC = 3


#: Legacy bank space: banks 0..31 (0x480 is IA32_VMX_BASIC).
MAX_BANKS = 32
BANK_MSR_FIRST = 0x400
BANK_MSR_LAST = 0x47F
CTL2_MSR_FIRST = 0x280
CTL2_MSR_LAST = 0x29F
#: Xen selects the register kind with this mask (the two's complement of 0x400, OR 3).
BANK_KIND_MASK = 0xFFFFFC03

#: MSR ranges that Xen (>= 4.15/4.17) routes to the vMCE and nowhere else, as (first, count).
VMCE_ROUTED_RANGES: tuple[tuple[int, int], ...] = (
    (Msr.P5_MC_ADDR, 2),
    (Msr.MCG_CAP, 3),
    (CTL2_MSR_FIRST, CTL2_MSR_LAST - CTL2_MSR_FIRST + 1),
    (BANK_MSR_FIRST, BANK_MSR_LAST - BANK_MSR_FIRST + 1),
    (Msr.MCG_EXT_CTL, 1),
)

#: AMD Fam10h+ thresholding registers that an AMD host's vMCE claims.
AMD_THRESHOLD_MSRS = (Msr.F10_MC4_MISC1, Msr.F10_MC4_MISC2, Msr.F10_MC4_MISC3)


def bank_msr(bank: int, reg: BankReg) -> int:
    """The MSR index of ``reg`` in legacy bank ``bank``."""
    if not 0 <= bank < MAX_BANKS:
        raise ValueError(f"bank {bank} is outside the legacy bank space 0..{MAX_BANKS - 1}")
    return BANK_MSR_FIRST + 4 * bank + int(reg)


def ctl2_msr(bank: int) -> int:
    """The MSR index of IA32_MCi_CTL2 for ``bank``."""
    if not 0 <= bank < MAX_BANKS:
        raise ValueError(f"bank {bank} is outside the legacy bank space 0..{MAX_BANKS - 1}")
    return CTL2_MSR_FIRST + bank


def is_vmce_routed(msr: int) -> bool:
    """Whether Xen's generic MSR layer sends ``msr`` to the vMCE (section 3.1)."""
    return any(first <= msr < first + count for first, count in VMCE_ROUTED_RANGES)


def split_bank_msr(msr: int) -> tuple[int, BankReg] | None:
    """``(bank, register)`` for a legacy bank MSR, or ``None`` for anything else."""
    if not BANK_MSR_FIRST <= msr <= BANK_MSR_LAST:
        return None
    kind = msr & BANK_KIND_MASK
    return (msr - BANK_MSR_FIRST) // 4, BankReg(kind - BANK_MSR_FIRST)


def msr_name(msr: int) -> str:
    """A human name for an MCA MSR index, e.g. ``MC1_STATUS`` or ``MCG_CAP``."""
    split = split_bank_msr(msr)
    if split is not None:
        bank, reg = split
        return f"MC{bank}_{reg.name}"
    if CTL2_MSR_FIRST <= msr <= CTL2_MSR_LAST:
        return f"MC{msr - CTL2_MSR_FIRST}_CTL2"
    try:
        return Msr(msr).name
    except ValueError:
        return f"MSR_{msr:#x}"
