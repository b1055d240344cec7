"""Per-vCPU vMCE state (Xen's ``struct vmce`` plus the vCPU's ``mce_pending`` flag)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vmce.vmce.profile import GUEST_MC_BANK_NUM


class Bank:
    """One guest bank with storage: STATUS, ADDR, MISC and (Intel) CTL2."""

    __slots__ = ("addr", "ctl2", "misc", "status")

    def __init__(self) -> None:
        self.status = 0
        self.addr = 0
        self.misc = 0
        self.ctl2 = 0

    def snapshot(self) -> BankSnapshot:
        return BankSnapshot(self.status, self.addr, self.misc, self.ctl2)


@dataclass(frozen=True)
class BankSnapshot:
    """An immutable copy of a bank, for reports and tests."""

    status: int
    addr: int
    misc: int
    ctl2: int


class VCpu:
    """A vCPU as the vMCE sees it.

    ``initialised`` mirrors Xen's ``is_initialised`` (the vCPU was brought up); ``mce_pending``
    means "a virtual #MC must be delivered" and is consumed by whoever delivers it.
    """

    __slots__ = (
        "banks",
        "id",
        "initialised",
        "lock",
        "mce_pending",
        "mcg_cap",
        "mcg_ext_ctl",
        "mcg_status",
    )

    def __init__(self, vcpu_id: int, mcg_cap: int, *, initialised: bool = True) -> None:
        self.id = vcpu_id
        self.mcg_cap = mcg_cap
        self.mcg_status = 0
        self.mcg_ext_ctl = 0
        self.banks = tuple(Bank() for _ in range(GUEST_MC_BANK_NUM))
        self.initialised = initialised
        self.mce_pending = False
        # Serialises guest writes against the host's fill; single reads need no lock.
        self.lock = threading.Lock()

    @property
    def bank_count(self) -> int:
        return self.mcg_cap & 0xFF

    def take_pending(self) -> bool:
        """Acknowledge a pending #MC: clear the flag and say whether it was set."""
        with self.lock:
            was = self.mce_pending
            self.mce_pending = False
            return was

    def snapshot(self) -> VCpuSnapshot:
        return VCpuSnapshot(
            vcpu_id=self.id,
            mcg_cap=self.mcg_cap,
            mcg_status=self.mcg_status,
            mcg_ext_ctl=self.mcg_ext_ctl,
            banks=tuple(b.snapshot() for b in self.banks),
            initialised=self.initialised,
            mce_pending=self.mce_pending,
        )


@dataclass(frozen=True)
class VCpuSnapshot:
    """An immutable copy of one vCPU's vMCE state."""

    vcpu_id: int
    mcg_cap: int
    mcg_status: int
    mcg_ext_ctl: int
    banks: tuple[BankSnapshot, ...]
    initialised: bool
    mce_pending: bool
