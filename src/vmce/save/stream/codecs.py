"""Record-body codecs of the libxc stream: PAGE_DATA, X86_TSC_INFO, HVM_PARAMS and the policies.

Encoders take Python values and return the body (or its pieces, for PAGE_DATA, so that pages
are written without being joined); decoders take a body and check it as strictly as Xen's
verifier and C restorer together, raising :class:`~vmce.save.stream.format.RecordError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from vmce.save.layout import Layout
from vmce.save.stream.format import (
    PAGE_SIZE,
    PAGE_TYPE_SHIFT,
    PFN_MASK,
    PFN_RESERVED_MASK,
    REC_LENGTH_MAX,
    CpuidLeaf,
    HvmParamEntry,
    HvmParamsHeader,
    MsrPolicyEntry,
    PageDataHeader,
    PageType,
    RecordError,
    TscInfo,
)

_PFN_ENTRY = 8

# -- PAGE_DATA --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageEntry:
    """One pfn of a PAGE_DATA record; ``data`` is the page for types that carry one."""

    pfn: int
    type: PageType
    data: memoryview | None


#: The most pages of data one PAGE_DATA record can hold within REC_LENGTH_MAX.
MAX_PAGES_PER_RECORD = (REC_LENGTH_MAX - PageDataHeader.size()) // (_PFN_ENTRY + PAGE_SIZE)


def encode_pfn(pfn: int, ptype: PageType) -> int:
    """A pfn entry: the pfn in bits 51:0 and the type in bits 63:60."""
    if not 0 <= pfn <= PFN_MASK:
        raise ValueError(f"pfn {pfn:#x} does not fit in {PFN_MASK.bit_length()} bits")
    return pfn | (int(PageType(ptype)) << PAGE_TYPE_SHIFT)


def decode_pfn(entry: int, index: int) -> tuple[int, PageType]:
    """Split a pfn entry, refusing reserved bits and the reserved types 5-8."""
    if entry & PFN_RESERVED_MASK:
        raise RecordError(f"pfn[{index}] {entry:#018x} has reserved bits 59:52 set")
    raw_type = entry >> PAGE_TYPE_SHIFT
    try:
        ptype = PageType(raw_type)
    except ValueError:
        raise RecordError(f"pfn[{index}] {entry:#018x} has invalid type {raw_type:#x}") from None
    return entry & PFN_MASK, ptype


def encode_page_data(batch: Sequence[tuple[int, PageType, bytes | None]]) -> list[bytes]:
    """The pieces of one PAGE_DATA body: header, pfn array, then one piece per page of data."""
    if not batch:
        raise ValueError("a PAGE_DATA record holds at least one pfn")
    pfns: list[int] = []
    pages: list[bytes] = []
    for pfn, ptype, data in batch:
        pt = PageType(ptype)
        pfns.append(encode_pfn(pfn, pt))
        if pt.has_data:
            if data is None or len(data) != PAGE_SIZE:
                size = "no data" if data is None else f"{len(data)} bytes"
                raise ValueError(f"pfn {pfn:#x} ({pt.name}) needs {PAGE_SIZE} bytes, got {size}")
            pages.append(bytes(data))
        elif data is not None:
            raise ValueError(f"pfn {pfn:#x} ({pt.name}) carries no data")
    header = PageDataHeader(len(pfns)).pack()
    return [header, struct.pack(f"<{len(pfns)}Q", *pfns), *pages]


def decode_page_data(body: memoryview) -> list[PageEntry]:
    """Parse a PAGE_DATA body: count > 0, reserved zero, pfn entries valid, exact length."""
    hsz = PageDataHeader.size()
    if len(body) < hsz:
        raise RecordError(
            f"PAGE_DATA body is {len(body)} bytes, shorter than its {hsz}-byte header"
        )
    head = PageDataHeader.unpack_from(body)
    if head.count == 0:
        raise RecordError("PAGE_DATA count is 0")
    if head.res1:
        raise RecordError(f"PAGE_DATA reserved field is {head.res1:#x}")
    if len(body) < hsz + _PFN_ENTRY * head.count:
        raise RecordError(f"PAGE_DATA length {len(body)} too short for {head.count} pfns")
    raw = struct.unpack_from(f"<{head.count}Q", body, hsz)
    decoded = [decode_pfn(e, i) for i, e in enumerate(raw)]
    nr_pages = sum(1 for _, t in decoded if t.has_data)
    expected = hsz + _PFN_ENTRY * head.count + PAGE_SIZE * nr_pages
    if len(body) != expected:
        raise RecordError(
            f"PAGE_DATA length {len(body)}, expected {hsz} + {_PFN_ENTRY * head.count} "
            f"+ {PAGE_SIZE * nr_pages} for {head.count} pfns with {nr_pages} pages"
        )
    out: list[PageEntry] = []
    off = hsz + _PFN_ENTRY * head.count
    for pfn, ptype in decoded:
        data = None
        if ptype.has_data:
            data = body[off : off + PAGE_SIZE]
            off += PAGE_SIZE
        out.append(PageEntry(pfn, ptype, data))
    return out


# -- fixed and array bodies -------------------------------------------------------------------


def encode_tsc_info(tsc: TscInfo) -> bytes:
    if tsc.res1:
        raise ValueError("X86_TSC_INFO reserved field must be zero")
    return tsc.pack()


def decode_tsc_info(body: memoryview) -> TscInfo:
    if len(body) != TscInfo.size():
        raise RecordError(f"X86_TSC_INFO is {len(body)} bytes, not {TscInfo.size()}")
    tsc = TscInfo.unpack_from(body)
    if tsc.res1:
        raise RecordError(f"X86_TSC_INFO reserved field is {tsc.res1:#x}")
    return tsc


def encode_hvm_params(params: Mapping[int, int]) -> bytes:
    """An HVM_PARAMS body, entries in index order."""
    out = [HvmParamsHeader(len(params)).pack()]
    out += [HvmParamEntry(i, params[i]).pack() for i in sorted(params)]
    return b"".join(out)


def decode_hvm_params(body: memoryview) -> dict[int, int]:
    """Parse HVM_PARAMS; an empty one (count 0) is tolerated as the spec's errata asks."""
    hsz, esz = HvmParamsHeader.size(), HvmParamEntry.size()
    if len(body) < hsz:
        raise RecordError(f"HVM_PARAMS is {len(body)} bytes, shorter than its {hsz}-byte header")
    head = HvmParamsHeader.unpack_from(body)
    if head.res1:
        raise RecordError(f"HVM_PARAMS reserved field is {head.res1:#x}")
    if len(body) != hsz + esz * head.count:
        raise RecordError(
            f"HVM_PARAMS length {len(body)}, expected {hsz + esz * head.count} "
            f"for {head.count} entries"
        )
    out: dict[int, int] = {}
    for i in range(head.count):
        e = HvmParamEntry.unpack_from(body, hsz + esz * i)
        if e.index in out:
            raise RecordError(f"HVM_PARAMS entry {i}: duplicate index {e.index}")
        out[e.index] = e.value
    return out


L = TypeVar("L", bound=Layout)


def encode_array(items: Iterable[Layout], what: str) -> bytes:
    """A non-empty array of fixed-size entries (the policy records)."""
    body = b"".join(i.pack() for i in items)
    if not body:
        raise ValueError(f"{what} must not be empty")
    return body


def decode_array(body: memoryview, cls: type[L], what: str) -> tuple[L, ...]:
    """A non-empty array of ``cls`` entries filling the body exactly."""
    size = cls.size()
    if not body or len(body) % size:
        raise RecordError(f"{what} length {len(body)} is not a non-zero multiple of {size}")
    return tuple(cls.unpack_from(body, off) for off in range(0, len(body), size))


def encode_cpuid_policy(leaves: Sequence[CpuidLeaf]) -> bytes:
    return encode_array(leaves, "X86_CPUID_POLICY")


def decode_cpuid_policy(body: memoryview) -> tuple[CpuidLeaf, ...]:
    return decode_array(body, CpuidLeaf, "X86_CPUID_POLICY")


def encode_msr_policy(entries: Sequence[MsrPolicyEntry]) -> bytes:
    if any(e.flags for e in entries):
        raise ValueError("X86_MSR_POLICY flags are reserved and must be zero")
    return encode_array(entries, "X86_MSR_POLICY")


def decode_msr_policy(body: memoryview) -> tuple[MsrPolicyEntry, ...]:
    entries = decode_array(body, MsrPolicyEntry, "X86_MSR_POLICY")
    for i, e in enumerate(entries):
        if e.flags:
            raise RecordError(f"X86_MSR_POLICY entry {i} (MSR {e.idx:#x}) has flags {e.flags:#x}")
    return entries
