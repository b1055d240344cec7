"""Host profiles: which vendor's vMCE behaviour a domain gets, and the capabilities it implies.

Almost all vMCE behaviour keys on the *host* vendor (reference, conventions); only the CTL2 read
also looks at the guest's CPUID vendor.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from vmce.mca.constants import (
    MCG_CAP_COUNT,
    MCG_CMCI_P,
    MCG_CTL_P,
    MCG_LMCE_P,
    MCG_SER_P,
    MCG_TES_P,
)

#: GUEST_MC_BANK_NUM: banks 0 and 1 are backed by state.
GUEST_MC_BANK_NUM = 2


class Vendor(Enum):
    """CPU vendors the reference distinguishes."""

    INTEL = "intel"
    AMD = "amd"
    HYGON = "hygon"
    CENTAUR = "centaur"
    SHANGHAI = "shanghai"
    UNKNOWN = "unknown"

    @property
    def cpuid_string(self) -> str:
        return _CPUID_VENDOR[self]

    def cpuid_registers(self) -> tuple[int, int, int]:
        """The vendor string as CPUID leaf 0 returns it: (EBX, EDX, ECX)."""
        raw = self.cpuid_string.encode("ascii").ljust(12)[:12]
        return (
            int.from_bytes(raw[0:4], "little"),
            int.from_bytes(raw[4:8], "little"),
            int.from_bytes(raw[8:12], "little"),
        )

    @classmethod
    def parse(cls, text: str) -> Vendor:
        """A vendor from its name (``intel``) or CPUID string (``GenuineIntel``)."""
        key = text.strip().lower()
        for v in cls:
            if key in (v.value, v.cpuid_string.strip().lower()):
                return v
        names = ", ".join(v.value for v in cls)
        raise ValueError(f"unknown vendor {text!r} (expected one of: {names})")


_CPUID_VENDOR = {
    Vendor.INTEL: "GenuineIntel",
    Vendor.AMD: "AuthenticAMD",
    Vendor.HYGON: "HygonGenuine",
    Vendor.CENTAUR: "CentaurHauls",
    Vendor.SHANGHAI: "  Shanghai  ",
    Vendor.UNKNOWN: "Unknown",
}

#: Guest MCG_CAP a new vCPU gets on an Intel host: SER_P | TES_P | CMCI_P | 2.
INTEL_GUEST_MCG_CAP = MCG_SER_P | MCG_TES_P | MCG_CMCI_P | GUEST_MC_BANK_NUM
#: ... and on every other host: just the bank count.
OTHER_GUEST_MCG_CAP = GUEST_MC_BANK_NUM


@dataclass(frozen=True)
class HostProfile:
    """The host a domain runs on, as far as the vMCE cares.

    ``ser``: the host has MCG_CAP.SER_P (needed to grade SRAO/SRAR); ``lmce``: the host's
    ``lmce_support`` (LMCE_P, not forced to broadcast, BIOS enabled it).
    """

    vendor: Vendor = Vendor.INTEL
    ser: bool = True
    lmce: bool = False

    @classmethod
    def intel(cls, *, lmce: bool = False) -> HostProfile:
        return cls(Vendor.INTEL, ser=True, lmce=lmce)

    @classmethod
    def amd(cls) -> HostProfile:
        return cls(Vendor.AMD, ser=False, lmce=False)

    @property
    def is_intel(self) -> bool:
        return self.vendor is Vendor.INTEL

    @property
    def is_amd_like(self) -> bool:
        return self.vendor in (Vendor.AMD, Vendor.HYGON)

    @property
    def default_mcg_cap(self) -> int:
        """``vmce_init_vcpu``: the MCG_CAP every new vCPU starts with."""
        return INTEL_GUEST_MCG_CAP if self.is_intel else OTHER_GUEST_MCG_CAP

    @property
    def restorable_caps(self) -> int:
        """Caps a saved vCPU may carry beyond COUNT and CTL_P (``vmce_restore_vcpu``)."""
        return (INTEL_GUEST_MCG_CAP | MCG_LMCE_P) if self.is_intel else OTHER_GUEST_MCG_CAP

    @property
    def supported_caps_text(self) -> int:
        """The 'supported' value Xen prints when it refuses a restore (allowed & ~COUNT)."""
        return self.restorable_caps & ~MCG_CAP_COUNT

    def caps_restorable(self, caps: int) -> bool:
        """Whether ``caps`` passes Xen's restore check on this host."""
        return caps & ~self.restorable_caps & ~MCG_CAP_COUNT & ~MCG_CTL_P == 0

    @property
    def has_p5_aliases(self) -> bool:
        """P5_MC_ADDR/P5_MC_TYPE alias bank 1 on Intel-family hosts (Xen >= 4.17)."""
        return self.vendor in (Vendor.INTEL, Vendor.CENTAUR, Vendor.SHANGHAI)

    @property
    def has_ctl2(self) -> bool:
        """MCi_CTL2 (CMCI control) is emulated on Intel hosts only."""
        return self.is_intel

    @property
    def forwards_memory_errors(self) -> bool:
        """Only Intel hosts register the delayed handler that turns host errors into vMCEs."""
        return self.is_intel
