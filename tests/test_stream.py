"""The libxc migration stream v2/v3 (vmce.save.stream): layouts, round trips, the strict
reader's refusals (each naming record index, type and offset), and a bounded mutation fuzz."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmce.save import hvmrecords as hr
from vmce.save.hvmctx import Header, HvmContext, Record, TypeCode, VmceVcpu
from vmce.save.layout import Layout
from vmce.save.stream import (
    MAX_PAGES_PER_RECORD,
    REC_LENGTH_MAX,
    CpuidLeaf,
    DomainHeader,
    HvmParamEntry,
    HvmParamsHeader,
    ImageHeader,
    MsrPolicyEntry,
    PageDataHeader,
    PageType,
    RecordError,
    RecordHeader,
    RecordType,
    Stream,
    StreamContents,
    StreamError,
    StreamReader,
    StreamWriter,
    TscInfo,
    inspect_stream,
    read_stream,
    write_stream,
)
from vmce.save.stream.codecs import (
    decode_cpuid_policy,
    decode_hvm_params,
    decode_msr_policy,
    decode_page_data,
    decode_tsc_info,
    encode_cpuid_policy,
    encode_hvm_params,
    encode_msr_policy,
    encode_page_data,
    encode_tsc_info,
)
from vmce.save.stream.format import CPUID_NO_SUBLEAF

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
HEADERS = 24 + 16

# -- layouts ----------------------------------------------------------------------------------

# Sizes from Xen's tools/libs/guest/xg_sr_stream_format.h and xen/include/public/arch-x86/xen.h
# (xen_cpuid_leaf_t, xen_msr_entry_t); the same numbers tools/python/xen/migration/tests.py
# asserts for the Python verifier's formats.
STREAM_SIZES: list[tuple[type[Layout], int]] = [
    (ImageHeader, 24),  # struct xc_sr_ihdr
    (DomainHeader, 16),  # struct xc_sr_dhdr
    (RecordHeader, 8),  # struct xc_sr_rhdr
    (PageDataHeader, 8),  # struct xc_sr_rec_page_data_header
    (TscInfo, 24),  # struct xc_sr_rec_x86_tsc_info
    (HvmParamsHeader, 8),  # struct xc_sr_rec_hvm_params
    (HvmParamEntry, 16),  # struct xc_sr_rec_hvm_params_entry
    (CpuidLeaf, 24),  # xen_cpuid_leaf_t
    (MsrPolicyEntry, 16),  # xen_msr_entry_t
    (hr.VmceInflight, 64),  # vmce's own vendor entry: 7 u64 + 2 u32
]


@pytest.mark.parametrize(("cls", "size"), STREAM_SIZES, ids=lambda x: getattr(x, "__name__", x))
def test_layout_sizes(cls: type[Layout], size: int) -> None:
    assert cls.size() == size


def test_image_header_is_big_endian() -> None:
    raw = ImageHeader().pack()
    assert raw == b"\xff" * 8 + b"XENF" + b"\0\0\0\x03" + bytes(8)
    assert DomainHeader().pack() == struct.pack("<IHHII", 2, 12, 0, 4, 21)


def test_record_type_table() -> None:
    # REC_TYPE_* in xg_sr_stream_format.h: every number 0x00-0x12 is named.
    assert sorted(int(t) for t in RecordType) == list(range(0x13))
    assert (int(RecordType.STATIC_DATA_END), int(RecordType.X86_MSR_POLICY)) == (0x10, 0x12)
    assert {t for t in PageType if t.has_data} == set(PageType) - {
        PageType.BROKEN,
        PageType.XALLOC,
        PageType.XTAB,
    }
    assert [int(t) for t in PageType] == [0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15]


def test_max_batch_fits_a_record() -> None:
    def size(n: int) -> int:
        return 8 + n * (8 + 4096)

    assert size(MAX_PAGES_PER_RECORD) <= REC_LENGTH_MAX < size(MAX_PAGES_PER_RECORD + 1)


# -- body codecs ------------------------------------------------------------------------------


def page(n: int) -> bytes:
    return struct.pack("<I", n) * 1024


@settings(max_examples=40)
@given(
    st.lists(
        st.tuples(st.integers(0, (1 << 52) - 1), st.sampled_from(list(PageType))),
        min_size=1,
        max_size=12,
    )
)
def test_page_data_round_trip(entries: list[tuple[int, PageType]]) -> None:
    batch = [(pfn, t, page(pfn & 0xFFFF) if t.has_data else None) for pfn, t in entries]
    body = memoryview(b"".join(encode_page_data(batch)))
    got = decode_page_data(body)
    assert [(e.pfn, e.type, None if e.data is None else bytes(e.data)) for e in got] == batch


@given(u32, u32, u64, u32)
def test_tsc_round_trip(mode: int, khz: int, nsec: int, inc: int) -> None:
    tsc = TscInfo(mode, khz, nsec, inc)
    assert decode_tsc_info(memoryview(encode_tsc_info(tsc))) == tsc


@given(st.dictionaries(u64, u64, max_size=20))
def test_params_round_trip(params: dict[int, int]) -> None:
    body = encode_hvm_params(params)
    assert len(body) == 8 + 16 * len(params)
    assert decode_hvm_params(memoryview(body)) == params


@given(st.lists(st.builds(CpuidLeaf, u32, u32, u32, u32, u32, u32), min_size=1, max_size=8))
def test_cpuid_policy_round_trip(leaves: list[CpuidLeaf]) -> None:
    assert decode_cpuid_policy(memoryview(encode_cpuid_policy(leaves))) == tuple(leaves)


@given(st.lists(st.builds(MsrPolicyEntry, u32, st.just(0), u64), min_size=1, max_size=8))
def test_msr_policy_round_trip(entries: list[MsrPolicyEntry]) -> None:
    assert decode_msr_policy(memoryview(encode_msr_policy(entries))) == tuple(entries)


def test_encoders_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="at least one"):
        encode_page_data([])
    with pytest.raises(ValueError, match="needs 4096"):
        encode_page_data([(1, PageType.NOTAB, b"x")])
    with pytest.raises(ValueError, match="needs 4096"):
        encode_page_data([(1, PageType.L1TAB_PIN, None)])
    with pytest.raises(ValueError, match="carries no data"):
        encode_page_data([(1, PageType.XTAB, page(0))])
    with pytest.raises(ValueError, match="does not fit"):
        encode_page_data([(1 << 52, PageType.NOTAB, page(0))])
    with pytest.raises(ValueError):
        encode_page_data([(1, 6, page(0))])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="reserved"):
        encode_tsc_info(TscInfo(res1=1))
    with pytest.raises(ValueError, match="empty"):
        encode_cpuid_policy([])
    with pytest.raises(ValueError, match="flags"):
        encode_msr_policy([MsrPolicyEntry(0x10, 1, 0)])


# -- whole streams ----------------------------------------------------------------------------


def sample_context(nr_vcpus: int = 2) -> HvmContext:
    ctx = HvmContext(Header(cpuid=0x50654, gtsc_khz=2_000_000))
    for v in range(nr_vcpus):
        ctx.records.append(hr.HvmCpu(rip=0xFFF0, cs_sel=0xF000, cs_base=0xFFFF0000).to_record(v))
    ctx.records += [hr.Pic(mode_bits=hr.PicMode.IS_MASTER).to_record(0), hr.Pic().to_record(1)]
    ctx.records += [hr.Ioapic().to_record()]
    for v in range(nr_vcpus):
        ctx.records += [hr.Lapic(apic_base_msr=0xFEE00900).to_record(v)]
        ctx.records += [hr.LapicRegs(bytes(range(256)) * 4).to_record(v)]
    ctx.records += [hr.Pit().to_record()]
    for v in range(nr_vcpus):
        ctx.records += [
            hr.Mtrr().to_record(v),
            hr.CpuXsave(hr.CpuXsaveFixed(xcr0=7, xcr0_accum=7), bytes(256)).to_record(v),
            Record(TypeCode.VMCE_VCPU, v, VmceVcpu(0x1000C02, 0, 0x40000005).pack()),
            hr.TscAdjust(v).to_record(v),
            hr.CpuMsrs.of({0x48: 1}).to_record(v),
        ]
    return ctx


def records_of(ctx: HvmContext) -> list[tuple[int, int, bytes]]:
    return [(r.typecode, r.instance, r.payload) for r in ctx.records]


CPUID = [CpuidLeaf(0, CPUID_NO_SUBLEAF, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69)]
MSRS = [MsrPolicyEntry(0xCE, 0, 0x80000000)]
TSC = TscInfo(mode=0, khz=2_000_000, nsec=123_456_789, incarnation=1)
PARAMS = {38: 1, 2: 0xFEFFF, 1: 0xFEFFE}
INFLIGHT = {1: hr.VmceInflight(mcg_status=5, bank1_status=0xBD00_0000_0000_00C0, mce_pending=1)}


def guest_pages(n: int) -> Iterator[tuple[int, PageType, bytes | None]]:
    """n RAM pages, then a broken page, a hole and an allocate-only pfn."""
    for pfn in range(n):
        yield pfn, PageType.NOTAB, page(pfn * 7 + 1)
    yield n, PageType.BROKEN, None
    yield n + 1, PageType.XTAB, None
    yield n + 2, PageType.XALLOC, None


def write(version: int = 3, *, nr_pages: int = 64, **kw: object) -> tuple[bytes, Stream]:
    f = io.BytesIO()
    args: dict[str, object] = dict(
        pages=guest_pages(nr_pages),
        tsc_info=TSC,
        hvm_params=PARAMS,
        hvm_context=sample_context(),
        version=version,
        batch_size=16,
    )
    if version == 3:
        args.update(cpuid_policy=CPUID, msr_policy=MSRS)
    args.update(kw)
    summary = write_stream(f, **args)  # type: ignore[arg-type]
    return f.getvalue(), summary


@dataclass
class Sink:
    """A page sink that keeps copies."""

    pages: dict[int, tuple[PageType, bytes | None]]

    def __call__(self, pfn: int, ptype: PageType, data: memoryview | None) -> None:
        self.pages[pfn] = (ptype, None if data is None else bytes(data))


def read(data: bytes, **kw: object) -> tuple[StreamContents, Sink]:
    sink = Sink({})
    return read_stream(io.BytesIO(data), page_sink=sink, **kw), sink  # type: ignore[arg-type]


def test_64_page_hvm_stream_round_trip() -> None:
    data, written = write(vmce_inflight=INFLIGHT)
    got, sink = read(data, max_pfn=66)
    assert sink.pages == {pfn: (t, d) for pfn, t, d in guest_pages(64)}
    c = got
    assert c.pfns == 67 and c.pages == 64
    assert c.tsc_info == TSC and c.hvm_params == PARAMS
    assert records_of(c.hvm_context) == records_of(sample_context())
    assert c.hvm_context.header == sample_context().header
    assert c.vmce_inflight == INFLIGHT
    assert c.cpuid_policy == tuple(CPUID) and c.msr_policy == tuple(MSRS)
    shape = [(r.index, r.type, r.offset, r.length) for r in c.stream.records]
    assert shape == [(r.index, r.type, r.offset, r.length) for r in written.records]
    types = [r.type for r in written.records]
    assert types == [0x11, 0x12, 0x10] + [1] * 5 + [0x08, 0x0A, 0x09, 0x00]
    assert written.size == len(data) == c.stream.size
    # Re-writing what was read gives the same bytes.
    again, _ = write(
        pages=((p, t, d) for p, (t, d) in sorted(sink.pages.items())),
        hvm_context=c.hvm_context,
        vmce_inflight=c.vmce_inflight,
    )
    assert again == data


def test_version_2_round_trip() -> None:
    data, written = write(version=2, nr_pages=5)
    assert data[12:16] == b"\0\0\0\x02"
    got, sink = read(data)
    assert len(sink.pages) == 8 and got.cpuid_policy is None
    assert [r.type for r in written.records] == [1, 8, 10, 9, 0]


def test_quiet_guest_context_is_xens_own_blob() -> None:
    data, _ = write(nr_pages=1)
    got, _ = read(data)
    assert got.vmce_inflight == {}
    assert sample_context().encode() in data


def test_describe_and_inspect() -> None:
    data, _ = write(nr_pages=3, vmce_inflight=INFLIGHT)
    s = inspect_stream(io.BytesIO(data))
    lines = s.describe()
    assert lines[0].startswith("libxc stream version 3, little endian")
    assert lines[1] == "domain: X86_HVM, page_shift 12, Xen 4.21"
    assert any("PAGE_DATA" in ln and "6 pfns, 3 pages" in ln for ln in lines)
    assert any("in-flight vMCE on 1 vCPUs" in ln for ln in lines)


class WriteOnly:
    """A non-seekable sink (like a pipe)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, b: bytes) -> int:
        self.chunks.append(bytes(b))
        return len(b)


class Trickle(io.RawIOBase):
    """A source that returns at most 5 bytes per read (like a socket)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = 5 if n < 0 else min(n, 5)
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(out)
        return out


def test_streams_through_pipes_and_short_reads() -> None:
    out = WriteOnly()
    write_stream(
        out,  # type: ignore[arg-type]
        pages=guest_pages(3),
        tsc_info=TSC,
        hvm_params={},
        hvm_context=sample_context(1),
    )
    data = b"".join(out.chunks)
    sink = Sink({})
    got = read_stream(Trickle(data), page_sink=sink)  # type: ignore[arg-type]
    assert len(sink.pages) == 6 and got.hvm_params == {}
    assert [r.type for r in got.stream.records] == [0x10, 1, 8, 9, 0]  # no empty HVM_PARAMS


def test_pages_are_written_in_batches_lazily() -> None:
    produced: list[int] = []

    def pages() -> Iterator[tuple[int, PageType, bytes | None]]:
        for pfn in range(2500):
            produced.append(pfn)
            yield pfn, PageType.XTAB if pfn % 2 else PageType.NOTAB, None if pfn % 2 else page(1)

    w = StreamWriter(io.BytesIO())
    w.write_headers()
    w.write_static_data_end()
    assert w.write_pages(pages()) == 2500
    counts = [r.note for r in w.summary().records[1:]]
    assert counts == ["1024 pfns, 512 pages", "1024 pfns, 512 pages", "452 pfns, 226 pages"]


def test_optional_records_are_skipped_with_a_note() -> None:
    f = io.BytesIO()
    w = StreamWriter(f)
    w.write_headers()
    w.write_static_data_end()
    w.write_record(0x8000_0001, [b"hello"])
    w.write_hvm_context(hr.encode_context(sample_context(1)))
    w.write_end()
    s = inspect_stream(io.BytesIO(f.getvalue()))
    assert s.records[1].note == "optional record skipped" and s.records[1].length == 5


def test_writer_refuses_misuse() -> None:
    w = StreamWriter(io.BytesIO(), version=2)
    with pytest.raises(ValueError, match="write_headers"):
        w.write_static_data_end()
    w.write_headers()
    with pytest.raises(ValueError, match="already"):
        w.write_headers()
    with pytest.raises(RecordError, match="version 2"):
        w.write_static_data_end()
    with pytest.raises(RecordError, match="version 2"):
        w.write_cpuid_policy(CPUID)
    with pytest.raises(RecordError, match="without an HVM_CONTEXT"):
        w.write_end()
    with pytest.raises(ValueError, match="batch_size"):
        w.write_pages([], batch_size=0)
    with pytest.raises(ValueError, match="at most"):
        w.write_page_batch([(0, PageType.XTAB, None)] * (MAX_PAGES_PER_RECORD + 1))
    with pytest.raises(ValueError, match="24 bytes"):
        w.write_record(RecordType.X86_TSC_INFO, [bytes(16)])
    with pytest.raises(ValueError, match="empty"):
        w.write_hvm_context(b"")
    with pytest.raises(ValueError, match="exceeds"):
        w.write_record(RecordType.HVM_CONTEXT, [bytes(REC_LENGTH_MAX), b"x"])
    w.write_hvm_context(hr.encode_context(sample_context(1)))
    w.write_end()
    with pytest.raises(RecordError, match="after END"):
        w.write_end()
    with pytest.raises(ValueError, match="version"):
        StreamWriter(io.BytesIO(), version=4)
    with pytest.raises(RecordError, match="version 2"):
        write(version=2, cpuid_policy=CPUID)


# -- the bad-input suite ----------------------------------------------------------------------


def rec(rtype: int, body: bytes = b"", *, pad: bytes | None = None) -> bytes:
    padding = pad if pad is not None else bytes(-len(body) % 8)
    return RecordHeader(rtype, len(body)).pack() + body + padding


def pd_raw(count: int, entries: list[int], nr_pages: int, res1: int = 0) -> bytes:
    body = struct.pack("<II", count, res1) + struct.pack(f"<{len(entries)}Q", *entries)
    return rec(RecordType.PAGE_DATA, body + page(0) * nr_pages)


CTX_BODY = hr.encode_context(sample_context(1))
GOOD_PD = rec(
    RecordType.PAGE_DATA,
    b"".join(encode_page_data([(0, PageType.NOTAB, page(1)), (2, PageType.XTAB, None)])),
)


def base(version: int = 3) -> list[bytes]:
    """A valid record list (indices for v3: 0 CPUID, 1 MSR, 2 SDE, 3 PAGE_DATA, 4 TSC,
    5 HVM_PARAMS, 6 HVM_CONTEXT, 7 END)."""
    out: list[bytes] = []
    if version == 3:
        out += [
            rec(RecordType.X86_CPUID_POLICY, encode_cpuid_policy(CPUID)),
            rec(RecordType.X86_MSR_POLICY, encode_msr_policy(MSRS)),
            rec(RecordType.STATIC_DATA_END),
        ]
    out += [
        GOOD_PD,
        rec(RecordType.X86_TSC_INFO, TSC.pack()),
        rec(RecordType.HVM_PARAMS, encode_hvm_params({38: 1})),
        rec(RecordType.HVM_CONTEXT, CTX_BODY),
        rec(RecordType.END),
    ]
    return out


def assemble(records: list[bytes], version: int = 3) -> bytes:
    return ImageHeader(version=version).pack() + DomainHeader().pack() + b"".join(records)


def offset(records: list[bytes], index: int) -> int:
    return HEADERS + sum(len(r) for r in records[:index])


def test_base_streams_are_valid() -> None:
    for v in (2, 3):
        _, sink = read(assemble(base(v), v))
        assert len(sink.pages) == 2


@dataclass(frozen=True)
class Bad:
    """A malformed stream and where the reader must point."""

    name: str
    data: bytes
    index: int
    rtype: int | None
    offset: int
    message: str
    max_pfn: int | None = None


def replaced(i: int, new: bytes, version: int = 3) -> tuple[bytes, int]:
    r = base(version)
    r[i] = new
    return assemble(r, version), offset(r, i)


def inserted(i: int, new: bytes, version: int = 3) -> tuple[bytes, int]:
    r = base(version)
    r.insert(i, new)
    return assemble(r, version), offset(r, i)


def _truncation_cases() -> list[Bad]:
    r = base()
    full = assemble(r)
    end = offset(r, 7)
    return [
        Bad("no END", assemble(r[:-1]), 7, None, end, "stream ends without an END record"),
        Bad("short header", full[: end + 5], 7, None, end, "truncated record header (5 of 8"),
        Bad("short body", full[: offset(r, 6) + 30], 6, 9, offset(r, 6), "truncated: the body"),
        Bad("data after END", full + bytes(8), 8, None, len(full), "data after the END record"),
        Bad("one byte after END", full + b"\x01", 8, None, len(full), "data after the END"),
    ]


def _framing_cases() -> list[Bad]:
    out: list[Bad] = []

    def add(name: str, made: tuple[bytes, int], i: int, t: int | None, msg: str) -> None:
        out.append(Bad(name, made[0], i, t, made[1], msg))

    huge = RecordHeader(RecordType.PAGE_DATA, REC_LENGTH_MAX + 1).pack()
    add("END length 8", replaced(7, rec(0, bytes(8))), 7, 0, "length 8, a END record is 0")
    add("SDE length", replaced(2, rec(0x10, bytes(8))), 2, 0x10, "length 8, a STATIC_DATA_END")
    add("TSC length", replaced(4, rec(8, bytes(16))), 4, 8, "length 16, a X86_TSC_INFO record")
    add("over 128 MiB", replaced(3, huge), 3, 1, "exceeds the maximum 0x8000000 (128 MiB)")
    add(
        "padding",
        inserted(3, rec(0x8000_0001, b"abcde", pad=b"\0\1\0")),
        3,
        0x8000_0001,
        "non-zero padding",
    )
    add("mandatory 0x13", inserted(3, rec(0x13)), 3, 0x13, "unknown mandatory record type 0x13")
    add("mandatory max", inserted(3, rec(0x7FFF_FFFF)), 3, 0x7FFF_FFFF, "unknown mandatory")
    return out


def _page_data_cases() -> list[Bad]:
    out: list[Bad] = []

    def add(name: str, new: bytes, msg: str) -> None:
        data, off = replaced(3, new)
        out.append(Bad(name, data, 3, 1, off, msg))

    add("count 0", pd_raw(0, [], 0), "PAGE_DATA count is 0")
    add("count 0 with data", pd_raw(0, [0], 1), "PAGE_DATA count is 0")
    add("short header", rec(1, b"\1\0\0\0"), "shorter than its 8-byte header")
    add("reserved", pd_raw(1, [0], 1, res1=7), "reserved field is 0x7")
    add("too few pfns", pd_raw(5, [0], 0), "too short for 5 pfns")
    add("extra page", pd_raw(1, [0], 2), "expected 8 + 8 + 4096")
    add("missing page", pd_raw(2, [0, 1], 1), "expected 8 + 16 + 8192")
    add("data for XTAB", pd_raw(1, [0xF << 60], 1), "expected 8 + 8 + 0")
    add("reserved pfn bits", pd_raw(1, [1 << 52], 1), "pfn[0] 0x0010000000000000 has reserved")
    add("reserved pfn bit 59", pd_raw(2, [0, 1 << 59], 2), "pfn[1] 0x0800000000000000 has reserved")
    for t in (5, 6, 7, 8):
        add(f"type {t}", pd_raw(1, [(t << 60) | 3], 1), f"pfn[0] {t << 60 | 3:#018x} has invalid")
    data, off = replaced(3, pd_raw(2, [0, 2], 2))
    out.append(Bad("beyond max_pfn", data, 3, 1, off, "pfn[1] 0x2 is beyond", max_pfn=1))
    return out


def _order_cases() -> list[Bad]:
    out: list[Bad] = []

    def case(name: str, records: list[bytes], i: int, t: int, msg: str, v: int = 3) -> None:
        out.append(Bad(name, assemble(records, v), i, t, offset(records, i), msg))

    b = base()
    case("v2 SDE", [rec(0x10), *base(2)], 0, 0x10, "STATIC_DATA_END in a version 2 stream", 2)
    case("v2 CPUID", [b[0], *base(2)], 0, 0x11, "X86_CPUID_POLICY in a version 2 stream", 2)
    case("v2 MSR", [b[1], *base(2)], 0, 0x12, "X86_MSR_POLICY in a version 2 stream", 2)
    swapped = [*b[:5], b[6], b[5], b[7]]
    case("params after context", swapped, 6, 0x0A, "HVM_PARAMS after HVM_CONTEXT: the stream spec")
    case("dup TSC", [*b[:5], b[4], *b[5:]], 5, 8, "duplicate X86_TSC_INFO record")
    case("dup params", [*b[:6], b[5], *b[6:]], 6, 0x0A, "duplicate HVM_PARAMS record")
    case("dup context", [*b[:7], b[6], *b[7:]], 7, 9, "duplicate HVM_CONTEXT record")
    case("dup SDE", [*b[:3], b[2], *b[3:]], 3, 0x10, "duplicate STATIC_DATA_END record")
    case("dup CPUID", [*b[:1], b[0], *b[1:]], 1, 0x11, "duplicate X86_CPUID_POLICY record")
    case("pages before SDE", [b[0], b[1], b[3], b[2], *b[4:]], 2, 1, "PAGE_DATA before STATIC_DATA")
    case("TSC before SDE", [b[0], b[1], b[4], b[2], b[3], *b[5:]], 2, 8, "X86_TSC_INFO before")
    case("CPUID after SDE", [b[1], b[2], b[0], *b[3:]], 2, 0x11, "X86_CPUID_POLICY after STATIC")
    case("END without context", [*b[:6], b[7]], 6, 0, "END without an HVM_CONTEXT record")
    case("END without SDE", [b[0], b[7]], 1, 0, "END without STATIC_DATA_END")
    refused = {
        0x02: "x86 PV record",
        0x05: "x86 PV record",
        0x07: "x86 PV record",
        0x0B: "deprecated TOOLSTACK",
        0x0D: "VERIFY",
        0x0E: "checkpointed",
        0x0F: "COLO back channel",
    }
    for t, msg in refused.items():
        case(f"refused {t:#x}", [*b[:4], rec(t, bytes(8)), *b[4:]], 4, t, msg)
    return out


def _body_cases() -> list[Bad]:
    out: list[Bad] = []

    def add(name: str, i: int, t: int, body: bytes, msg: str) -> None:
        data, off = replaced(i, rec(t, body))
        out.append(Bad(name, data, i, t, off, msg))

    params = encode_hvm_params({38: 1, 2: 5})
    add("params reserved", 5, 0x0A, struct.pack("<II", 1, 9) + params[8:24], "reserved field")
    add("params short", 5, 0x0A, b"\0\0\0\0", "shorter than its 8-byte header")
    add("params length", 5, 0x0A, params[:-16], "HVM_PARAMS length 24, expected 40")
    dup = struct.pack("<II", 2, 0) + HvmParamEntry(38, 1).pack() * 2
    add("params dup index", 5, 0x0A, dup, "entry 1: duplicate index 38")
    add("TSC reserved", 4, 8, TscInfo(res1=3).pack(), "X86_TSC_INFO reserved field is 0x3")
    add("CPUID length", 0, 0x11, bytes(20), "length 20 is not a non-zero multiple of 24")
    add("CPUID empty", 0, 0x11, b"", "length 0 is not a non-zero multiple of 24")
    add("MSR length", 1, 0x12, bytes(24), "length 24 is not a non-zero multiple of 16")
    add("MSR flags", 1, 0x12, MsrPolicyEntry(0xCE, 2, 0).pack(), "(MSR 0xce) has flags 0x2")
    add("context empty", 6, 9, b"", "HVM context blob: offset 0x0")
    bad_magic = bytearray(CTX_BODY)
    bad_magic[8] ^= 1
    add("context magic", 6, 9, bytes(bad_magic), "HVM context blob: offset 0x8: bad magic")
    add("context no END", 6, 9, CTX_BODY[:-8], "did not end with an END")
    trailer = hr.encode_trailer(INFLIGHT)
    add("trailer garbage", 6, 9, CTX_BODY + trailer[:-8] + b"x" * 8, "vendor entry runs past")
    bad_cpu = bytearray(CTX_BODY)
    struct.pack_into("<I", bad_cpu, 32 + 4, 1000)  # the first CPU record's length
    add("context bad CPU", 6, 9, bytes(bad_cpu), "HVM context blob")
    return out


BAD = _truncation_cases() + _framing_cases() + _page_data_cases() + _order_cases() + _body_cases()


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_bad_streams_are_refused_naming_the_place(bad: Bad) -> None:
    sink = Sink({})
    with pytest.raises(StreamError) as info:
        read_stream(io.BytesIO(bad.data), page_sink=sink, max_pfn=bad.max_pfn)
    e = info.value
    text = str(e)
    assert bad.message in text
    assert (e.index, e.rtype, e.offset) == (bad.index, bad.rtype, bad.offset)
    assert text.startswith(f"record {bad.index} ")
    assert f"at offset {bad.offset:#x}" in text
    if bad.rtype is not None:
        assert f"type {bad.rtype:#x}" in text
    if bad.max_pfn is not None:
        assert sink.pages == {}  # nothing of the offending record reached the sink


def _header_cases() -> list[tuple[str, bytes, int, str]]:
    img, dom, rest = ImageHeader(), DomainHeader(), b"".join(base())

    def i(**kw: int) -> bytes:
        return ImageHeader(**kw).pack() + dom.pack() + rest

    def d(**kw: int) -> bytes:
        return img.pack() + DomainHeader(**kw).pack() + rest

    return [
        ("empty", b"", 0, "image header at offset 0x0: truncated (0 of 24 bytes)"),
        ("short image", img.pack()[:20], 0, "truncated (20 of 24 bytes)"),
        ("legacy marker", i(marker=(1 << 64) - 2), 0, "marker 0xfffffffffffffffe is not all"),
        ("id", i(id=0x58454E47), 0, "id 0x58454e47, expected 0x58454e46"),
        ("version 1", i(version=1), 0, "version 1, expected one of (2, 3)"),
        ("version 4", i(version=4), 0, "version 4"),
        ("big endian", i(options=1), 0, "big-endian stream"),
        ("option bits", i(options=0x8000), 0, "reserved option bits 0x8000"),
        ("res1", i(res1=1), 0, "reserved fields 0x0001:0x00000000"),
        ("res2", i(res2=1), 0, "reserved fields 0x0000:0x00000001"),
        ("short domain", img.pack() + dom.pack()[:10], 24, "domain header at offset 0x18: trunc"),
        ("PV", d(type=1), 24, "domain header at offset 0x18: x86 PV stream"),
        ("type 3", d(type=3), 24, "unknown domain type 0x3"),
        ("type 0", d(type=0), 24, "unknown domain type 0x0"),
        ("page_shift", d(page_shift=13), 24, "page_shift 13, expected 12"),
        ("domain res1", d(res1=2), 24, "reserved field 0x0002"),
    ]


@pytest.mark.parametrize(("data", "off", "message"), [c[1:] for c in _header_cases()])
def test_bad_headers_are_refused(data: bytes, off: int, message: str) -> None:
    with pytest.raises(StreamError) as info:
        inspect_stream(io.BytesIO(data))
    assert message in str(info.value)
    assert (info.value.index, info.value.offset) == (None, off)


def test_legacy_converted_domain_header_is_accepted() -> None:
    data = ImageHeader().pack() + DomainHeader(xen_major=0, xen_minor=1).pack()
    s = inspect_stream(io.BytesIO(data + b"".join(base())))
    assert "legacy converted" in s.describe()[1]


def test_libxc_order_accepted_on_request() -> None:
    b = base(2)  # PAGE_DATA, TSC, HVM_PARAMS, HVM_CONTEXT, END
    libxc_order = assemble([b[0], b[1], b[3], b[2], b[4]], 2)  # as libxc's saver writes it
    with pytest.raises(StreamError, match="HVM_PARAMS after HVM_CONTEXT"):
        read(libxc_order)
    got, _ = read(libxc_order, allow_context_before_params=True)
    assert got.hvm_params == {38: 1}


def test_empty_params_record_is_tolerated() -> None:
    data, _ = replaced(5, rec(0x0A, struct.pack("<II", 0, 0)))
    got, _ = read(data)
    assert got.hvm_params == {}
    assert "errata" in got.stream.records[5].note


def test_reader_summary_needs_headers() -> None:
    with pytest.raises(ValueError):
        StreamReader(io.BytesIO(b"")).summary()


def test_sink_exceptions_pass_through() -> None:
    def sink(pfn: int, ptype: PageType, data: memoryview | None) -> None:
        raise KeyError(pfn)

    with pytest.raises(KeyError):
        read_stream(io.BytesIO(assemble(base())), page_sink=sink)


# -- bounded fuzz -----------------------------------------------------------------------------


def _fuzz_base() -> tuple[bytes, list[int]]:
    records = base()
    records.insert(4, rec(0x8000_0002, b"opt"))
    records[7] = rec(RecordType.HVM_CONTEXT, hr.encode_context(sample_context(1), INFLIGHT))
    data = assemble(records)
    # Offsets of the structural bytes (everything but page contents), to aim mutations at.
    page_start = offset(records, 3) + 8 + 8 + 16
    structural = [o for o in range(len(data)) if not page_start <= o < page_start + 4096]
    return data, structural


FUZZ_BASE, FUZZ_SPOTS = _fuzz_base()
spots = st.one_of(st.integers(0, len(FUZZ_BASE) - 1), st.sampled_from(FUZZ_SPOTS))
Mutation = Callable[[bytes], bytes]


def _flip(pos: int, bit: int) -> Mutation:
    def flip(d: bytes) -> bytes:
        if not d:
            return d
        p = pos % len(d)
        return d[:p] + bytes([d[p] ^ (1 << bit)]) + d[p + 1 :]

    return flip


def _set(pos: int, value: bytes) -> Mutation:
    return lambda d: d[:pos] + value + d[pos + len(value) :]


mutations = st.one_of(
    st.builds(_flip, spots, st.integers(0, 7)),
    st.builds(lambda p: lambda d: d[:p], spots),
    st.builds(lambda p, b: lambda d: d[:p] + b + d[p:], spots, st.binary(min_size=1, max_size=16)),
    st.builds(lambda p, n: lambda d: d[:p] + d[p + n :], spots, st.integers(1, 64)),
    st.builds(_set, spots, st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x13", b"\x80"])),
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(mutations, min_size=1, max_size=3))
def test_fuzzed_streams_are_read_or_refused_with_stream_error(muts: list[Mutation]) -> None:
    data = FUZZ_BASE
    for m in muts:
        data = m(data)
    try:
        read_stream(io.BytesIO(data), page_sink=lambda p, t, d: None, max_pfn=1 << 20)
    except StreamError as e:
        assert str(e).startswith(("record ", "image header", "domain header"))
        assert e.offset <= len(data)
