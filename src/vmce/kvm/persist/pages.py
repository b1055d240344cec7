"""Guest memory in PAGE_DATA records laid out so that a restore can map it from the file.

A PAGE_DATA body is ``8 + 8 * count`` bytes of header and pfn array, then the pages, and a
record's header is 8 bytes, so the pages of a record that starts at file offset ``o`` begin at
``o + 16 + 8 * count``. Records are only 8-byte aligned, but the saver is free to choose how
many pfns each record holds: with ``count`` chosen so that ``o + 16 + 8 * count`` is a
multiple of 4096, the record's pages sit on page boundaries of the file, and since pages are
4096 bytes the next record then starts at a page boundary too (its count is then 510 modulo
512). The stream stays an ordinary libxc stream (Xen's verifier and restorer see nothing
unusual: batch sizes are the saver's business).

The arithmetic only closes exactly for some guest sizes (the number of records is fixed
modulo 256 by the total), so :func:`plan_batches` lets the last record hold the few pfns left
over, unaligned: a snapshot restore maps every aligned record copy-on-write
(``MAP_PRIVATE | MAP_FIXED`` over the guest's RAM) and copies that remainder (a few hundred
pages at most, under 2 % of a 64 MiB guest and a handful of a 1 GiB one).
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from vmce.kvm.memory import GuestMemory
from vmce.save.stream import (
    MAX_PAGES_PER_RECORD,
    PAGE_SIZE,
    PageDataHeader,
    PageType,
    RecordSummary,
    RecordType,
    StreamWriter,
)

#: Record header (8) + PAGE_DATA header (8): the fixed bytes before a record's pfn array.
PAGE_RECORD_HEAD = 16
PFN_ENTRY = 8
#: Pfns per record the planner aims at (about 16 MiB of pages; 510 modulo 512).
DEFAULT_TARGET = 4094
#: Unaligned remainders that differ by less than this many pages count as equally good.
REMAINDER_SLACK = 64


def aligned_residue(offset: int) -> int:
    """The count (mod 512) that puts the pages of a record starting at ``offset`` on a page
    boundary of the file; 512 instead of 0 (a record holds at least one pfn)."""
    if offset % 8:
        raise ValueError(f"records start 8-byte aligned, not at {offset:#x}")
    r = (-(offset + PAGE_RECORD_HEAD) % PAGE_SIZE) // PFN_ENTRY
    return r or PAGE_SIZE // PFN_ENTRY


def page_data_offset(offset: int, count: int) -> int:
    """File offset of the first page of a PAGE_DATA record at ``offset`` with ``count`` pfns."""
    return offset + PAGE_RECORD_HEAD + PFN_ENTRY * count


@dataclass(frozen=True)
class BatchPlan:
    """Pfn counts per PAGE_DATA record; all but the last ``unaligned`` pfns are page-aligned."""

    counts: tuple[int, ...]
    unaligned: int

    @property
    def total(self) -> int:
        return sum(self.counts)


def plan_batches(
    start: int,
    npfns: int,
    *,
    target: int = DEFAULT_TARGET,
    max_count: int = MAX_PAGES_PER_RECORD,
) -> BatchPlan:
    """Counts for ``npfns`` pfns written from file offset ``start`` (see the module doc).

    The number of records decides how many pfns are left for an unaligned last record; among
    the numbers that leave the fewest (to within :data:`REMAINDER_SLACK`), the one closest to
    ``npfns / target`` wins.
    """
    if npfns <= 0:
        return BatchPlan((), 0)
    unit = PAGE_SIZE // PFN_ENTRY  # 512: counts repeat their alignment modulo this
    first = aligned_residue(start)
    rest = aligned_residue(0)  # 510: every record after an aligned one
    if npfns < first:
        return BatchPlan(_split(npfns, target, max_count), npfns)
    ideal = max(1, round(npfns / target))
    best: tuple[int, int, int, int] | None = None  # (slack bucket, distance, unaligned, n)
    for n in range(1, npfns // rest + 2):
        base = first + rest * (n - 1)
        if base > npfns:
            break
        left = (npfns - base) % unit
        extra = (npfns - left - base) // unit
        room = (max_count - first) // unit + (n - 1) * ((max_count - rest) // unit)
        if extra > room:
            continue
        key = (left // REMAINDER_SLACK, abs(n - ideal), left, n)
        if best is None or key < best:
            best = key
    if best is None:
        return BatchPlan(_split(npfns, target, max_count), npfns)
    _, _, left, n = best
    counts = [first] + [rest] * (n - 1)
    units = (npfns - left - sum(counts)) // unit
    caps = [(max_count - c) // unit for c in counts]
    i = 0
    while units:
        step = min(units, max(1, units // n), caps[i])
        counts[i] += step * unit
        caps[i] -= step
        units -= step
        i = (i + 1) % n
    return BatchPlan((*counts, *_split(left, target, max_count)), left)


def _split(n: int, target: int, max_count: int) -> tuple[int, ...]:
    size = max(1, min(target, max_count))
    return tuple(min(size, n - i) for i in range(0, n, size))


# -- writing ----------------------------------------------------------------------------------


def flat_view(memory: GuestMemory) -> memoryview:
    """The whole of a flat guest RAM (one region from GPA 0) as a writable byte view."""
    regions = memory.regions
    if len(regions) != 1 or regions[0].gpa != 0:
        raise ValueError("only guest RAM in one region from GPA 0 can be saved")
    region = regions[0]
    raw = (ctypes.c_char * region.size).from_address(memory.host_address(region))
    return memoryview(raw).cast("B")


def write_pages(
    writer: StreamWriter,
    ram: memoryview,
    plan: BatchPlan,
    broken: frozenset[int] = frozenset(),
) -> list[RecordSummary]:
    """PAGE_DATA records for pfns ``0 .. plan.total - 1``: pages of data straight from
    ``ram`` (no copy), BROKEN entries (no data) for ``broken`` pfns."""
    out: list[RecordSummary] = []
    pfn = 0
    for count in plan.counts:
        entries = array.array("Q", range(pfn, pfn + count))
        parts: list[bytes] = [PageDataHeader(count).pack(), b""]
        run_start = pfn
        nr_pages = 0
        for p in range(pfn, pfn + count + 1):
            if p == pfn + count or p in broken:
                if p > run_start:
                    # Views of guest RAM: the writer only takes len() and writes them.
                    parts.append(cast(bytes, ram[run_start * PAGE_SIZE : p * PAGE_SIZE]))
                    nr_pages += p - run_start
                if p < pfn + count:
                    entries[p - pfn] = p | int(PageType.BROKEN) << 60
                run_start = p + 1
        parts[1] = entries.tobytes()
        note = f"{count} pfns, {nr_pages} pages"
        out.append(writer.write_record(RecordType.PAGE_DATA, parts, note=note))
        pfn += count
    return out


# -- placing pages on restore -----------------------------------------------------------------


@dataclass(frozen=True)
class PageRun:
    """Consecutive pfns whose pages lie back to back in the stream file."""

    pfn: int
    count: int
    offset: int

    @property
    def aligned(self) -> bool:
        return self.offset % PAGE_SIZE == 0


MAP_FIXED = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]


def map_private(address: int, length: int, fd: int, offset: int) -> None:
    """Replace ``[address, address + length)`` by a private (copy-on-write) mapping of the
    file at ``offset``: reads share the page cache, the first write copies the page."""
    got = _mmap(
        address, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | MAP_FIXED, fd, offset
    )
    if got != address:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"mmap of {length} bytes at file offset {offset:#x}: {os.strerror(err)}")


def read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the file at ``offset`` (no intermediate copy)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"the stream file ends at {offset + done:#x}")
        done += n


@dataclass
class PlaceReport:
    """How a restore put the pages in place."""

    mapped_pages: int = 0
    copied_pages: int = 0
    mappings: int = 0


def place_pages(
    memory: GuestMemory,
    fd: int,
    runs: Sequence[PageRun],
    *,
    cow: bool,
    zero_pfns: Sequence[int] = (),
) -> PlaceReport:
    """Put every run's pages into guest RAM: mapped copy-on-write from ``fd`` where the file
    offset is page-aligned and ``cow`` is set, else read (copied)."""
    ram = flat_view(memory)
    base = memory.host_address(memory.regions[0])
    report = PlaceReport()
    for run in runs:
        start, length = run.pfn * PAGE_SIZE, run.count * PAGE_SIZE
        if start + length > len(ram):
            raise ValueError(f"pfns {run.pfn:#x}+{run.count} are beyond guest RAM")
        if cow and run.aligned:
            map_private(base + start, length, fd, run.offset)
            report.mapped_pages += run.count
            report.mappings += 1
        else:
            read_into(fd, ram[start : start + length], run.offset)
            report.copied_pages += run.count
    for pfn in zero_pfns:
        ram[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    return report


def runs_of(pfns: Sequence[int], offset: int) -> Iterator[PageRun]:
    """Runs of consecutive pfns whose pages follow each other from file ``offset``."""
    i = 0
    while i < len(pfns):
        j = i + 1
        while j < len(pfns) and pfns[j] == pfns[j - 1] + 1:
            j += 1
        yield PageRun(pfns[i], j - i, offset + i * PAGE_SIZE)
        i = j
