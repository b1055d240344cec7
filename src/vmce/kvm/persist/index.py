"""A strict scan of a stream *file* that locates guest pages instead of reading them.

:func:`vmce.save.stream.read_stream` reads every byte through Python; a restore from a file
only needs to know where each page is, then copies it straight into guest RAM or maps it
(:mod:`vmce.kvm.persist.pages`). :func:`index_stream` checks everything ``read_stream`` checks
(headers, framing, padding, record order and multiplicity, every PAGE_DATA pfn entry and
length, every other record body) with the same messages, but reads only the headers and pfn
arrays of PAGE_DATA records: page contents are free-form bytes, and a PAGE_DATA body is a
multiple of 8 bytes, so it has no padding to check.

It also refuses a pfn sent twice (vmce's saver never does; a live-migration stream would).
"""

from __future__ import annotations

import array
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from vmce.kvm.persist.pages import PageRun, runs_of
from vmce.save.hvmctx import HvmContext, HvmContextError, Record
from vmce.save.hvmrecords import VmceInflight, decode_context_full
from vmce.save.stream import (
    PAGE_SIZE,
    CpuidLeaf,
    MsrPolicyEntry,
    PageDataHeader,
    PageType,
    RecordError,
    RecordHeader,
    RecordSummary,
    RecordType,
    Stream,
    StreamError,
    StreamReader,
    TscInfo,
)
from vmce.save.stream.codecs import (
    decode_cpuid_policy,
    decode_hvm_params,
    decode_msr_policy,
    decode_pfn,
    decode_tsc_info,
)
from vmce.save.stream.format import PFN_MASK, DomainHeader, ImageHeader, padded
from vmce.save.stream.reader import admit_record, record_error
from vmce.save.stream.rules import OPTIONAL_SKIPPED, RecordSequence

HEADERS_SIZE = ImageHeader.size() + DomainHeader.size()
#: Pfns below this are tracked in a byte map (64 MiB at most: a 256 GiB guest).
BITMAP_LIMIT = 1 << 26


@dataclass(frozen=True)
class PageRecord:
    """Where a PAGE_DATA record put its pfns, for later checks that name it."""

    summary: RecordSummary
    #: The highest pfn in the record and its position in the pfn array.
    max_pfn: int
    max_index: int

    def error(self, message: str) -> StreamError:
        s = self.summary
        return record_error(s.index, s.type, s.offset, message)


@dataclass
class StreamIndex:
    """A checked stream: its summary, where every page is, and the decoded other records."""

    stream: Stream
    runs: list[PageRun] = field(default_factory=list)
    page_records: list[PageRecord] = field(default_factory=list)
    #: Pfns sent without data (BROKEN, XALLOC, XTAB).
    no_data: dict[int, PageType] = field(default_factory=dict)
    pfns: int = 0
    pages: int = 0
    tsc_info: TscInfo | None = None
    hvm_params: dict[int, int] = field(default_factory=dict)
    context: HvmContext | None = None
    inflight: dict[int, VmceInflight] = field(default_factory=dict)
    vendor: list[Record] = field(default_factory=list)
    cpuid_policy: tuple[CpuidLeaf, ...] | None = None
    msr_policy: tuple[MsrPolicyEntry, ...] | None = None
    #: The summary of each non-PAGE_DATA record, by type, for messages.
    records: dict[int, RecordSummary] = field(default_factory=dict)

    @property
    def max_pfn(self) -> int:
        return max((r.max_pfn for r in self.page_records), default=-1)


class _Scanner:
    """One pass over the file: framing, order, then each body."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        #: Pfns sent so far: one byte per pfn below BITMAP_LIMIT, a set above it.
        self.seen = bytearray()
        self.seen_high: set[int] = set()

    def mark(self, first: int, count: int) -> int | None:
        """Record pfns ``first .. first + count - 1`` as sent; the offset of the first one
        that was sent before, if any."""
        end = first + count
        if end > BITMAP_LIMIT:
            for i, pfn in enumerate(range(first, end)):
                if pfn in self.seen_high or (pfn < len(self.seen) and self.seen[pfn]):
                    return i
                self.seen_high.add(pfn)
            return None
        if len(self.seen) < end:
            self.seen.extend(bytes(end - len(self.seen)))
        dup = self.seen.find(1, first, end)
        if dup >= 0:
            return dup - first
        self.seen[first:end] = b"\x01" * count
        return None

    def read(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        while len(data) < n:
            more = os.pread(self.fd, n - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def scan(self) -> StreamIndex:
        head = self.read(0, HEADERS_SIZE)
        reader = StreamReader(io.BytesIO(head))
        image, domain = reader.read_headers()
        seq = RecordSequence(image.version)
        summaries: list[RecordSummary] = []
        out = StreamIndex(Stream(image, domain))
        offset = HEADERS_SIZE
        while True:
            index = len(summaries)
            h, rule = admit_record(index, offset, self.read(offset, RecordHeader.size()), seq)
            self._check_frame(index, offset, h)
            summary = RecordSummary(index, h.type, offset, h.length)
            note = OPTIONAL_SKIPPED if rule is None else ""
            if rule is not None:
                try:
                    note = self._take(out, summary)
                except RecordError as e:
                    raise record_error(index, h.type, offset, str(e)) from e
            summaries.append(RecordSummary(index, h.type, offset, h.length, note))
            offset = summaries[-1].end_offset
            if h.type == RecordType.END:
                if self.size > offset:
                    raise record_error(index + 1, None, offset, "data after the END record")
                break
        out.stream = Stream(image, domain, tuple(summaries))
        out.runs.sort(key=lambda r: r.pfn)
        return out

    def _check_frame(self, index: int, offset: int, h: RecordHeader) -> None:
        """The body is all there and its padding is zero (without reading the body)."""

        def fail(message: str) -> StreamError:
            return record_error(index, h.type, offset, message)

        want = padded(h.length)
        left = max(0, self.size - offset - RecordHeader.size())
        if left < want:
            raise fail(f"truncated: the body needs {want} bytes, {left} left")
        pad = self.read(offset + RecordHeader.size() + h.length, want - h.length)
        if any(pad):
            raise fail("non-zero padding after the body")

    def _body(self, s: RecordSummary) -> memoryview:
        return memoryview(self.read(s.offset + RecordHeader.size(), s.length))

    def _take(self, out: StreamIndex, s: RecordSummary) -> str:
        if s.type == RecordType.PAGE_DATA:
            return self._page_data(out, s)
        handler = _HANDLERS.get(s.type)
        if handler is None:
            return ""
        out.records[s.type] = s
        return handler(out, self._body(s))

    def _page_data(self, out: StreamIndex, s: RecordSummary) -> str:
        hsz = PageDataHeader.size()
        if s.length < hsz:
            raise RecordError(
                f"PAGE_DATA body is {s.length} bytes, shorter than its {hsz}-byte header"
            )
        body = s.offset + RecordHeader.size()
        head = PageDataHeader.unpack_from(self.read(body, hsz))
        if head.count == 0:
            raise RecordError("PAGE_DATA count is 0")
        if head.res1:
            raise RecordError(f"PAGE_DATA reserved field is {head.res1:#x}")
        if s.length < hsz + 8 * head.count:
            raise RecordError(f"PAGE_DATA length {s.length} too short for {head.count} pfns")
        raw = array.array("Q", self.read(body + hsz, 8 * head.count))
        first = raw[0]
        if max(raw) <= PFN_MASK and raw == array.array("Q", range(first, first + len(raw))):
            # The common case, checked at C speed: consecutive pfns, all NOTAB with data.
            decoded = None
            nr_pages = len(raw)
        else:
            decoded = [decode_pfn(e, i) for i, e in enumerate(raw)]
            nr_pages = sum(1 for _, t in decoded if t.has_data)
        expected = hsz + 8 * head.count + PAGE_SIZE * nr_pages
        if s.length != expected:
            raise RecordError(
                f"PAGE_DATA length {s.length}, expected {hsz} + {8 * head.count} "
                f"+ {PAGE_SIZE * nr_pages} for {head.count} pfns with {nr_pages} pages"
            )
        pages_at = body + hsz + 8 * head.count
        if decoded is None:
            dup = self.mark(first, len(raw))
            if dup is not None:
                raise RecordError(f"pfn[{dup}] {first + dup:#x} was already sent")
            out.page_records.append(PageRecord(s, raw[-1], len(raw) - 1))
            out.runs.append(PageRun(first, len(raw), pages_at))
        else:
            for i, (pfn, ptype) in enumerate(decoded):
                if self.mark(pfn, 1) is not None:
                    raise RecordError(f"pfn[{i}] {pfn:#x} was already sent")
                if not ptype.has_data:
                    out.no_data[pfn] = ptype
            top = max(range(len(decoded)), key=lambda i: decoded[i][0])
            out.page_records.append(PageRecord(s, decoded[top][0], top))
            with_data = [pfn for pfn, t in decoded if t.has_data]
            out.runs.extend(runs_of(with_data, pages_at))
        out.pfns += head.count
        out.pages += nr_pages
        return f"{head.count} pfns, {nr_pages} pages"


def _tsc_info(out: StreamIndex, body: memoryview) -> str:
    out.tsc_info = tsc = decode_tsc_info(body)
    return f"mode {tsc.mode}, {tsc.khz} kHz"


def _hvm_params(out: StreamIndex, body: memoryview) -> str:
    out.hvm_params = params = decode_hvm_params(body)
    return f"{len(params)} params" if params else "empty (tolerated: spec errata 1)"


def _hvm_context(out: StreamIndex, body: memoryview) -> str:
    try:
        ctx, inflight, vendor = decode_context_full(bytes(body))
    except HvmContextError as e:
        raise RecordError(f"HVM context blob: {e}") from e
    out.context, out.inflight, out.vendor = ctx, inflight, vendor
    note = f"{len(ctx.records)} HVM records"
    if inflight:
        note += f", in-flight vMCE on {len(inflight)} vCPUs"
    if vendor:
        note += f", {len(vendor)} vendor entries"
    return note


def _cpuid_policy(out: StreamIndex, body: memoryview) -> str:
    out.cpuid_policy = leaves = decode_cpuid_policy(body)
    return f"{len(leaves)} leaves"


def _msr_policy(out: StreamIndex, body: memoryview) -> str:
    out.msr_policy = msrs = decode_msr_policy(body)
    return f"{len(msrs)} MSRs"


_HANDLERS: dict[int, Callable[[StreamIndex, memoryview], str]] = {
    RecordType.X86_TSC_INFO: _tsc_info,
    RecordType.HVM_PARAMS: _hvm_params,
    RecordType.HVM_CONTEXT: _hvm_context,
    RecordType.X86_CPUID_POLICY: _cpuid_policy,
    RecordType.X86_MSR_POLICY: _msr_policy,
}


def index_stream(fd: int) -> StreamIndex:
    """Check a whole stream file (read with ``pread``: the file position is not used) and
    return where its pages are; raises :class:`StreamError` naming record and offset."""
    return _Scanner(fd).scan()


def index_path(path: str | os.PathLike[str]) -> StreamIndex:
    """:func:`index_stream` of a file by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return index_stream(fd)
    finally:
        os.close(fd)
