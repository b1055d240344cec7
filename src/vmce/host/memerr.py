"""The host's machine-check handling, from a physical #MC record to guest vMCEs.

This is Xen's Intel flow (reference section 5): every valid bank is graded; fatal errors make
the host panic; deferred SRAO/SRAR memory errors go to the memory-error handler, which offlines
the frame, marks the guest page broken, rewrites the address to the guest-physical one and
fills and injects a vMCE into the owning domain, broadcast or LMCE as section 5.5 decides.
Every decision is returned as data saying what happened and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

from vmce.host.memory import (
    DOMID_COW,
    DOMID_IDLE,
    DOMID_INVALID,
    DOMID_XEN,
    PAGE_SHIFT,
    HostMemory,
    PageOffline,
    offline_owner,
)
from vmce.mca.classify import (
    ErrorClass,
    Mcacod,
    address_is_physical,
    classify,
    is_recoverable,
    mcacod_kind,
)
from vmce.mca.constants import (
    MCG_STATUS_EIPV,
    MCG_STATUS_LMCE,
    MCG_STATUS_RIPV,
    MCI_STATUS_ADDRV,
    MCI_STATUS_MISCV,
    MCI_STATUS_PCC,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
)
from vmce.vmce import BROADCAST, BankRecord, Delivery, HostProfile, InjectionPolicy

#: XEN_MC_VCPUID_INVALID: the CPU was not running a guest vCPU.
VCPUID_INVALID = 0xFFFF


class Result(IntEnum):
    """The handler results, ordered by how bad they are; ``RESET`` means the host panics."""

    NOERROR = 0
    RECOVERED = 1
    CONTINUE = 2
    RESET = 3


@dataclass(frozen=True)
class HostBank:
    """One host bank as the #MC handler reads it."""

    bank: int
    status: int
    addr: int = 0
    misc: int = 0


@dataclass(frozen=True)
class PhysicalMce:
    """A machine check on one host CPU: MCG_STATUS, the banks, and who was running there."""

    cpu: int
    mcg_status: int
    banks: tuple[HostBank, ...]
    running_domid: int = DOMID_IDLE
    running_vcpu: int = VCPUID_INVALID


@dataclass(frozen=True)
class BankOutcome:
    """What the host did with one bank, in words and data."""

    bank: int
    status: int
    error_class: ErrorClass
    result: Result
    action: str
    reason: str
    domid: int | None = None
    gfn: int | None = None
    guest_addr: int | None = None
    offline: str | None = None
    delivery: Delivery | None = None
    crashed: tuple[int, ...] = ()


@dataclass(frozen=True)
class HostMceReport:
    """The whole #MC: the per-bank outcomes and the host's fate."""

    result: Result
    banks: tuple[BankOutcome, ...]
    panic_reason: str | None = None
    crashed: tuple[int, ...] = field(default=())

    @property
    def host_panics(self) -> bool:
        return self.result is Result.RESET

    def describe(self) -> str:
        lines = [f"host result: {self.result.name.lower()}"]
        if self.panic_reason:
            lines.append(f"host panic: {self.panic_reason}")
        for b in self.banks:
            lines.append(f"bank {b.bank} {b.error_class.value}: {b.action} ({b.reason})")
        return "\n".join(lines)


class HostMca:
    """The host's MCA handling for one machine: its profile and its memory."""

    def __init__(self, profile: HostProfile, memory: HostMemory) -> None:
        self.profile = profile
        self.memory = memory

    def handle(self, mce: PhysicalMce) -> HostMceReport:
        """Run the #MC handler and the deferred (softirq) handlers for ``mce``."""
        banks = tuple(b for b in mce.banks if b.status & MCI_STATUS_VAL)
        ser = self.profile.ser
        in_guest = mce.running_domid not in (DOMID_IDLE, DOMID_XEN, DOMID_INVALID)
        if not mce.mcg_status & MCG_STATUS_RIPV and (
            not mce.mcg_status & MCG_STATUS_EIPV or not in_guest
        ):
            return self._panic(banks, "no restart IP (RIPV clear) and no usable error IP", ser)
        for b in banks:
            if b.status & MCI_STATUS_PCC:
                return self._panic(banks, f"bank {b.bank}: processor context corrupt", ser)
            # Only Intel's recoverability scan decides the host's fate; AMD's only logs.
            if (
                b.status & MCI_STATUS_UC
                and self.profile.is_intel
                and not is_recoverable(b.status, ser=ser)
            ):
                return self._panic(banks, f"bank {b.bank} is not recoverable", ser)
        outcomes = [self._delayed(mce, self._telemetry(b)) for b in banks]
        result = max((o.result for o in outcomes), default=Result.NOERROR)
        crashed = tuple(sorted({d for o in outcomes for d in o.crashed}))
        panic = None
        if result is Result.RESET:
            panic = next(o.reason for o in outcomes if o.result is Result.RESET)
        return HostMceReport(result, tuple(outcomes), panic, crashed)

    def _panic(self, banks: tuple[HostBank, ...], why: str, ser: bool) -> HostMceReport:
        outs = tuple(
            BankOutcome(
                b.bank, b.status, classify(b.status, ser=ser), Result.RESET, "host panic", why
            )
            for b in banks
        )
        return HostMceReport(Result.RESET, outs, why)

    @staticmethod
    def _telemetry(b: HostBank) -> HostBank:
        """The logged record: MISC only if MISCV, ADDR only if ADDRV."""
        return HostBank(
            b.bank,
            b.status,
            b.addr if b.status & MCI_STATUS_ADDRV else 0,
            b.misc if b.status & MCI_STATUS_MISCV else 0,
        )

    def _delayed(self, mce: PhysicalMce, b: HostBank) -> BankOutcome:
        """The delayed handler table (reference 5.3); no table at all on non-Intel hosts."""
        cls = classify(b.status, ser=self.profile.ser)
        if not self.profile.forwards_memory_errors:
            return BankOutcome(
                b.bank,
                b.status,
                cls,
                Result.NOERROR,
                "logged",
                "this host vendor registers no delayed handlers",
            )
        if cls is ErrorClass.CORRECTED:
            return BankOutcome(
                b.bank,
                b.status,
                cls,
                Result.NOERROR,
                "logged for dom0",
                "corrected errors are only logged",
            )
        if cls is ErrorClass.UCNA:
            return BankOutcome(
                b.bank,
                b.status,
                cls,
                Result.CONTINUE,
                "logged for dom0",
                "UCNA: no action required",
            )
        kind = mcacod_kind(b.status)
        if cls is ErrorClass.SRAO:
            if kind in (Mcacod.MEMORY_SCRUB, Mcacod.L3_WRITEBACK):
                return self._memory_error(mce, b, cls, Result.CONTINUE)
            return BankOutcome(
                b.bank,
                b.status,
                cls,
                Result.CONTINUE,
                "logged",
                "SRAO with an MCACOD that is not a memory error",
            )
        if cls is ErrorClass.SRAR:
            if kind in (Mcacod.DATA_LOAD, Mcacod.INSTRUCTION_FETCH):
                return self._memory_error(mce, b, cls, Result.RESET)
            return BankOutcome(
                b.bank,
                b.status,
                cls,
                Result.RESET,
                "host panic",
                "SRAR with an MCACOD the host cannot act on",
            )
        return BankOutcome(b.bank, b.status, cls, Result.RESET, "host panic", "fatal error")

    def _memory_error(
        self, mce: PhysicalMce, b: HostBank, cls: ErrorClass, result: Result
    ) -> BankOutcome:
        """``mc_memerr_dhandler`` (reference 5.4)."""
        out = BankOutcome(b.bank, b.status, cls, result, "none", "")
        if not address_is_physical(b.status, b.misc):
            return replace(
                out, action="ignored", reason="the error address is not a physical address"
            )
        mfn = b.addr >> PAGE_SHIFT
        off = self.memory.offline_page(mfn, broken=True)
        if off.rc:
            return replace(out, reason=f"offline_page failed: {off.describe()}")
        out = replace(out, offline=off.describe())
        status = off.status
        if status & PageOffline.OFFLINED:
            return replace(
                out,
                result=Result.RECOVERED,
                action="page offlined",
                reason=f"mfn {mfn:#x} was free; retired",
            )
        if status & PageOffline.AGAIN:
            page = self.memory.pages[mfn]
            crashed = (page.owner,) if page.owner is not None else ()
            return replace(
                out,
                result=Result.CONTINUE,
                action="owner crashed",
                reason="page already broken and still owned",
                crashed=crashed,
            )
        if not status & PageOffline.PENDING or not status & PageOffline.OWNED:
            return replace(out, reason=f"page not owned by a guest ({off.describe()})")
        domid = offline_owner(status)
        if domid == DOMID_COW:
            return replace(
                out,
                result=Result.RESET,
                action="host panic",
                reason="memory error on a shared (COW) page: hypervisor BUG",
            )
        if domid == DOMID_XEN:
            return replace(out, reason="page belongs to Xen")
        return self._guest_memory_error(mce, b, replace(out, domid=domid), mfn)

    def _guest_memory_error(
        self, mce: PhysicalMce, b: HostBank, out: BankOutcome, mfn: int
    ) -> BankOutcome:
        """Steps 5.1-5.7 of reference 5.4, for a page a real domain owns."""
        assert out.domid is not None
        domid = out.domid
        dom = self.memory.domains[domid].domain
        gfn = self.memory.m2p[mfn]
        out = replace(out, gfn=gfn)
        rc = self.memory.unmmap_broken_page(domid, mfn, gfn)
        if rc:
            dom.crash(f"cannot mark gfn {gfn:#x} broken ({rc})")
            return replace(
                out,
                action="domain crashed",
                crashed=(domid,),
                reason=f"unmmap_broken_page failed ({rc})",
            )
        target = self.vmce_target(mce, domid)
        gaddr = (gfn << PAGE_SHIFT) | (b.addr & 0xFFF)
        delivery = dom.deliver(BankRecord(b.status, gaddr, b.misc, domid), mce.mcg_status, target)
        out = replace(out, guest_addr=gaddr, delivery=delivery)
        if delivery.crash is not None:
            return replace(
                out, action="domain crashed", crashed=(domid,), reason=delivery.crash.reason
            )
        if delivery.policy is InjectionPolicy.VCPU0:
            who = "vCPU0 only, pre-seed policy"
        else:
            who = "broadcast" if target == BROADCAST else f"LMCE to vCPU{target}"
        return replace(
            out,
            result=Result.RECOVERED,
            action=f"vMCE injected ({who})",
            reason=f"page of d{domid} at gfn {gfn:#x} marked broken",
        )

    def vmce_target(self, mce: PhysicalMce, domid: int) -> int:
        """Broadcast or a single vCPU, as reference 5.5 decides."""
        vid = mce.running_vcpu
        if vid == VCPUID_INVALID or mce.running_domid != domid:
            return BROADCAST
        dom = self.memory.domains[domid].domain
        if not 0 <= vid < dom.nr_vcpus:
            return BROADCAST
        if self.profile.is_intel and (
            not mce.mcg_status & MCG_STATUS_LMCE or not dom.lmce_target_ok(vid)
        ):
            return BROADCAST
        return vid
