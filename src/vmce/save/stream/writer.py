"""A streaming writer of libxc v2/v3 streams for x86 HVM guests.

Records go to a binary file object one by one, as they are produced: guest memory is written in
PAGE_DATA batches of ``batch_size`` pages, so a large guest is never held in memory. The file
object needs only ``write`` (a pipe or socket file works). The writer applies the same
:class:`~vmce.save.stream.rules.RecordSequence` as the reader, so what it writes the reader
accepts; misuse raises :class:`ValueError` before anything of the offending record is written.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import BinaryIO

from vmce.save.stream.codecs import (
    MAX_PAGES_PER_RECORD,
    encode_cpuid_policy,
    encode_hvm_params,
    encode_msr_policy,
    encode_page_data,
    encode_tsc_info,
)
from vmce.save.stream.format import (
    CURRENT_VERSION,
    REC_LENGTH_MAX,
    SUPPORTED_VERSIONS,
    XEN_VERSION,
    CpuidLeaf,
    DomainHeader,
    DomainType,
    ImageHeader,
    MsrPolicyEntry,
    PageType,
    RecordHeader,
    RecordType,
    TscInfo,
    padded,
    record_name,
)
from vmce.save.stream.rules import RecordSequence, fixed_length
from vmce.save.stream.summary import RecordSummary, Stream

#: A page to save: pfn, type, and the 4096 bytes for types that carry data (else ``None``).
PageItem = tuple[int, PageType, bytes | None]

DEFAULT_BATCH = 1024


class StreamWriter:
    """Writes one x86 HVM stream: :meth:`write_headers`, the records, then :meth:`write_end`."""

    def __init__(
        self,
        f: BinaryIO,
        *,
        version: int = CURRENT_VERSION,
        xen_version: tuple[int, int] = XEN_VERSION,
    ) -> None:
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"stream version must be one of {SUPPORTED_VERSIONS}, not {version}")
        self._f = f
        self.image = ImageHeader(version=version)
        self.domain = DomainHeader(
            DomainType.X86_HVM, xen_major=xen_version[0], xen_minor=xen_version[1]
        )
        self._sequence = RecordSequence(version)
        self._records: list[RecordSummary] = []
        self._offset = 0
        self._started = False

    @property
    def version(self) -> int:
        return self.image.version

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        return self._offset

    def summary(self) -> Stream:
        """The headers and every record written so far."""
        return Stream(self.image, self.domain, tuple(self._records))

    # -- framing ------------------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        self._f.write(data)
        self._offset += len(data)

    def write_headers(self) -> None:
        """The image and domain headers; must come first, once."""
        if self._started:
            raise ValueError("headers already written")
        self._started = True
        self._emit(self.image.pack())
        self._emit(self.domain.pack())

    def write_record(
        self, rtype: int, parts: Sequence[bytes] = (), note: str = ""
    ) -> RecordSummary:
        """One record from the pieces of its body; header, body and zero padding."""
        if not self._started:
            raise ValueError("write_headers() first")
        length = sum(len(p) for p in parts)
        if length > REC_LENGTH_MAX:
            raise ValueError(f"record body of {length} bytes exceeds {REC_LENGTH_MAX}")
        fixed = fixed_length(rtype)
        if fixed is not None and length != fixed:
            raise ValueError(f"a {record_name(rtype)} record is {fixed} bytes, not {length}")
        self._sequence.admit(rtype)
        rec = RecordSummary(len(self._records), rtype, self._offset, length, note)
        self._emit(RecordHeader(rtype, length).pack())
        for p in parts:
            self._emit(p)
        self._emit(bytes(padded(length) - length))
        self._records.append(rec)
        return rec

    # -- typed records ------------------------------------------------------------------------

    def write_cpuid_policy(self, leaves: Sequence[CpuidLeaf]) -> RecordSummary:
        return self.write_record(RecordType.X86_CPUID_POLICY, [encode_cpuid_policy(leaves)])

    def write_msr_policy(self, entries: Sequence[MsrPolicyEntry]) -> RecordSummary:
        return self.write_record(RecordType.X86_MSR_POLICY, [encode_msr_policy(entries)])

    def write_static_data_end(self) -> RecordSummary:
        return self.write_record(RecordType.STATIC_DATA_END)

    def write_page_batch(self, batch: Sequence[PageItem]) -> RecordSummary:
        """One PAGE_DATA record."""
        if len(batch) > MAX_PAGES_PER_RECORD:
            raise ValueError(f"at most {MAX_PAGES_PER_RECORD} pages fit one PAGE_DATA record")
        parts = encode_page_data(batch)
        nr_pages = len(parts) - 2
        return self.write_record(
            RecordType.PAGE_DATA, parts, note=f"{len(batch)} pfns, {nr_pages} pages"
        )

    def write_pages(self, pages: Iterable[PageItem], batch_size: int = DEFAULT_BATCH) -> int:
        """PAGE_DATA records of up to ``batch_size`` pfns each; returns the number of pfns."""
        if not 1 <= batch_size <= MAX_PAGES_PER_RECORD:
            raise ValueError(f"batch_size must be 1..{MAX_PAGES_PER_RECORD}, not {batch_size}")
        total = 0
        it = iter(pages)
        while batch := list(itertools.islice(it, batch_size)):
            self.write_page_batch(batch)
            total += len(batch)
        return total

    def write_tsc_info(self, tsc: TscInfo) -> RecordSummary:
        return self.write_record(RecordType.X86_TSC_INFO, [encode_tsc_info(tsc)])

    def write_hvm_params(self, params: Mapping[int, int]) -> RecordSummary:
        return self.write_record(RecordType.HVM_PARAMS, [encode_hvm_params(params)])

    def write_hvm_context(self, body: bytes) -> RecordSummary:
        """HVM_CONTEXT: the blob (see :func:`vmce.save.hvmrecords.encode_context`)."""
        if not body:
            raise ValueError("HVM_CONTEXT must not be empty")
        return self.write_record(RecordType.HVM_CONTEXT, [body])

    def write_end(self) -> Stream:
        """The END record; returns the summary of the whole stream."""
        self.write_record(RecordType.END)
        return self.summary()
