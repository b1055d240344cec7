"""What a stream holds, record by record: the summary ``inspect`` prints and tests compare."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmce.save.stream.format import (
    DomainHeader,
    DomainType,
    ImageHeader,
    RecordHeader,
    padded,
    record_name,
)


@dataclass(frozen=True)
class RecordSummary:
    """One record: its index, raw type, byte offset of its header, unpadded body length."""

    index: int
    type: int
    offset: int
    length: int
    note: str = ""

    @property
    def name(self) -> str:
        return record_name(self.type)

    @property
    def end_offset(self) -> int:
        """The offset just past this record's padding."""
        return self.offset + RecordHeader.size() + padded(self.length)

    def describe(self) -> str:
        text = f"#{self.index:<4} @{self.offset:#010x} {self.name:<17} {self.length:>9} bytes"
        return f"{text}  {self.note}" if self.note else text


@dataclass(frozen=True)
class Stream:
    """A whole stream: its two headers and the summary of every record, END included."""

    image: ImageHeader
    domain: DomainHeader
    records: tuple[RecordSummary, ...] = field(default_factory=tuple)

    @property
    def version(self) -> int:
        return self.image.version

    @property
    def size(self) -> int:
        """Total bytes, headers included."""
        if self.records:
            return self.records[-1].end_offset
        return ImageHeader.size() + DomainHeader.size()

    def describe(self) -> list[str]:
        """Human-readable lines: the headers, then one line per record."""
        try:
            dtype = DomainType(self.domain.type).name
        except ValueError:
            dtype = f"type {self.domain.type:#x}"
        d = self.domain
        xen = "legacy converted" if d.xen_major == 0 else f"Xen {d.xen_major}.{d.xen_minor}"
        lines = [
            f"libxc stream version {self.version}, little endian, {self.size} bytes",
            f"domain: {dtype}, page_shift {d.page_shift}, {xen}",
        ]
        lines += [r.describe() for r in self.records]
        return lines
