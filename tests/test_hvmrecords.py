"""Xen HVM save records (vmce.save.hvmrecords): sizes, offsets, bit-fields, round trips,
Xen's length rules, and the in-flight vMCE vendor trailer."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmce.save import hvmrecords as hr
from vmce.save.hvmctx import (
    Descriptor,
    Header,
    HvmContext,
    HvmContextError,
    Record,
    TypeCode,
    VmceVcpu,
)
from vmce.save.layout import Layout
from vmce.vmce import BankRecord, Domain, HostProfile

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


def offset_of(cls: type[Layout], name: str) -> int:
    """A field's offset, derived from the declaration."""
    fmt = cls.BYTE_ORDER
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == name:
            return struct.calcsize(fmt)
        fmt += f.metadata["fmt"]
    raise KeyError(name)


# -- sizes and offsets against Xen's public header --------------------------------------------

# Expected sizes are sizeof() of the structures in Xen's
# xen/include/public/arch-x86/hvm/save.h (x86-64, xen-project/xen master, Xen 4.23-unstable),
# read from the header and confirmed by compiling it with gcc.
XEN_SIZES: list[tuple[type[Layout], int]] = [
    (hr.HvmCpu, 1032),  # struct hvm_hw_cpu
    (hr.Pic, 8),  # struct hvm_hw_vpic
    (hr.Ioapic, 400),  # struct hvm_hw_vioapic, VIOAPIC_NUM_PINS = 48
    (hr.Lapic, 32),  # struct hvm_hw_lapic: 28 bytes of fields + 4 of tail padding (Xen >= 4.21)
    (hr.LapicRegs, 1024),  # struct hvm_hw_lapic_regs
    (hr.Pit, 56),  # struct hvm_hw_pit
    (hr.PitChannel, 16),  # struct hvm_hw_pit_channel ("3 x 16 bytes")
    (hr.Mtrr, 240),  # struct hvm_hw_mtrr
    (hr.CpuXsaveFixed, 600),  # struct hvm_hw_cpu_xsave (fixed part, save_area at 24)
    (hr.HvmMsrHeader, 8),  # struct hvm_msr (count + alignment, msr[] at offset 8)
    (hr.HvmOneMsr, 16),  # struct hvm_one_msr
    (hr.TscAdjust, 8),  # struct hvm_tsc_adjust
    (VmceVcpu, 32),  # struct hvm_vmce_vcpu
]


@pytest.mark.parametrize(("cls", "size"), XEN_SIZES, ids=lambda x: getattr(x, "__name__", x))
def test_sizes_match_xen(cls: type[Layout], size: int) -> None:
    assert cls.size() == size


def test_typecodes() -> None:
    # DECLARE_HVM_SAVE_TYPE(...) numbers in save.h.
    expected: dict[type[hr.HvmEntry] | type[hr.CpuXsave] | type[hr.CpuMsrs], int] = {
        hr.HvmCpu: 2,
        hr.Pic: 3,
        hr.Ioapic: 4,
        hr.Lapic: 5,
        hr.LapicRegs: 6,
        hr.Pit: 10,
        hr.Mtrr: 14,
        hr.CpuXsave: 16,
        hr.TscAdjust: 19,
        hr.CpuMsrs: 20,
    }
    for cls, code in expected.items():
        assert code == cls.TYPECODE
        assert hr.DECODERS[code] is cls


def test_compat_cpu_size() -> None:
    # sizeof(struct hvm_hw_cpu_compat) in save.h.
    assert hr.HvmCpu.COMPAT_SIZE == 1016


# offsetof() values from gcc on Xen's header.
XEN_OFFSETS: list[tuple[type[Layout], str, int]] = [
    (hr.HvmCpu, "rax", 512),
    (hr.HvmCpu, "cs_sel", 736),
    (hr.HvmCpu, "cs_limit", 768),
    (hr.HvmCpu, "cs_base", 808),
    (hr.HvmCpu, "cs_arbytes", 888),
    (hr.HvmCpu, "sysenter_cs", 920),
    (hr.HvmCpu, "shadow_gs", 944),
    (hr.HvmCpu, "msr_flags", 952),
    (hr.HvmCpu, "msr_tsc_aux", 1000),
    (hr.HvmCpu, "tsc", 1008),
    (hr.HvmCpu, "pending_event", 1016),
    (hr.HvmCpu, "error_code", 1020),
    (hr.HvmCpu, "flags", 1024),
    (hr.HvmCpu, "pad0", 1028),
    (hr.Lapic, "tdt_msr", 16),
    (hr.Lapic, "pending_esr", 24),
    (hr.Pit, "speaker_data_on", 48),
    (hr.Mtrr, "msr_mtrr_fixed", 136),
    (hr.Mtrr, "msr_mtrr_cap", 224),
    (hr.CpuXsaveFixed, "fpu_sse", 24),
    (hr.CpuXsaveFixed, "xstate_bv", 536),
    (hr.HvmOneMsr, "val", 8),
]


@pytest.mark.parametrize(("cls", "field", "offset"), XEN_OFFSETS)
def test_offsets_match_xen(cls: type[Layout], field: str, offset: int) -> None:
    assert offset_of(cls, field) == offset


def test_layouts_have_no_implicit_padding() -> None:
    # Every declaration uses "<" (no native alignment): the size is the sum of the fields.
    for cls, _ in XEN_SIZES:
        assert cls.struct().format.startswith("<")


# -- bit-fields -------------------------------------------------------------------------------


def test_pending_event_bits_match_gcc_layout() -> None:
    # gcc: pending_vector = 0xff -> 0xff, pending_type = 7 -> 0x700,
    # pending_error_valid -> 0x800, pending_valid -> 0x80000000.
    word = hr.HvmCpu.make_pending_event(0x12, hr.PendingEventType.HW_EXCEPTION, error_valid=True)
    assert word == 0x12 | 0x300 | 0x800 | 0x8000_0000
    cpu = hr.HvmCpu(pending_event=word, error_code=0xE)
    assert (cpu.pending_vector, cpu.pending_type) == (0x12, 3)
    assert cpu.pending_error_valid and cpu.pending_valid
    assert not hr.HvmCpu().pending_valid
    with pytest.raises(ValueError):
        hr.HvmCpu.make_pending_event(256, hr.PendingEventType.NMI)


def test_pic_bitfields_match_gcc_layout() -> None:
    # gcc: init_state -> byte 4 bits 3:0, priority_add -> byte 4 bits 7:4,
    # readsel_isr .. is_master -> byte 5 bits 0..6.
    p = hr.Pic(
        irq_base=0x08,
        init_priority=hr.Pic.make_init_priority(3, 7),
        mode_bits=hr.PicMode.IS_MASTER | hr.PicMode.AUTO_EOI,
    )
    raw = p.pack()
    assert raw[3] == 0x08 and raw[4] == 0x73 and raw[5] == 0x44
    assert (p.init_state, p.priority_add) == (3, 7)
    assert p.mode == hr.PicMode.IS_MASTER | hr.PicMode.AUTO_EOI
    assert (int(hr.PicMode.IS_MASTER), int(hr.PicMode.READSEL_ISR)) == (0x40, 0x01)
    with pytest.raises(ValueError):
        hr.Pic.make_init_priority(16, 0)


# -- round trips ------------------------------------------------------------------------------


def _round_trip(value: hr.HvmEntry, instance: int = 0) -> None:
    rec = value.to_record(instance)
    assert rec.typecode == value.TYPECODE and rec.instance == instance
    assert len(rec.payload) == value.size()
    assert type(value).from_record(rec) == value
    assert hr.decode_record(rec) == value


@settings(max_examples=30)
@given(st.binary(min_size=512, max_size=512), st.lists(u64, min_size=10, max_size=10), u32, u16)
def test_cpu_round_trip(fpu: bytes, regs: list[int], sel: int, vcpu: int) -> None:
    cpu = hr.HvmCpu(
        fpu_regs=fpu,
        rax=regs[0],
        r15=regs[1],
        rip=regs[2],
        cr3=regs[3],
        dr7=regs[4],
        cs_sel=sel,
        gdtr_limit=sel,
        ldtr_base=regs[5],
        msr_efer=regs[6],
        msr_tsc_aux=regs[7],
        tsc=regs[8],
        pending_event=sel,
        error_code=sel,
        pad0=0,
        shadow_gs=regs[9],
    )
    _round_trip(cpu, vcpu)


@settings(max_examples=20)
@given(st.lists(u8, min_size=8, max_size=8), st.sampled_from([0, 1]))
def test_pic_round_trip(fields: list[int], instance: int) -> None:
    _round_trip(hr.Pic(*fields), instance)


@settings(max_examples=20)
@given(st.lists(u64, min_size=48, max_size=48), u64, u32, u32)
def test_ioapic_round_trip(entries: list[int], base: int, sel: int, ident: int) -> None:
    io = hr.Ioapic.build(entries, base_address=base, ioregsel=sel, id=ident)
    assert io.entries == tuple(entries)
    _round_trip(io)


def test_ioapic_needs_48_entries() -> None:
    with pytest.raises(ValueError, match="48"):
        hr.Ioapic.build([0] * 24)


@settings(max_examples=20)
@given(u64, u32, u32, u64, u32, st.binary(min_size=1024, max_size=1024))
def test_lapic_round_trip(base: int, dis: int, div: int, tdt: int, esr: int, page: bytes) -> None:
    _round_trip(hr.Lapic(base, dis, div, tdt, esr), 3)
    _round_trip(hr.LapicRegs(page), 3)


@settings(max_examples=20)
@given(st.lists(st.tuples(u32, u16, *[u8] * 10), min_size=3, max_size=3), u32)
def test_pit_round_trip(chans: list[tuple[int, ...]], speaker: int) -> None:
    channels = [hr.PitChannel(*c) for c in chans]
    pit = hr.Pit.build(channels, speaker_data_on=speaker)
    assert [pit.channel(i) for i in range(3)] == channels
    _round_trip(pit)
    with pytest.raises(IndexError):
        pit.channel(3)
    with pytest.raises(ValueError):
        hr.Pit.build(channels[:2])


@settings(max_examples=20)
@given(u64, st.lists(u64, min_size=16, max_size=16), st.lists(u64, min_size=11, max_size=11))
def test_mtrr_round_trip(pat: int, var: list[int], fixed: list[int]) -> None:
    m = hr.Mtrr.build(pat=pat, var=var, fixed=fixed, cap=0x508, def_type=0xC06)
    assert (m.var, m.fixed) == (tuple(var), tuple(fixed))
    _round_trip(m)
    with pytest.raises(ValueError):
        hr.Mtrr.build(pat=pat, var=var[:8], fixed=fixed, cap=0, def_type=0)


@given(u64, u16)
def test_tsc_adjust_round_trip(adj: int, vcpu: int) -> None:
    _round_trip(hr.TscAdjust(adj), vcpu)


@settings(max_examples=20)
@given(u64, u64, st.binary(max_size=256).map(lambda b: b[: len(b) // 8 * 8]))
def test_xsave_round_trip(xcr0: int, bv: int, extended: bytes) -> None:
    fixed = hr.CpuXsaveFixed(xcr0=xcr0, xcr0_accum=xcr0, xstate_bv=bv, fpu_sse=b"\x7f" * 512)
    x = hr.CpuXsave(fixed, extended)
    rec = x.to_record(2)
    assert rec.typecode == TypeCode.CPU_XSAVE and len(rec.payload) == 600 + len(extended)
    assert hr.CpuXsave.from_record(rec) == x == hr.decode_record(rec)


def test_xsave_rules() -> None:
    short = Record(TypeCode.CPU_XSAVE, 0, bytes(599), offset=0x40)
    with pytest.raises(HvmContextError, match=r"offset 0x40: CPU_XSAVE instance 0: .*599 < 600"):
        hr.CpuXsave.from_record(short)
    compact = hr.CpuXsave(hr.CpuXsaveFixed(xcomp_bv=hr.XSTATE_COMPACTION_ENABLED))
    with pytest.raises(HvmContextError, match="compressed"):
        hr.CpuXsave.from_record(compact.to_record())


@settings(max_examples=20)
@given(st.dictionaries(u32, u64, min_size=1, max_size=8))
def test_msrs_round_trip(msrs: dict[int, int]) -> None:
    m = hr.CpuMsrs.of(msrs)
    rec = m.to_record(1)
    assert len(rec.payload) == 8 + 16 * len(msrs)
    assert hr.CpuMsrs.from_record(rec) == m
    assert dict(hr.CpuMsrs.from_record(rec).msrs) == msrs


def test_msr_rules() -> None:
    good = hr.CpuMsrs.of([(0x48, 1), (0xDA0, 0x100)]).encode()
    with pytest.raises(ValueError, match="at least one"):
        hr.CpuMsrs(()).encode()
    with pytest.raises(ValueError, match="length 8 < 24"):
        hr.CpuMsrs.decode(good[:8])
    with pytest.raises(ValueError, match="!= 40"):
        hr.CpuMsrs.decode(good + bytes(16))
    rsvd = bytearray(good)
    rsvd[8 + 16 + 4] = 1  # msr[1]._rsvd
    with pytest.raises(ValueError, match=r"msr\[1\].*reserved"):
        hr.CpuMsrs.decode(bytes(rsvd))
    padded = bytearray(good)
    padded[4] = 0xAA  # the alignment padding after count: not checked (nor by Xen)
    assert hr.CpuMsrs.decode(bytes(padded)) == hr.CpuMsrs.decode(good)


# -- Xen's length rules -----------------------------------------------------------------------


def test_exact_length_types_refuse_other_lengths() -> None:
    for cls in (hr.Pic, hr.Ioapic, hr.LapicRegs, hr.Pit, hr.Mtrr, hr.TscAdjust):
        payload = cls().pack()
        for bad in (payload[:-1], payload + b"\0"):
            rec = Record(cls.TYPECODE, 0, bad, offset=0x20)
            with pytest.raises(HvmContextError, match=r"offset 0x20: .*exactly"):
                cls.from_record(rec)


def test_lapic_zero_extends_like_xen() -> None:
    old = hr.Lapic(0xFEE00900, 0, 3, 77, 0).pack()[:24]  # before pending_esr was added
    assert hr.Lapic.from_record(Record(TypeCode.LAPIC, 0, old)) == hr.Lapic(0xFEE00900, 0, 3, 77)
    with pytest.raises(HvmContextError, match="at most 32"):
        hr.Lapic.from_record(Record(TypeCode.LAPIC, 0, bytes(33)))


def test_cpu_compat_form_converts_like_xen() -> None:
    cpu = hr.HvmCpu(rip=0x1234, msr_efer=0x501, tsc=99, pending_event=0x8000_0302, error_code=7)
    native = cpu.pack()
    compat = native[:1000] + native[1008:1024]  # no msr_tsc_aux, flags, pad0
    assert len(compat) == hr.HvmCpu.COMPAT_SIZE
    got = hr.HvmCpu.from_record(Record(TypeCode.CPU, 0, compat))
    assert got == dataclasses.replace(cpu, msr_tsc_aux=0, flags=hr.CpuFlag.FPU_INITIALISED)
    with pytest.raises(HvmContextError):
        hr.HvmCpu.from_record(Record(TypeCode.CPU, 0, native[:1020]))


def test_wrong_typecode_refused() -> None:
    with pytest.raises(HvmContextError, match="is not PIT"):
        hr.Pit.from_record(hr.Pic().to_record())
    with pytest.raises(HvmContextError, match="is not CPU_MSR"):
        hr.CpuMsrs.from_record(hr.Pic().to_record())
    with pytest.raises(HvmContextError, match="no decoder"):
        hr.decode_record(Record(TypeCode.RTC, 0, bytes(24)))


# -- whole contexts and the vendor trailer ----------------------------------------------------


def sample_context() -> HvmContext:
    ctx = HvmContext(Header(cpuid=0x50654, gtsc_khz=2_000_000))
    ctx.records += [
        hr.HvmCpu(rip=0xFFF0).to_record(0),
        hr.HvmCpu(rip=0xFFF0).to_record(1),
        hr.Pic(mode_bits=hr.PicMode.IS_MASTER).to_record(0),
        hr.Pic().to_record(1),
        hr.Ioapic().to_record(),
        hr.Lapic(apic_base_msr=0xFEE00900).to_record(0),
        hr.LapicRegs().to_record(0),
        hr.Pit().to_record(),
        Record(TypeCode.RTC, 0, bytes(24)),  # not decoded by vmce: passes through
        hr.Mtrr().to_record(0),
        hr.CpuXsave(hr.CpuXsaveFixed(xcr0=3, xcr0_accum=3)).to_record(0),
        Record(TypeCode.VMCE_VCPU, 0, VmceVcpu(0x1000C02).pack()),
        hr.TscAdjust(5).to_record(0),
        hr.CpuMsrs.of({0x48: 1}).to_record(0),
    ]
    return ctx


def records_of(ctx: HvmContext) -> list[tuple[int, int, bytes]]:
    return [(r.typecode, r.instance, r.payload) for r in ctx.records]


def test_context_without_inflight_is_exactly_xens_blob() -> None:
    ctx = sample_context()
    blob = hr.encode_context(ctx, {})
    assert blob == ctx.encode() == hr.encode_context(ctx)
    back, inflight = hr.decode_context(blob)
    assert records_of(back) == records_of(ctx) and inflight == {}


def test_validate_context_refuses_bad_and_duplicate_entries() -> None:
    ctx = sample_context()
    ctx.records.append(Record(TypeCode.PIT, 1, bytes(55)))
    with pytest.raises(HvmContextError, match=r"offset 0x[0-9a-f]+: PIT instance 1: .*55"):
        hr.decode_context(ctx.encode())
    ctx = sample_context()
    ctx.records.append(hr.Pic().to_record(1))
    with pytest.raises(HvmContextError, match="PIC instance 1: duplicate"):
        hr.decode_context(ctx.encode())


inflight_values = st.builds(
    hr.VmceInflight,
    mcg_status=u64,
    bank0_status=u64,
    bank1_status=u64,
    bank1_addr=u64,
    bank1_misc=u64,
    mce_pending=st.sampled_from([0, 1]),
)


@settings(max_examples=30)
@given(st.dictionaries(u16, inflight_values, min_size=1, max_size=4))
def test_trailer_round_trip(inflight: dict[int, hr.VmceInflight]) -> None:
    ctx = sample_context()
    blob = hr.encode_context(ctx, inflight)
    xen, trailer = hr.split_blob(blob)
    # What Xen's hvm_load sees ends at the first END: exactly Xen's own blob.
    assert xen == ctx.encode() and trailer
    assert records_of(HvmContext.decode(xen)) == records_of(ctx)
    back, got = hr.decode_context(blob)
    assert got == inflight and records_of(back) == records_of(ctx)


def test_trailer_layout() -> None:
    t = hr.encode_trailer({2: hr.VmceInflight(mcg_status=5, mce_pending=1)})
    assert t[:8] == Descriptor(0x8000, 0, 8).pack()
    assert t[8:16] == b"VMCE" + struct.pack("<I", 1)
    assert t[16:24] == Descriptor(0x8001, 2, 64).pack()
    assert struct.unpack_from("<Q", t, 24)[0] == 5
    assert t[-8:] == bytes(8)
    assert len(t) == 8 + 8 + 8 + 64 + 8
    assert min(hr.VendorTypeCode) > 34  # beyond HVM_SAVE_CODE_MAX and Amazon's 22-34


def _trailer_cases() -> list[tuple[str, bytes, str]]:
    hdr = Descriptor(0x8000, 0, 8).pack() + hr.VendorHeader().pack()
    ent = Descriptor(0x8001, 0, 64).pack() + hr.VmceInflight(mcg_status=5).pack()
    end = bytes(8)
    bad_pending = Descriptor(0x8001, 0, 64).pack() + hr.VmceInflight(mce_pending=2).pack()
    bad_rsvd = Descriptor(0x8001, 0, 64).pack() + hr.VmceInflight(rsvd=1).pack()
    return [
        ("no header", ent + end, "must start with VENDOR_HEADER"),
        (
            "bad magic",
            Descriptor(0x8000, 0, 8).pack() + hr.VendorHeader(magic=1).pack() + end,
            "magic",
        ),
        (
            "bad version",
            Descriptor(0x8000, 0, 8).pack() + hr.VendorHeader(version=2).pack() + end,
            "version 2",
        ),
        ("unknown entry", hdr + Descriptor(0x8002, 0, 8).pack() + bytes(8) + end, "0x8002"),
        ("short entry", hdr + Descriptor(0x8001, 0, 8).pack() + bytes(8) + end, "64-byte"),
        ("duplicate", hdr + ent + ent + end, "duplicate"),
        ("no END", hdr + ent, "no END"),
        ("after END", hdr + ent + end + b"x", "1 bytes after END"),
        ("non-empty END", hdr + ent + Descriptor(0, 0, 8).pack() + bytes(8), "END must be"),
        ("past the end", hdr + Descriptor(0x8001, 0, 64).pack() + bytes(8), "past the end"),
        ("header only", hdr + end, "no entries"),
        ("END only", end, "must start with VENDOR_HEADER"),
        ("pending", hdr + bad_pending + end, "mce_pending is 2"),
        ("reserved", hdr + bad_rsvd + end, "reserved"),
    ]


@pytest.mark.parametrize(("trailer", "message"), [c[1:] for c in _trailer_cases()])
def test_bad_trailers_refused(trailer: bytes, message: str) -> None:
    xen = sample_context().encode()
    with pytest.raises(HvmContextError, match=message) as e:
        hr.decode_context(xen + trailer)
    assert "offset 0x" in str(e.value)


def test_trailer_refuses_out_of_range_vcpu_and_bad_values() -> None:
    with pytest.raises(ValueError, match="instance"):
        hr.encode_trailer({70000: hr.VmceInflight(mcg_status=1)})
    with pytest.raises(ValueError, match="mce_pending"):
        hr.encode_trailer({0: hr.VmceInflight(mce_pending=3)})


def test_inflight_from_a_delivered_vmce() -> None:
    dom = Domain(HostProfile.intel(), nr_vcpus=3)
    assert hr.inflight_from_snapshots(dom.snapshot()) == {}
    # Broadcast: the error on vCPU0, MCIP|RIPV on the others, #MC pending everywhere.
    dom.deliver(BankRecord(0xBD000000000000C0, addr=0x6000000, misc=0x86), gstatus=0x5)
    got = hr.inflight_from_snapshots(dom.snapshot())
    assert list(got) == [0, 1, 2]
    v = got[0]
    assert v.mcg_status == 0x5 and v.mce_pending == 1
    assert (v.bank1_status, v.bank1_addr, v.bank1_misc) == (0xBD000000000000C0, 0x6000000, 0x86)
    assert got[2] == hr.VmceInflight(mcg_status=0x5, mce_pending=1)  # MCIP | RIPV
    assert not v.idle and hr.VmceInflight().idle
