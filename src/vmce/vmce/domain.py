"""A domain's vCPUs and Xen's vMCE fill and inject (reference section 4).

``fill`` loads the virtual MSRs (``fill_vmsr_data``), ``inject`` marks the #MC pending on the
target vCPUs (``inject_vmce``), and ``deliver`` does both and applies what the domain suffers
when either fails (``domain_crash``). Delivery of the pending #MC into a CPU is the VMM's job:
it is told through :attr:`Domain.on_pending` and acknowledges with :meth:`VCpu.take_pending`.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from vmce.mca.constants import (
    MCG_EXT_CTL_LMCE_EN,
    MCG_LMCE_P,
    MCG_STATUS_LMCE,
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_MSCOD_FILTER,
)
from vmce.vmce.msrs import MsrTable
from vmce.vmce.profile import HostProfile, Vendor
from vmce.vmce.state import VCpu, VCpuSnapshot

#: VMCE_INJECT_BROADCAST: target every vCPU.
BROADCAST = -1
#: DOMID_INVALID: a bank record that belongs to no domain.
DOMID_INVALID = 0x7FF4
#: Xen's SHUTDOWN_crash code, the reason a crashed domain reports.
SHUTDOWN_CRASH = 3
#: HVM_PARAM_MCA_CAP bit: expose LMCE.
XEN_HVM_MCA_CAP_LMCE = 1 << 0
XEN_HVM_MCA_CAP_MASK = XEN_HVM_MCA_CAP_LMCE


class InjectionPolicy(Enum):
    """Who receives a vMCE.

    ``BROADCAST`` is the seed's design (patch 4, Intel semantics: every vCPU takes the #MC);
    ``VCPU0`` reproduces the pre-seed Xen (<= 4.2), where only vCPU0 was ever injected.
    """

    BROADCAST = "broadcast"
    VCPU0 = "vcpu0"


@dataclass(frozen=True)
class BankRecord:
    """An error as ``fill_vmsr_data`` receives it: the host bank with a guest address."""

    status: int
    addr: int = 0
    misc: int = 0
    domid: int = 0


@dataclass(frozen=True)
class FillResult:
    """What ``fill_vmsr_data`` did: 0, ``-EBUSY`` (a vCPU still had MCIP) or ``-EINVAL``."""

    rc: int
    primary: int | None = None
    filled: tuple[int, ...] = ()
    busy: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass(frozen=True)
class InjectResult:
    """What ``inject_vmce`` did: 0, ``-ESRCH`` (nobody to inject) or ``-EBUSY``."""

    rc: int
    pending: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    busy_at: int | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass(frozen=True)
class Crash:
    """A domain crash: why, and the shutdown code it reports."""

    reason: str
    code: int = SHUTDOWN_CRASH


@dataclass(frozen=True)
class Delivery:
    """One vMCE end to end: target, fill, inject, and the crash if delivery failed."""

    target: int
    policy: InjectionPolicy
    fill: FillResult
    inject: InjectResult | None
    crash: Crash | None

    @property
    def ok(self) -> bool:
        return self.crash is None

    def describe(self) -> str:
        who = "broadcast" if self.target == BROADCAST else f"vCPU{self.target}"
        if self.crash is not None:
            return f"{who}: domain crashed: {self.crash.reason}"
        assert self.inject is not None
        pend = ", ".join(f"vCPU{v}" for v in self.inject.pending)
        return f"{who}: #MC pending on {pend}"


class RestoreError(ValueError):
    """A saved vMCE state the domain refuses; nothing of the restore has been applied."""


@dataclass(frozen=True)
class VmceSave:
    """The vMCE state Xen migrates per vCPU (VMCE_VCPU): caps, both CTL2, MCG_EXT_CTL."""

    caps: int
    mci_ctl2_bank0: int = 0
    mci_ctl2_bank1: int = 0
    mcg_ext_ctl: int = 0


def _errno(name: str) -> int:
    return -int(getattr(errno, name))


EBUSY = _errno("EBUSY")
EINVAL = _errno("EINVAL")
ESRCH = _errno("ESRCH")
EEXIST = _errno("EEXIST")


@dataclass
class Domain:
    """A guest as the vMCE sees it: a host profile, vCPUs and the MSR routing table."""

    profile: HostProfile
    nr_vcpus: int
    domid: int = 1
    guest_vendor: Vendor | None = None
    policy: InjectionPolicy = InjectionPolicy.BROADCAST
    vcpus: list[VCpu] = field(init=False)
    mca_cap_param: int = field(init=False, default=0)
    crashed: Crash | None = field(init=False, default=None)
    #: Called with a vCPU id each time a #MC becomes pending on it (the "kick").
    on_pending: list[Callable[[int], None]] = field(init=False, default_factory=list)
    #: Called once when the domain crashes.
    on_crash: list[Callable[[Crash], None]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nr_vcpus <= 4096:
            raise ValueError(f"a domain needs 1..4096 vCPUs, not {self.nr_vcpus}")
        if self.guest_vendor is None:
            self.guest_vendor = self.profile.vendor
        cap = self.profile.default_mcg_cap
        self.vcpus = [VCpu(i, cap) for i in range(self.nr_vcpus)]
        self.msr_table = MsrTable(self.profile, self.guest_vendor)
        self._readers = self.msr_table.readers
        self._writers = self.msr_table.writers
        self._lock = threading.Lock()

    # -- guest MSR accesses ------------------------------------------------------------------

    def rdmsr(self, vcpu_id: int, msr: int) -> int | None:
        """The guest's RDMSR of a routed MSR: the value, or ``None`` for #GP."""
        return self._readers[msr](self.vcpus[vcpu_id])

    def wrmsr(self, vcpu_id: int, msr: int, value: int) -> bool:
        """The guest's WRMSR of a routed MSR; ``False`` means #GP."""
        return self._writers[msr](self.vcpus[vcpu_id], value)

    # -- toolstack ---------------------------------------------------------------------------

    def set_mca_cap(self, value: int) -> int:
        """HVM_PARAM_MCA_CAP: 0 or ``-errno`` as Xen's handler and the param rules say."""
        if value & ~XEN_HVM_MCA_CAP_MASK:
            return EINVAL
        if self.mca_cap_param and value != self.mca_cap_param:
            return EEXIST
        if value & XEN_HVM_MCA_CAP_LMCE:
            if not self.profile.lmce:
                return EINVAL
            for v in self.vcpus:
                v.mcg_cap |= MCG_LMCE_P
        self.mca_cap_param = value
        return 0

    def snapshot(self) -> list[VCpuSnapshot]:
        return [v.snapshot() for v in self.vcpus]

    # -- fill and inject ---------------------------------------------------------------------

    def _fill_one(self, v: VCpu, mcg_status: int, status: int, addr: int, misc: int) -> bool:
        """``vcpu_fill_mc_msrs``: False (busy) if the guest has not finished the last one."""
        with v.lock:
            if v.mcg_status & MCG_STATUS_MCIP:
                return False
            v.mcg_status = mcg_status
            b = v.banks[1]
            b.status = status & MCI_STATUS_MSCOD_FILTER
            b.addr = addr
            b.misc = misc
            return True

    def fill(self, record: BankRecord, gstatus: int, target: int = BROADCAST) -> FillResult:
        """``fill_vmsr_data``: the real error on the primary vCPU, MCIP|RIPV on the others."""
        if record.domid == DOMID_INVALID:
            return FillResult(EINVAL)
        primary = 0
        if target == BROADCAST:
            gstatus &= ~MCG_STATUS_LMCE
        elif gstatus & MCG_STATUS_LMCE:
            primary = target
        if not 0 <= primary < self.nr_vcpus:
            return FillResult(EINVAL)
        filled: list[int] = []
        busy: list[int] = []
        pv = self.vcpus[primary]
        (
            filled if self._fill_one(pv, gstatus, record.status, record.addr, record.misc) else busy
        ).append(primary)
        if target == BROADCAST:
            for v in self.vcpus:
                if v.id == 0:
                    continue
                ok = self._fill_one(v, MCG_STATUS_MCIP | MCG_STATUS_RIPV, 0, 0, 0)
                (filled if ok else busy).append(v.id)
        return FillResult(EBUSY if busy else 0, primary, tuple(filled), tuple(busy))

    def inject(self, target: int = BROADCAST) -> InjectResult:
        """``inject_vmce``: mark the #MC pending; stop at the first vCPU already pending."""
        rc = ESRCH
        pending: list[int] = []
        skipped: list[int] = []
        for v in self.vcpus:
            if target != BROADCAST and v.id != target:
                continue
            if not v.initialised:
                skipped.append(v.id)
                if target != BROADCAST:
                    break
                continue
            with v.lock:
                was = v.mce_pending
                v.mce_pending = True
            if was:
                return InjectResult(EBUSY, tuple(pending), tuple(skipped), v.id)
            pending.append(v.id)
            rc = 0
            for kick in self.on_pending:
                kick(v.id)
            if target != BROADCAST:
                break
        return InjectResult(rc, tuple(pending), tuple(skipped))

    def deliver(self, record: BankRecord, gstatus: int, target: int = BROADCAST) -> Delivery:
        """Fill then inject as the host memory-error path does; crash the domain on failure.

        Under the ``VCPU0`` policy only vCPU0 is filled and injected, as before the seed.
        """
        with self._lock:
            if self.policy is InjectionPolicy.VCPU0:
                target = 0
                gstatus &= ~MCG_STATUS_LMCE
                v0 = self.vcpus[0]
                ok = self._fill_one(v0, gstatus, record.status, record.addr, record.misc)
                fill = FillResult(0 if ok else EBUSY, 0, (0,) if ok else (), () if ok else (0,))
            else:
                fill = self.fill(record, gstatus, target)
            if not fill.ok:
                why = (
                    f"vCPU{fill.busy[0]} has not handled the previous vMCE (MCIP set)"
                    if fill.busy
                    else f"fill_vmsr_data failed ({_errname(fill.rc)})"
                )
                return Delivery(target, self.policy, fill, None, self.crash(why))
            inj = self.inject(target)
            if not inj.ok:
                why = (
                    f"vCPU{inj.busy_at} already has a #MC pending"
                    if inj.busy_at is not None
                    else "no initialised vCPU to take the #MC"
                )
                return Delivery(target, self.policy, fill, inj, self.crash(why))
            return Delivery(target, self.policy, fill, inj, None)

    def lmce_target_ok(self, vcpu_id: int) -> bool:
        """Whether vCPU ``vcpu_id`` enabled LMCE delivery (MCG_EXT_CTL.LMCE_EN)."""
        return bool(self.vcpus[vcpu_id].mcg_ext_ctl & MCG_EXT_CTL_LMCE_EN)

    def crash(self, reason: str) -> Crash:
        """``domain_crash``: record it once and tell the listeners."""
        if self.crashed is None:
            self.crashed = Crash(reason)
            for cb in self.on_crash:
                cb(self.crashed)
        return self.crashed

    # -- save / restore ----------------------------------------------------------------------

    def save_vcpu(self, vcpu_id: int) -> VmceSave:
        """What Xen saves for one vCPU (VMCE_VCPU)."""
        v = self.vcpus[vcpu_id]
        return VmceSave(v.mcg_cap, v.banks[0].ctl2, v.banks[1].ctl2, v.mcg_ext_ctl)

    def check_restore(self, vcpu_id: int, saved: VmceSave, kind: str = "HVM") -> None:
        """``vmce_restore_vcpu``'s checks, raising :class:`RestoreError` with Xen's message."""
        if not 0 <= vcpu_id < self.nr_vcpus:
            raise RestoreError(f"{kind} restore: dom{self.domid} has no vcpu{vcpu_id}")
        if not self.profile.caps_restorable(saved.caps):
            raise RestoreError(
                f"{kind} restore: unsupported MCA capabilities {_xen_hex(saved.caps)} for "
                f"d{self.domid}v{vcpu_id} (supported: {_xen_hex(self.profile.supported_caps_text)})"
            )

    def restore(self, saved: dict[int, VmceSave], kind: str = "HVM") -> None:
        """Apply saved vMCE state to several vCPUs: all checked first, then all applied.

        A refused record raises :class:`RestoreError` and leaves every vCPU untouched. Runtime
        state (MCG_STATUS, bank data, the pending flag) is not part of the save, as in Xen.
        """
        for vid, s in saved.items():
            self.check_restore(vid, s, kind)
        for vid, s in saved.items():
            v = self.vcpus[vid]
            with v.lock:
                v.mcg_cap = s.caps
                v.banks[0].ctl2 = s.mci_ctl2_bank0
                v.banks[1].ctl2 = s.mci_ctl2_bank1
                v.mcg_ext_ctl = s.mcg_ext_ctl


def _xen_hex(value: int) -> str:
    """Xen's ``%#x``: ``0x``-prefixed, except zero, which prints ``0`` (xen/common/vsprintf.c)."""
    return f"{value:#x}" if value else "0"


def _errname(rc: int) -> str:
    return errno.errorcode.get(-rc, str(rc))
