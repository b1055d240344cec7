"""The libxc migration stream v2/v3: constants, enums, header and record-body layouts, errors.

Everything here is a fact of Xen's ``docs/specs/libxc-migration-stream.pandoc`` and
``tools/libs/guest/xg_sr_stream_format.h`` (reference section 6.8), declared once. The image
header is big-endian; the domain header, record headers and bodies are little-endian (the only
endianness vmce reads or writes, like libxc's C restorer).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

from vmce.save.layout import Layout, u16, u32, u64

IHDR_MARKER = 0xFFFF_FFFF_FFFF_FFFF
#: "XENF" in ASCII.
IHDR_ID = 0x58454E46
#: The versions a reader accepts; writers produce the newest.
SUPPORTED_VERSIONS = (2, 3)
CURRENT_VERSION = 3
#: Every record (header + body + padding) is a multiple of this many bytes.
REC_ALIGN = 8
#: The largest record body libxc accepts (128 MiB).
REC_LENGTH_MAX = 128 << 20
#: Record types with this bit set are optional: a restorer may ignore them.
REC_TYPE_OPTIONAL = 0x8000_0000
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: The Xen version written into domain headers. Restorers only print it; it names the first
#: release whose HVM save layouts equal vmce's (``hvm_hw_lapic`` grew ``pending_esr``, 24 -> 32
#: bytes, in Xen 4.21; the stream format itself is unchanged since version 3).
XEN_VERSION = (4, 21)


class StreamError(ValueError):
    """A stream vmce refuses; the message names the record index, type and byte offset.

    ``index`` is the record's position (0 = first record after the domain header), ``None``
    for header errors; ``rtype`` the record type if known; ``offset`` the byte offset of the
    record header (or of the header in question).
    """

    def __init__(
        self, message: str, *, offset: int, index: int | None = None, rtype: int | None = None
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.index = index
        self.rtype = rtype


class RecordError(ValueError):
    """A record vmce refuses (malformed body, wrong place in the stream), without its place:
    raised by the codecs and the sequence rules; the reader turns it into :class:`StreamError`
    naming the record, and the writer lets it through (it is then a caller's mistake)."""


class ImageOption(IntFlag):
    """Image header ``options`` bits; bits 1-15 are reserved."""

    BIG_ENDIAN = 1 << 0


IHDR_OPTIONS_RESERVED = 0xFFFE


class DomainType(IntEnum):
    """Domain header ``type``."""

    X86_PV = 1
    X86_HVM = 2


class RecordType(IntEnum):
    """Record header ``type``; 0x13-0x7FFFFFFF are reserved mandatory types."""

    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


def is_optional(rtype: int) -> bool:
    """Whether a record type has the optional bit (31) set."""
    return bool(rtype & REC_TYPE_OPTIONAL)


def record_name(rtype: int) -> str:
    """A record type's name, or a description of an unknown one."""
    try:
        return RecordType(rtype).name
    except ValueError:
        kind = "optional" if is_optional(rtype) else "reserved mandatory"
        return f"unknown {kind} type"


class PageType(IntEnum):
    """PAGE_DATA pfn-entry type (bits 63:60): ``XEN_DOMCTL_PFINFO_*`` shifted by 32.

    0x5-0x8 are reserved (invalid); the pinned page-table types have bit 3 (LPINTAB) set.
    """

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PIN = 0x9
    L2TAB_PIN = 0xA
    L3TAB_PIN = 0xB
    L4TAB_PIN = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF

    @property
    def has_data(self) -> bool:
        """Whether the record carries a page of data for an entry of this type."""
        return self < PageType.BROKEN


PFN_BITS = 52
PFN_MASK = (1 << PFN_BITS) - 1
#: Bits 59:52 of a pfn entry, reserved (zero).
PFN_RESERVED_MASK = ((1 << 60) - 1) & ~PFN_MASK
PAGE_TYPE_SHIFT = 60


# -- headers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageHeader(Layout):
    """The image header (24 bytes, always big-endian)."""

    BYTE_ORDER: ClassVar[str] = ">"

    marker: int = u64(IHDR_MARKER)
    id: int = u32(IHDR_ID)
    version: int = u32(CURRENT_VERSION)
    options: int = u16()
    res1: int = u16()
    res2: int = u32()


@dataclass(frozen=True)
class DomainHeader(Layout):
    """The domain header (16 bytes)."""

    type: int = u32(DomainType.X86_HVM)
    page_shift: int = u16(PAGE_SHIFT)
    res1: int = u16()
    xen_major: int = u32(XEN_VERSION[0])
    xen_minor: int = u32(XEN_VERSION[1])


@dataclass(frozen=True)
class RecordHeader(Layout):
    """A record header (8 bytes): type and unpadded body length."""

    type: int = u32()
    length: int = u32()


# -- record bodies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PageDataHeader(Layout):
    """Head of a PAGE_DATA body; ``count`` u64 pfn entries and the pages follow."""

    count: int = u32()
    res1: int = u32()


@dataclass(frozen=True)
class TscInfo(Layout):
    """X86_TSC_INFO body (24 bytes): XEN_DOMCTL_{get,set}tscinfo."""

    mode: int = u32()
    khz: int = u32()
    nsec: int = u64()
    incarnation: int = u32()
    res1: int = u32()


@dataclass(frozen=True)
class HvmParamsHeader(Layout):
    """Head of an HVM_PARAMS body; ``count`` :class:`HvmParamEntry` follow."""

    count: int = u32()
    res1: int = u32()


@dataclass(frozen=True)
class HvmParamEntry(Layout):
    """One HVM parameter (16 bytes)."""

    index: int = u64()
    value: int = u64()


@dataclass(frozen=True)
class CpuidLeaf(Layout):
    """``xen_cpuid_leaf_t`` (24 bytes), an element of X86_CPUID_POLICY."""

    leaf: int = u32()
    subleaf: int = u32()
    a: int = u32()
    b: int = u32()
    c: int = u32()
    d: int = u32()


#: ``XEN_CPUID_NO_SUBLEAF``.
CPUID_NO_SUBLEAF = 0xFFFF_FFFF


@dataclass(frozen=True)
class MsrPolicyEntry(Layout):
    """``xen_msr_entry_t`` (16 bytes), an element of X86_MSR_POLICY; ``flags`` must be zero."""

    idx: int = u32()
    flags: int = u32()
    val: int = u64()


def padded(length: int) -> int:
    """A body length rounded up to the record alignment."""
    return (length + REC_ALIGN - 1) & ~(REC_ALIGN - 1)
