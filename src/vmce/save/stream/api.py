"""Whole-stream API: save an x86 HVM guest to a libxc v3 stream, read one back, inspect one.

:func:`read_stream` never applies anything: pages go to the caller's ``page_sink`` as they
arrive (the caller stages them, e.g. into the memory of a guest that has not run), and the
other records come back in :class:`StreamContents` only once the whole stream, END included,
has been read and checked. A caller therefore applies registers, parameters and vMCE state
only after a fully verified stream: there is no partial restore.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from vmce.save.hvmctx import HvmContext, HvmContextError
from vmce.save.hvmrecords import VmceInflight, decode_context, encode_context
from vmce.save.stream.codecs import (
    decode_cpuid_policy,
    decode_hvm_params,
    decode_msr_policy,
    decode_page_data,
    decode_tsc_info,
)
from vmce.save.stream.format import (
    CURRENT_VERSION,
    XEN_VERSION,
    CpuidLeaf,
    MsrPolicyEntry,
    PageType,
    RecordError,
    RecordType,
    TscInfo,
)
from vmce.save.stream.reader import RawRecord, StreamReader
from vmce.save.stream.summary import Stream
from vmce.save.stream.writer import DEFAULT_BATCH, PageItem, StreamWriter

#: Receives each pfn of each PAGE_DATA record: pfn, type, and a view of the page for types
#: that carry data (valid only during the call: copy it to keep it), else ``None``.
PageSink = Callable[[int, PageType, memoryview | None], None]


def write_stream(
    f: BinaryIO,
    *,
    pages: Iterable[PageItem],
    tsc_info: TscInfo,
    hvm_params: Mapping[int, int],
    hvm_context: HvmContext,
    version: int = CURRENT_VERSION,
    cpuid_policy: Sequence[CpuidLeaf] | None = None,
    msr_policy: Sequence[MsrPolicyEntry] | None = None,
    vmce_inflight: Mapping[int, VmceInflight] | None = None,
    batch_size: int = DEFAULT_BATCH,
    xen_version: tuple[int, int] = XEN_VERSION,
) -> Stream:
    """Write a whole x86 HVM stream in the spec's order; returns its summary.

    Order: [X86_CPUID_POLICY] [X86_MSR_POLICY] STATIC_DATA_END (v3), PAGE_DATA in batches of
    ``batch_size`` pfns, X86_TSC_INFO, HVM_PARAMS (omitted when empty), HVM_CONTEXT (with the
    vendor trailer when ``vmce_inflight`` is not empty), END. ``pages`` is consumed lazily.
    """
    w = StreamWriter(f, version=version, xen_version=xen_version)
    w.write_headers()
    if cpuid_policy is not None:
        w.write_cpuid_policy(cpuid_policy)
    if msr_policy is not None:
        w.write_msr_policy(msr_policy)
    if version >= 3:
        w.write_static_data_end()
    w.write_pages(pages, batch_size)
    w.write_tsc_info(tsc_info)
    if hvm_params:
        w.write_hvm_params(hvm_params)
    w.write_hvm_context(encode_context(hvm_context, vmce_inflight))
    return w.write_end()


@dataclass
class StreamContents:
    """Everything but the pages of a verified stream, for the caller to apply."""

    stream: Stream
    hvm_context: HvmContext
    tsc_info: TscInfo | None = None
    hvm_params: dict[int, int] = field(default_factory=dict)
    vmce_inflight: dict[int, VmceInflight] = field(default_factory=dict)
    cpuid_policy: tuple[CpuidLeaf, ...] | None = None
    msr_policy: tuple[MsrPolicyEntry, ...] | None = None
    #: pfn entries seen, and how many of them carried a page of data.
    pfns: int = 0
    pages: int = 0


@dataclass
class _Collector:
    """Decodes the bodies of one stream's records as the reader yields them."""

    page_sink: PageSink
    max_pfn: int | None
    context: HvmContext | None = None
    tsc: TscInfo | None = None
    params: dict[int, int] = field(default_factory=dict)
    inflight: dict[int, VmceInflight] = field(default_factory=dict)
    cpuid: tuple[CpuidLeaf, ...] | None = None
    msrs: tuple[MsrPolicyEntry, ...] | None = None
    pfns: int = 0
    pages: int = 0

    def result(self, stream: Stream) -> StreamContents:
        assert self.context is not None  # the sequence rules make END require it
        return StreamContents(
            stream=stream,
            hvm_context=self.context,
            tsc_info=self.tsc,
            hvm_params=self.params,
            vmce_inflight=self.inflight,
            cpuid_policy=self.cpuid,
            msr_policy=self.msrs,
            pfns=self.pfns,
            pages=self.pages,
        )

    def take(self, rec: RawRecord) -> str:
        """Decode one record; returns a note for its summary. Raises :class:`RecordError`."""
        handler = _HANDLERS.get(rec.type)
        return handler(self, rec.body) if handler else ""

    def page_data(self, body: memoryview) -> str:
        entries = decode_page_data(body)
        if self.max_pfn is not None:
            for i, e in enumerate(entries):
                if e.pfn > self.max_pfn:
                    raise RecordError(
                        f"pfn[{i}] {e.pfn:#x} is beyond the guest's max_pfn {self.max_pfn:#x}"
                    )
        for e in entries:
            self.page_sink(e.pfn, e.type, e.data)
        nr_pages = sum(1 for e in entries if e.data is not None)
        self.pfns += len(entries)
        self.pages += nr_pages
        return f"{len(entries)} pfns, {nr_pages} pages"

    def tsc_info(self, body: memoryview) -> str:
        self.tsc = tsc = decode_tsc_info(body)
        return f"mode {tsc.mode}, {tsc.khz} kHz"

    def hvm_params(self, body: memoryview) -> str:
        self.params = params = decode_hvm_params(body)
        return f"{len(params)} params" if params else "empty (tolerated: spec errata 1)"

    def hvm_context(self, body: memoryview) -> str:
        try:
            ctx, inflight = decode_context(bytes(body))
        except HvmContextError as e:
            raise RecordError(f"HVM context blob: {e}") from e
        self.context, self.inflight = ctx, inflight
        note = f"{len(ctx.records)} HVM records"
        return f"{note}, in-flight vMCE on {len(inflight)} vCPUs" if inflight else note

    def cpuid_policy(self, body: memoryview) -> str:
        self.cpuid = leaves = decode_cpuid_policy(body)
        return f"{len(leaves)} leaves"

    def msr_policy(self, body: memoryview) -> str:
        self.msrs = msrs = decode_msr_policy(body)
        return f"{len(msrs)} MSRs"


_HANDLERS: dict[int, Callable[[_Collector, memoryview], str]] = {
    RecordType.PAGE_DATA: _Collector.page_data,
    RecordType.X86_TSC_INFO: _Collector.tsc_info,
    RecordType.HVM_PARAMS: _Collector.hvm_params,
    RecordType.HVM_CONTEXT: _Collector.hvm_context,
    RecordType.X86_CPUID_POLICY: _Collector.cpuid_policy,
    RecordType.X86_MSR_POLICY: _Collector.msr_policy,
}


def read_stream(
    f: BinaryIO,
    *,
    page_sink: PageSink,
    max_pfn: int | None = None,
    allow_context_before_params: bool = False,
) -> StreamContents:
    """Read and check a whole x86 HVM stream; pages go to ``page_sink``, the rest is returned.

    ``max_pfn`` is the highest pfn the guest has: a PAGE_DATA entry beyond it is refused
    before any page of that record reaches the sink. ``allow_context_before_params`` accepts
    HVM_PARAMS after HVM_CONTEXT, the order libxc's own saver uses. Raises
    :class:`~vmce.save.stream.format.StreamError` (naming record index, type and offset) for
    anything malformed; exceptions raised by ``page_sink`` pass through unchanged.
    """
    reader = StreamReader(f, allow_context_before_params=allow_context_before_params)
    reader.read_headers()
    collector = _Collector(page_sink, max_pfn)
    for rec in reader.records():
        try:
            note = collector.take(rec)
        except RecordError as e:
            raise rec.error(str(e)) from e
        if note:
            reader.note(note)
    return collector.result(reader.summary())


def _discard(pfn: int, ptype: PageType, data: memoryview | None) -> None:
    """A page sink that keeps nothing."""


def inspect_stream(f: BinaryIO, *, allow_context_before_params: bool = False) -> Stream:
    """Check a whole stream as :func:`read_stream` does, keeping only its summary."""
    contents = read_stream(
        f, page_sink=_discard, allow_context_before_params=allow_context_before_params
    )
    return contents.stream
