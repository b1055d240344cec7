"""Guest RDMSR/WRMSR emulation of the MCA MSRs, exactly as Xen's vMCE answers them.

Two layers, as in Xen (reference sections 3 and 9):

* :func:`vmce_rdmsr` / :func:`vmce_wrmsr` return Xen's three-way outcome: ``GP`` (< 0, the guest
  gets #GP(0)), ``UNHANDLED`` (0) or ``HANDLED`` (> 0) with the value read.
* :class:`MsrTable` is the routing layer: for the MSRs Xen routes to the vMCE it turns
  ``UNHANDLED`` into read-as-zero / write-ignored, and answers each access with a value or #GP.
  It is a dictionary of per-MSR handlers built once per host profile, so a guest access costs one
  lookup and one call.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from vmce.mca.constants import (
    ALL_ONES,
    MCG_CTL_P,
    MCG_LMCE_P,
)
from vmce.mca.msr import (
    AMD_THRESHOLD_MSRS,
    BANK_KIND_MASK,
    BANK_MSR_FIRST,
    CTL2_MSR_FIRST,
    VMCE_ROUTED_RANGES,
    BankReg,
    Msr,
)
from vmce.vmce.profile import GUEST_MC_BANK_NUM, HostProfile, Vendor
from vmce.vmce.state import VCpu


class Outcome(IntEnum):
    """Xen's vMCE return convention."""

    GP = -1
    UNHANDLED = 0
    HANDLED = 1


class MsrAccess(NamedTuple):
    """The outcome of one emulated access and, for reads, the value (0 unless handled)."""

    outcome: Outcome
    value: int = 0


_GP = MsrAccess(Outcome.GP, 0)
_UNHANDLED = MsrAccess(Outcome.UNHANDLED, 0)
_DONE = MsrAccess(Outcome.HANDLED, 0)
_ONES = MsrAccess(Outcome.HANDLED, ALL_ONES)


def _handled(value: int) -> MsrAccess:
    return MsrAccess(Outcome.HANDLED, value)


def mce_bank_msr(profile: HostProfile, vcpu: VCpu, msr: int) -> bool:
    """Xen's ``mce_bank_msr``: is ``msr`` a bank MSR of this vCPU (range from its MCG_CAP)?"""
    count = vcpu.mcg_cap & 0xFF
    if BANK_MSR_FIRST <= msr < BANK_MSR_FIRST + 4 * count:
        return True
    if CTL2_MSR_FIRST <= msr < CTL2_MSR_FIRST + count:
        return True
    return profile.is_amd_like and msr in AMD_THRESHOLD_MSRS


def _bank_kind(msr: int) -> BankReg | None:
    kind = msr & BANK_KIND_MASK
    if BANK_MSR_FIRST <= kind <= BANK_MSR_FIRST + 3:
        return BankReg(kind - BANK_MSR_FIRST)
    return None


def vmce_rdmsr(
    profile: HostProfile, vcpu: VCpu, msr: int, guest_vendor: Vendor | None = None
) -> MsrAccess:
    """Layer 1 read: Xen's ``vmce_rdmsr`` for any MSR index."""
    if msr == Msr.MCG_STATUS:
        return _handled(vcpu.mcg_status)
    if msr == Msr.MCG_CAP:
        return _handled(vcpu.mcg_cap)
    if msr == Msr.MCG_CTL:
        return _ONES if vcpu.mcg_cap & MCG_CTL_P else _DONE
    if msr == Msr.MCG_EXT_CTL:
        return _handled(vcpu.mcg_ext_ctl) if vcpu.mcg_cap & MCG_LMCE_P else _GP
    if msr in (Msr.P5_MC_ADDR, Msr.P5_MC_TYPE):
        if not profile.has_p5_aliases:
            return _UNHANDLED
        bank1 = vcpu.banks[1]
        return _handled(bank1.addr if msr == Msr.P5_MC_ADDR else bank1.status)
    if not mce_bank_msr(profile, vcpu, msr):
        return _UNHANDLED
    return _bank_rdmsr(profile, vcpu, msr, guest_vendor or profile.vendor)


def _bank_rdmsr(profile: HostProfile, vcpu: VCpu, msr: int, guest_vendor: Vendor) -> MsrAccess:
    kind = _bank_kind(msr)
    bank = (msr - BANK_MSR_FIRST) // 4
    if kind is BankReg.CTL:
        return _ONES
    if kind is not None:
        if bank >= GUEST_MC_BANK_NUM:
            return _DONE
        b = vcpu.banks[bank]
        return _handled(
            b.status if kind is BankReg.STATUS else b.addr if kind is BankReg.ADDR else b.misc
        )
    return _vendor_rdmsr(profile, vcpu, msr, guest_vendor)


def _vendor_rdmsr(profile: HostProfile, vcpu: VCpu, msr: int, guest_vendor: Vendor) -> MsrAccess:
    if profile.is_amd_like:
        return _DONE  # vmce_amd_rdmsr: thresholding registers read 0, handled
    if not profile.has_ctl2 or not CTL2_MSR_FIRST <= msr < CTL2_MSR_FIRST + 32:
        return _UNHANDLED
    if guest_vendor is not Vendor.INTEL:
        return _UNHANDLED
    bank = msr - CTL2_MSR_FIRST
    return _handled(vcpu.banks[bank].ctl2) if bank < GUEST_MC_BANK_NUM else _DONE


def vmce_wrmsr(profile: HostProfile, vcpu: VCpu, msr: int, value: int) -> MsrAccess:
    """Layer 1 write: Xen's ``vmce_wrmsr`` for any MSR index. Mutates ``vcpu`` on success."""
    if msr == Msr.MCG_CTL:
        return _DONE
    if msr == Msr.MCG_STATUS:
        with vcpu.lock:
            vcpu.mcg_status = value
        return _DONE
    if msr == Msr.MCG_CAP:
        return _DONE  # read-only; writes are ignored, not #GP (Xen >= 4.3)
    if msr == Msr.MCG_EXT_CTL:
        if vcpu.mcg_cap & MCG_LMCE_P and not value & ~1:
            vcpu.mcg_ext_ctl = value
            return _DONE
        return _GP
    if msr in (Msr.P5_MC_ADDR, Msr.P5_MC_TYPE):
        return _DONE if profile.has_p5_aliases else _UNHANDLED
    if not mce_bank_msr(profile, vcpu, msr):
        return _UNHANDLED
    return _bank_wrmsr(profile, vcpu, msr, value)


def _bank_wrmsr(profile: HostProfile, vcpu: VCpu, msr: int, value: int) -> MsrAccess:
    kind = _bank_kind(msr)
    bank = (msr - BANK_MSR_FIRST) // 4
    if kind is BankReg.CTL:
        return _DONE  # MCi_CTL sticks at all 1's
    if kind is not None:
        if value:
            return _GP
        if bank < GUEST_MC_BANK_NUM:
            b = vcpu.banks[bank]
            with vcpu.lock:
                if kind is BankReg.STATUS:
                    b.status = 0
                elif kind is BankReg.ADDR:
                    b.addr = 0
                else:
                    b.misc = 0
        return _DONE
    if profile.is_amd_like:
        return _DONE  # vmce_amd_wrmsr ignores the write
    if not profile.has_ctl2 or not CTL2_MSR_FIRST <= msr < CTL2_MSR_FIRST + 32:
        return _UNHANDLED
    bank = msr - CTL2_MSR_FIRST
    if bank < GUEST_MC_BANK_NUM:
        vcpu.banks[bank].ctl2 = value  # stored verbatim, for any guest vendor
    return _DONE


#: What current Xen's SVM MSR code answers for the AMD Fam10h thresholding registers ("Locked").
AMD_THRESHOLD_LOCKED = 1 << 61


ReadFn = Callable[[VCpu], int | None]
WriteFn = Callable[[VCpu, int], bool]


def _always(value: int) -> ReadFn:
    return lambda _v: value


def _accept(_v: VCpu, _value: int) -> bool:
    return True


class MsrTable:
    """The routing layer for one host profile and guest vendor.

    ``read(vcpu, msr)`` returns the value the guest's RDMSR gets, or ``None`` for #GP;
    ``write(vcpu, msr, value)`` returns ``False`` for #GP. Both raise ``KeyError`` for an MSR
    that is not routed to the vMCE (the caller decides what such an MSR does).

    Each MSR gets a handler specialised when the table is built, so that an access is one
    dictionary lookup and one small call; the tests check every handler against the
    layer-1 functions above. A guest write of a bank register takes the vCPU's lock, so it
    never lands between the stores of a fill; MCG_STATUS is one store and takes none.
    """

    def __init__(self, profile: HostProfile, guest_vendor: Vendor | None = None) -> None:
        self.profile = profile
        self.guest_vendor = guest_vendor or profile.vendor
        self.readers: dict[int, ReadFn] = {}
        self.writers: dict[int, WriteFn] = {}
        for first, count in VMCE_ROUTED_RANGES:
            for msr in range(first, first + count):
                self.readers[msr], self.writers[msr] = self._handlers(msr)
        if profile.is_amd_like:
            for msr in AMD_THRESHOLD_MSRS:
                self.readers[msr] = _always(AMD_THRESHOLD_LOCKED)
                self.writers[msr] = _accept

    @property
    def msrs(self) -> frozenset[int]:
        """Every MSR index this table answers."""
        return frozenset(self.readers)

    def handles(self, msr: int) -> bool:
        return msr in self.readers

    def read(self, vcpu: VCpu, msr: int) -> int | None:
        return self.readers[msr](vcpu)

    def write(self, vcpu: VCpu, msr: int, value: int) -> bool:
        return self.writers[msr](vcpu, value)

    def _handlers(self, msr: int) -> tuple[ReadFn, WriteFn]:
        if msr in _GLOBAL_HANDLERS:
            return _GLOBAL_HANDLERS[msr]
        if msr in (Msr.P5_MC_ADDR, Msr.P5_MC_TYPE):
            return _p5_handlers(msr, self.profile.has_p5_aliases)
        if CTL2_MSR_FIRST <= msr < CTL2_MSR_FIRST + 32:
            stored = self.profile.has_ctl2
            readable = stored and self.guest_vendor is Vendor.INTEL
            return _ctl2_handlers(msr - CTL2_MSR_FIRST, stored, readable)
        bank, kind = divmod(msr - BANK_MSR_FIRST, 4)
        if kind == BankReg.CTL:
            return _ctl_handlers(bank)
        return _data_handlers(bank, ("", "status", "addr", "misc")[kind])


def _read_ext_ctl(v: VCpu) -> int | None:
    return v.mcg_ext_ctl if v.mcg_cap & MCG_LMCE_P else None


def _write_ext_ctl(v: VCpu, value: int) -> bool:
    if v.mcg_cap & MCG_LMCE_P and not value & ~1:
        v.mcg_ext_ctl = value
        return True
    return False


def _write_mcg_status(v: VCpu, value: int) -> bool:
    v.mcg_status = value
    return True


_GLOBAL_HANDLERS: dict[int, tuple[ReadFn, WriteFn]] = {
    Msr.MCG_CAP: (lambda v: v.mcg_cap, _accept),
    Msr.MCG_STATUS: (lambda v: v.mcg_status, _write_mcg_status),
    Msr.MCG_CTL: (lambda v: ALL_ONES if v.mcg_cap & MCG_CTL_P else 0, _accept),
    Msr.MCG_EXT_CTL: (_read_ext_ctl, _write_ext_ctl),
}


def _p5_handlers(msr: int, aliased: bool) -> tuple[ReadFn, WriteFn]:
    if not aliased:
        return _always(0), _accept
    if msr == Msr.P5_MC_ADDR:
        return (lambda v: v.banks[1].addr), _accept
    return (lambda v: v.banks[1].status), _accept


def _ctl2_handlers(bank: int, stored: bool, readable: bool) -> tuple[ReadFn, WriteFn]:
    if not stored or bank >= GUEST_MC_BANK_NUM:
        return _always(0), _accept

    def read(v: VCpu) -> int:
        return v.banks[bank].ctl2 if readable and v.mcg_cap & 0xFF > bank else 0

    def write(v: VCpu, value: int) -> bool:
        if v.mcg_cap & 0xFF > bank:
            v.banks[bank].ctl2 = value
        return True

    return read, write


def _ctl_handlers(bank: int) -> tuple[ReadFn, WriteFn]:
    def read(v: VCpu) -> int:
        return ALL_ONES if v.mcg_cap & 0xFF > bank else 0

    return read, _accept


def _data_handlers(bank: int, attr: str) -> tuple[ReadFn, WriteFn]:
    """STATUS/ADDR/MISC: storage for banks 0 and 1, #GP on non-zero writes in range."""
    if bank >= GUEST_MC_BANK_NUM:

        def write_unstored(v: VCpu, value: int) -> bool:
            return not value or v.mcg_cap & 0xFF <= bank

        return _always(0), write_unstored

    def read(v: VCpu) -> int:
        return getattr(v.banks[bank], attr) if v.mcg_cap & 0xFF > bank else 0

    def write(v: VCpu, value: int) -> bool:
        if v.mcg_cap & 0xFF <= bank:
            return True
        if value:
            return False
        with v.lock:  # a fill stores STATUS, ADDR and MISC together
            setattr(v.banks[bank], attr, 0)
        return True

    return read, write
