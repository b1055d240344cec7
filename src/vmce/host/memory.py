"""The host's view of memory: machine frames, their owners, and each domain's P2M.

Just enough of Xen's memory management for the memory-error path (reference 5.4-5.6):
``offline_page`` with its status bits, the machine-to-physical table, and the P2M entry types,
with ``p2m_ram_broken`` for pages a memory error took.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum, IntFlag

from vmce.vmce import Domain

DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_IO = 0x7FF1
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class P2mType(IntEnum):
    """Xen's p2m entry types, by number."""

    RAM_RW = 0
    INVALID = 1
    RAM_LOGDIRTY = 2
    RAM_RO = 3
    MMIO_DM = 4
    MMIO_DIRECT = 5
    POPULATE_ON_DEMAND = 6
    GRANT_MAP_RW = 7
    GRANT_MAP_RO = 8
    PAGING_OUT = 9
    PAGED = 10
    PAGING_IN = 11
    RAM_SHARED = 12
    RAM_BROKEN = 13
    MAP_FOREIGN = 14
    IOREQ_SERVER = 15


#: Types ``unmmap_broken_page`` converts to RAM_BROKEN; any other type crashes the domain.
BREAKABLE_TYPES = frozenset(
    {P2mType.RAM_RW, P2mType.RAM_LOGDIRTY, P2mType.RAM_RO, P2mType.MMIO_DIRECT}
)


class PageOffline(IntFlag):
    """``offline_page`` status bits; the owner domid sits in bits 31:16."""

    INVALID = 0x1
    OFFLINED = 0x2
    PENDING = 0x4
    FAILED = 0x8
    AGAIN = 0x10
    XENPAGE = 0x100
    DOM0PAGE = 0x200
    ANONYMOUS = 0x400
    NOT_CONV_RAM = 0x800
    OWNED = 0x1000
    BROKEN = 0x2000


OWNER_SHIFT = 16


def offline_owner(status: int) -> int:
    return (status >> OWNER_SHIFT) & 0xFFFF


class DomainKind(Enum):
    """How a domain's memory is virtualised; only HAP guests survive a broken page."""

    HVM_HAP = "hvm-hap"
    HVM_SHADOW = "hvm-shadow"
    PV = "pv"


class PageUse(Enum):
    """What a machine frame is used for."""

    FREE = "free"
    DOMAIN = "domain"
    XEN_HEAP = "xen-heap"
    XEN_IMAGE = "xen-image"
    NOT_RAM = "not-ram"


@dataclass
class HostPage:
    """One machine frame."""

    use: PageUse = PageUse.FREE
    owner: int | None = None
    broken: bool = False
    offlined: bool = False


@dataclass
class P2mEntry:
    mfn: int
    type: P2mType = P2mType.RAM_RW


@dataclass
class GuestDomain:
    """A domain registered with the host: the vMCE model plus its memory map."""

    domain: Domain
    kind: DomainKind = DomainKind.HVM_HAP
    hardware: bool = False
    p2m: dict[int, P2mEntry] = field(default_factory=dict)

    @property
    def domid(self) -> int:
        return self.domain.domid


@dataclass(frozen=True)
class OfflineResult:
    rc: int
    status: int

    def flags(self) -> PageOffline:
        return PageOffline(self.status & 0xFFFF)

    def describe(self) -> str:
        names = "|".join(f.name or "?" for f in PageOffline if f & self.status)
        owner = offline_owner(self.status)
        return f"{names or '0'} owner={owner:#x}" if self.status >> OWNER_SHIFT else names


class HostMemory:
    """Machine frames, the M2P table and the domains that own frames."""

    def __init__(self) -> None:
        self.pages: dict[int, HostPage] = {}
        self.m2p: dict[int, int] = {}
        self.domains: dict[int, GuestDomain] = {}
        #: Called as (domid, gfn) when a guest page becomes RAM_BROKEN.
        self.on_broken: list[Callable[[int, int], None]] = []

    def add_ram(self, first_mfn: int, count: int, use: PageUse = PageUse.FREE) -> None:
        for mfn in range(first_mfn, first_mfn + count):
            self.pages[mfn] = HostPage(use)

    def add_domain(self, gd: GuestDomain) -> GuestDomain:
        if gd.domid in self.domains:
            raise ValueError(f"domain {gd.domid} is already registered")
        self.domains[gd.domid] = gd
        return gd

    def assign(self, domid: int, first_gfn: int, first_mfn: int, count: int) -> None:
        """Give ``count`` free frames from ``first_mfn`` to ``domid`` at ``first_gfn``."""
        gd = self.domains[domid]
        for i in range(count):
            mfn, gfn = first_mfn + i, first_gfn + i
            page = self.pages.get(mfn)
            if page is None or page.use is not PageUse.FREE:
                raise ValueError(f"mfn {mfn:#x} is not free RAM")
            page.use, page.owner = PageUse.DOMAIN, domid
            self.m2p[mfn] = gfn
            gd.p2m[gfn] = P2mEntry(mfn)

    def gfn_to_mfn(self, domid: int, gfn: int) -> int:
        entry = self.domains[domid].p2m.get(gfn)
        if entry is None:
            raise KeyError(f"d{domid} has no page at gfn {gfn:#x}")
        return entry.mfn

    def offline_page(self, mfn: int, broken: bool = True) -> OfflineResult:
        """Xen's ``offline_page``: retire a frame, or mark it pending while it is in use."""
        page = self.pages.get(mfn)
        if page is None:
            return OfflineResult(-errno.EINVAL, PageOffline.INVALID)
        if page.use is PageUse.NOT_RAM:
            return OfflineResult(-errno.EINVAL, PageOffline.FAILED | PageOffline.NOT_CONV_RAM)
        if page.use is PageUse.XEN_IMAGE:
            status = PageOffline.XENPAGE | PageOffline.FAILED | (DOMID_XEN << OWNER_SHIFT)
            return OfflineResult(-errno.EPERM, status)
        extra = PageOffline.BROKEN if broken else 0
        if page.use is PageUse.FREE:
            page.offlined, page.broken = True, page.broken or broken
            return OfflineResult(0, PageOffline.OFFLINED | extra)
        if page.use is PageUse.XEN_HEAP:
            page.broken = page.broken or broken
            return OfflineResult(0, PageOffline.PENDING | extra | (DOMID_XEN << OWNER_SHIFT))
        assert page.owner is not None
        if page.broken:
            owner = self.domains.get(page.owner)
            if owner is not None:
                owner.domain.crash(f"host memory error again on broken page mfn {mfn:#x}")
            return OfflineResult(0, PageOffline.AGAIN)
        page.broken = page.broken or broken
        status = PageOffline.PENDING | PageOffline.OWNED | extra | (page.owner << OWNER_SHIFT)
        return OfflineResult(0, status)

    def unmmap_broken_page(self, domid: int, mfn: int, gfn: int) -> int:
        """Turn the guest's mapping of a broken frame into RAM_BROKEN (reference 5.6)."""
        gd = self.domains[domid]
        if gd.hardware:
            return 0
        if mfn not in self.pages:
            return -errno.EINVAL
        if gd.kind is not DomainKind.HVM_HAP:
            return -errno.EOPNOTSUPP
        entry = gd.p2m.get(gfn)
        if entry is None or entry.type not in BREAKABLE_TYPES:
            return -1
        entry.type = P2mType.RAM_BROKEN
        for cb in self.on_broken:
            cb(domid, gfn)
        return 0
