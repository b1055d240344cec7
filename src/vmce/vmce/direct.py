"""Direct guest injection: load a record into chosen vCPUs' vMCE, all or nothing.

Xen's :meth:`~vmce.vmce.Domain.fill` always puts the error on vCPU0 (or the LMCE target) and
MCIP|RIPV on the others; that is what the host memory-error path uses. The injection front
ends (QEMU's HMP ``mce``, mce-inject files, a raw record over the control socket) need more:
an arbitrary record on arbitrary vCPUs, each with its own MCG_STATUS, raised as #MC or only
left in the bank for the guest's poll. :func:`load_banks` is that operation.

Rules (the choices the seed leaves open, fixed here):

* Everything is checked before anything is changed: every target exists, is initialised and
  appears once, every value fits 64 bits, the domain has not crashed, and no target is
  *busy* (MCG_STATUS.MCIP still set, or a #MC still pending). If any check fails nothing is
  loaded and :class:`LoadResult` says why (``busy`` names the busy vCPUs). Xen's fill crashes
  the domain in the busy case; a command from a user is refused instead.
* The record lands in guest bank 1 (the seed's "errors land in bank 1") with MSCOD masked, as
  Xen's fill does, whatever host bank the caller's record came from.
* A load that raises #MC sets MCG_STATUS to the given value; a load that does not (a POLL
  record, QEMU's corrected-error path) leaves MCG_STATUS alone: it describes a #MC in
  progress, and there is none. CMCI is never injected in this design, so a polled record is
  seen only when the guest polls its banks.
* :attr:`Merge.REPLACE` overwrites bank 1 (Linux's mce-inject: the injected record *is* the
  bank). :attr:`Merge.QEMU` applies QEMU's ``do_inject_x86_mce`` rules: an uncorrected error
  sets OVER if the bank still holds a valid error; a corrected one overwrites an empty or
  corrected bank (OVER if it was valid) and only ORs OVER into a bank that holds an
  uncorrected error.
* Raising #MC goes through the same pending flag and :attr:`Domain.on_pending` kick as Xen's
  ``inject_vmce``, so the VMM delivers it exactly as it delivers the host path's.

The domain's lock and the target vCPUs' locks (ascending) are held across check and load, so
neither the host path nor a guest WRMSR can interleave with a load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from vmce.mca.constants import (
    MCG_STATUS_MCIP,
    MCI_STATUS_MSCOD_FILTER,
    MCI_STATUS_OVER,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
)
from vmce.vmce.domain import Domain
from vmce.vmce.state import VCpu

#: The guest bank every directly injected error is reported in.
GUEST_ERROR_BANK = 1
_U64 = (1 << 64) - 1


class Merge(Enum):
    """How a load combines with what bank 1 already holds."""

    REPLACE = "replace"
    QEMU = "qemu"


@dataclass(frozen=True)
class BankLoad:
    """What one vCPU gets: bank 1's STATUS/ADDR/MISC, MCG_STATUS (``None``: unchanged) and
    whether #MC is raised."""

    vcpu: int
    status: int
    addr: int = 0
    misc: int = 0
    mcg_status: int | None = None
    raise_mc: bool = True
    merge: Merge = Merge.REPLACE


@dataclass(frozen=True)
class Loaded:
    """One vCPU after a load: what bank 1 and MCG_STATUS now hold."""

    vcpu: int
    status: int
    addr: int
    misc: int
    mcg_status: int
    raise_mc: bool


@dataclass(frozen=True)
class LoadResult:
    """The outcome of :func:`load_banks`: everything loaded, or nothing and why."""

    ok: bool
    loaded: tuple[Loaded, ...] = ()
    pending: tuple[int, ...] = ()
    busy: tuple[int, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        if not self.ok:
            return f"not injected: {self.reason}"
        who = ", ".join(f"vCPU{x.vcpu}" for x in self.loaded)
        mc = ", ".join(f"vCPU{v}" for v in self.pending) or "none (bank only, seen at poll)"
        return f"loaded bank {GUEST_ERROR_BANK} of {who}; #MC pending on {mc}"


def is_busy(v: VCpu) -> bool:
    """A vCPU whose guest has not finished the last machine check, or has one pending."""
    return bool(v.mcg_status & MCG_STATUS_MCIP) or v.mce_pending


def busy_vcpus(domain: Domain, vcpus: Sequence[int] | None = None) -> tuple[int, ...]:
    """The busy vCPUs among ``vcpus`` (default: all), in ascending order."""
    ids = range(domain.nr_vcpus) if vcpus is None else sorted(set(vcpus))
    return tuple(i for i in ids if 0 <= i < domain.nr_vcpus and is_busy(domain.vcpus[i]))


def _validate(domain: Domain, loads: Sequence[BankLoad]) -> str:
    """The reason ``loads`` cannot be applied, or ``''``."""
    if not loads:
        return "no vCPU to load"
    if domain.crashed is not None:
        return f"the domain has crashed ({domain.crashed.reason})"
    seen: set[int] = set()
    for ld in loads:
        if not 0 <= ld.vcpu < domain.nr_vcpus:
            return f"vCPU {ld.vcpu} does not exist (the guest has {domain.nr_vcpus})"
        if ld.vcpu in seen:
            return f"vCPU {ld.vcpu} is named twice"
        seen.add(ld.vcpu)
        if not domain.vcpus[ld.vcpu].initialised:
            return f"vCPU {ld.vcpu} is not initialised"
        values = [ld.status, ld.addr, ld.misc]
        if ld.mcg_status is not None:
            values.append(ld.mcg_status)
        if any(not 0 <= x <= _U64 for x in values):
            return f"vCPU {ld.vcpu}: a value does not fit in 64 bits"
    return ""


def _merged(old_status: int, ld: BankLoad) -> tuple[int, bool]:
    """(new STATUS, whether ADDR/MISC are written) for ``ld`` over a bank holding
    ``old_status``."""
    status = ld.status & MCI_STATUS_MSCOD_FILTER
    if ld.merge is Merge.REPLACE:
        return status, True
    old_valid = bool(old_status & MCI_STATUS_VAL)
    if status & MCI_STATUS_UC or not old_valid or not old_status & MCI_STATUS_UC:
        return (status | MCI_STATUS_OVER) if old_valid else status, True
    return old_status | MCI_STATUS_OVER, False  # a corrected error over an uncorrected one


def load_banks(domain: Domain, loads: Sequence[BankLoad]) -> LoadResult:
    """Load every ``loads`` entry into its vCPU and mark #MC pending where asked; all or
    nothing (see the module docstring). Kicks :attr:`Domain.on_pending` after the load."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(domain._lock)  # serialises with Domain.deliver (the host path)
        why = _validate(domain, loads)
        if why:
            return LoadResult(False, reason=why)
        for ld in sorted(loads, key=lambda x: x.vcpu):
            stack.enter_context(domain.vcpus[ld.vcpu].lock)
        busy = tuple(sorted(ld.vcpu for ld in loads if is_busy(domain.vcpus[ld.vcpu])))
        if busy:
            names = ", ".join(f"vCPU {v}" for v in busy)
            return LoadResult(
                False,
                busy=busy,
                reason=f"{names} has not finished the previous machine check (MCIP set or #MC "
                "pending)",
            )
        loaded: list[Loaded] = []
        for ld in loads:
            v = domain.vcpus[ld.vcpu]
            bank = v.banks[GUEST_ERROR_BANK]
            status, write_addr = _merged(bank.status, ld)
            bank.status = status
            if write_addr:
                bank.addr = ld.addr
                bank.misc = ld.misc
            if ld.mcg_status is not None:
                v.mcg_status = ld.mcg_status
            if ld.raise_mc:
                v.mce_pending = True
            loaded.append(
                Loaded(v.id, bank.status, bank.addr, bank.misc, v.mcg_status, ld.raise_mc)
            )
        pending = tuple(ld.vcpu for ld in loads if ld.raise_mc)
    for vid in pending:
        for kick in domain.on_pending:
            kick(vid)
    return LoadResult(True, tuple(loaded), pending)
