"""A strict streaming reader of libxc v2/v3 streams: headers, framing, record order.

:class:`StreamReader` reads from any binary file object with ``read`` (no seeking), checks the
image and domain headers, then yields the records one at a time with their bodies. Framing
and order problems raise :class:`~vmce.save.stream.format.StreamError` naming the record's
index, type and byte offset. Record bodies are checked by the caller
(:func:`vmce.save.stream.api.read_stream`) with the codecs, through :meth:`RawRecord.error`.

Refused here: a short read anywhere; a wrong marker, id or version (2 and 3 are accepted);
the big-endian option (as libxc's C restorer does; the Python verifier's own check of that bit
is ineffective); non-zero reserved header fields, option bits or padding; a domain that is not
x86 HVM or whose page_shift is not 12; record bodies over 128 MiB; fixed-size records of the
wrong length; everything :class:`~vmce.save.stream.rules.RecordSequence` refuses; a stream
without END; any byte after END (the verifier ignores them; vmce does not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from vmce.save.stream.format import (
    IHDR_ID,
    IHDR_MARKER,
    IHDR_OPTIONS_RESERVED,
    PAGE_SHIFT,
    REC_LENGTH_MAX,
    SUPPORTED_VERSIONS,
    DomainHeader,
    DomainType,
    ImageHeader,
    ImageOption,
    RecordError,
    RecordHeader,
    RecordType,
    StreamError,
    padded,
    record_name,
)
from vmce.save.stream.rules import OPTIONAL_SKIPPED, RecordRule, RecordSequence
from vmce.save.stream.summary import RecordSummary, Stream


def where(index: int, rtype: int | None, offset: int) -> str:
    """The place of a record, as every reader message starts."""
    if rtype is None:
        return f"record {index} at offset {offset:#x}"
    return f"record {index} ({record_name(rtype)}, type {rtype:#x}) at offset {offset:#x}"


def record_error(index: int, rtype: int | None, offset: int, message: str) -> StreamError:
    return StreamError(
        f"{where(index, rtype, offset)}: {message}", offset=offset, index=index, rtype=rtype
    )


def admit_record(
    index: int, offset: int, raw: bytes, seq: RecordSequence
) -> tuple[RecordHeader, RecordRule | None]:
    """Parse record ``index``'s header (``raw``, read at ``offset``) and admit it: its type in
    this position of the stream, its length against the maximum and the type's fixed length.

    Returns the header and the type's rule (``None`` for an optional record to skip); every
    refusal is a :class:`StreamError` naming the record and offset. Shared by every reader of
    the format, so they refuse the same streams with the same words.
    """
    if not raw:
        raise record_error(index, None, offset, "stream ends without an END record")
    if len(raw) != RecordHeader.size():
        raise record_error(index, None, offset, f"truncated record header ({len(raw)} of 8 bytes)")
    h = RecordHeader.unpack_from(raw)
    try:
        rule = seq.admit(h.type)
    except RecordError as e:
        raise record_error(index, h.type, offset, str(e)) from e
    if h.length > REC_LENGTH_MAX:
        raise record_error(
            index,
            h.type,
            offset,
            f"length {h.length:#x} exceeds the maximum {REC_LENGTH_MAX:#x} (128 MiB)",
        )
    if rule is not None and rule.fixed_length is not None and h.length != rule.fixed_length:
        raise record_error(
            index,
            h.type,
            offset,
            f"length {h.length}, a {record_name(h.type)} record is {rule.fixed_length}",
        )
    return h, rule


@dataclass(frozen=True)
class RawRecord:
    """A framed record: its summary and its unpadded body."""

    summary: RecordSummary
    body: memoryview

    @property
    def type(self) -> int:
        return self.summary.type

    def error(self, message: str) -> StreamError:
        """A :class:`StreamError` about this record."""
        s = self.summary
        return record_error(s.index, s.type, s.offset, message)


class StreamReader:
    """Reads one stream: :meth:`read_headers`, then iterate :meth:`records`."""

    def __init__(self, f: BinaryIO, *, allow_context_before_params: bool = False) -> None:
        self._f = f
        self._offset = 0
        self._allow_context_before_params = allow_context_before_params
        self._records: list[RecordSummary] = []
        self.image: ImageHeader | None = None
        self.domain: DomainHeader | None = None

    # -- input --------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes: fewer only at the end of the input."""
        chunks: list[bytes] = []
        left = n
        while left:
            chunk = self._f.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        self._offset += len(data)
        return data

    # -- headers ------------------------------------------------------------------------------

    def read_headers(self) -> tuple[ImageHeader, DomainHeader]:
        """Read and check the image and domain headers."""
        self.image = self._read_image_header()
        self.domain = self._read_domain_header()
        return self.image, self.domain

    def _header(self, cls: type[ImageHeader] | type[DomainHeader], what: str) -> bytes:
        offset = self._offset
        data = self._read(cls.size())
        if len(data) != cls.size():
            raise StreamError(
                f"{what} at offset {offset:#x}: truncated ({len(data)} of {cls.size()} bytes)",
                offset=offset,
            )
        return data

    def _read_image_header(self) -> ImageHeader:
        h = ImageHeader.unpack_from(self._header(ImageHeader, "image header"))
        problem = _image_header_problem(h)
        if problem:
            raise StreamError(f"image header at offset 0x0: {problem}", offset=0)
        return h

    def _read_domain_header(self) -> DomainHeader:
        offset = self._offset
        h = DomainHeader.unpack_from(self._header(DomainHeader, "domain header"))
        problem = _domain_header_problem(h)
        if problem:
            raise StreamError(f"domain header at offset {offset:#x}: {problem}", offset=offset)
        return h

    # -- records ------------------------------------------------------------------------------

    def records(self) -> Iterator[RawRecord]:
        """Every record up to and including END (optional ones are skipped, not yielded)."""
        if self.image is None:
            self.read_headers()
        assert self.image is not None
        seq = RecordSequence(
            self.image.version, allow_context_before_params=self._allow_context_before_params
        )
        while True:
            rec = self._next_record(seq)
            if rec is None:
                continue
            if rec.type == RecordType.END:
                self._check_nothing_after(rec.summary)
                yield rec
                return
            yield rec

    def _next_record(self, seq: RecordSequence) -> RawRecord | None:
        index, offset = len(self._records), self._offset
        h, rule = admit_record(index, offset, self._read(RecordHeader.size()), seq)
        body = self._read_body(index, offset, h)
        summary = RecordSummary(index, h.type, offset, h.length)
        if rule is None:
            summary = dataclasses.replace(summary, note=OPTIONAL_SKIPPED)
        self._records.append(summary)
        return None if rule is None else RawRecord(summary, body)

    def _read_body(self, index: int, offset: int, h: RecordHeader) -> memoryview:
        def fail(message: str) -> StreamError:
            return record_error(index, h.type, offset, message)

        want = padded(h.length)
        data = self._read(want)
        if len(data) != want:
            raise fail(f"truncated: the body needs {want} bytes, {len(data)} left")
        if any(data[h.length :]):
            raise fail("non-zero padding after the body")
        return memoryview(data)[: h.length]

    def _check_nothing_after(self, end: RecordSummary) -> None:
        if self._f.read(1):
            raise record_error(end.index + 1, None, end.end_offset, "data after the END record")

    # -- results ------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """Attach a note to the summary of the last record read."""
        self._records[-1] = dataclasses.replace(self._records[-1], note=text)

    def summary(self) -> Stream:
        """The headers and the records read so far."""
        if self.image is None or self.domain is None:
            raise ValueError("read_headers() first")
        return Stream(self.image, self.domain, tuple(self._records))


def _image_header_problem(h: ImageHeader) -> str:
    if h.marker != IHDR_MARKER:
        return (
            f"marker {h.marker:#018x} is not all ones "
            "(not a libxc v2+ stream; a legacy image has a zero bit in its first 8 bytes)"
        )
    if h.id != IHDR_ID:
        return f"id {h.id:#010x}, expected {IHDR_ID:#010x} (XENF)"
    if h.version not in SUPPORTED_VERSIONS:
        return f"version {h.version}, expected one of {SUPPORTED_VERSIONS}"
    if h.options & IHDR_OPTIONS_RESERVED:
        return f"reserved option bits {h.options & IHDR_OPTIONS_RESERVED:#06x} set"
    if h.options & ImageOption.BIG_ENDIAN:
        return "big-endian stream (only little-endian streams are supported)"
    if h.res1 or h.res2:
        return f"reserved fields {h.res1:#06x}:{h.res2:#010x} are not zero"
    return ""


def _domain_header_problem(h: DomainHeader) -> str:
    if h.type == DomainType.X86_PV:
        return "x86 PV stream (only x86 HVM streams are supported)"
    if h.type != DomainType.X86_HVM:
        return f"unknown domain type {h.type:#x}"
    if h.page_shift != PAGE_SHIFT:
        return f"page_shift {h.page_shift}, expected {PAGE_SHIFT}"
    if h.res1:
        return f"reserved field {h.res1:#06x} is not zero"
    return ""
