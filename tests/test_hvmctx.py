"""HVM context blobs and VMCE_VCPU restore (reference section 6.2-6.7)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmce.save.hvmctx import (
    HVM_FILE_MAGIC,
    Descriptor,
    Header,
    HvmContext,
    HvmContextError,
    Record,
    TypeCode,
    VmceVcpu,
)
from vmce.vmce import Domain, HostProfile, RestoreError, VmceSave

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
INTEL = HostProfile.intel()
AMD = HostProfile.amd()


def test_layout_sizes_derive_from_declarations() -> None:
    assert Descriptor.size() == 8
    assert Header.size() == 24
    assert VmceVcpu.size() == 32
    assert Header.struct().format == "<IIQII"


def blob(*records: tuple[int, int, bytes], header: Header | None = None, end: bool = True) -> bytes:
    h = header or Header(cpuid=0x50654, gtsc_khz=2_000_000)
    out = Descriptor(1, 0, 24).pack() + h.pack()
    for t, inst, payload in records:
        out += Descriptor(t, inst, len(payload)).pack() + payload
    if end:
        out += Descriptor(0, 0, 0).pack()
    return out


def vmce(caps: int, ctl2_0: int = 0, ctl2_1: int = 0, ext: int = 0, size: int = 32) -> bytes:
    return struct.pack("<QQQQ", caps, ctl2_0, ctl2_1, ext)[:size]


def test_round_trip_from_domain() -> None:
    d = Domain(INTEL, 3)
    d.wrmsr(2, 0x281, 0x40000005)
    data = HvmContext.from_domain(d, cpuid=0x406F1, gtsc_khz=1234).encode()
    ctx = HvmContext.decode(data)
    assert ctx.header.magic == HVM_FILE_MAGIC and ctx.header.gtsc_khz == 1234
    assert [(r.typecode, r.instance, len(r.payload)) for r in ctx.records] == [
        (18, 0, 32),
        (18, 1, 32),
        (18, 2, 32),
    ]
    saves = ctx.vmce_saves()
    assert saves[2] == VmceSave(0x1000C02, 0, 0x40000005, 0)
    assert ctx.encode() == data


@pytest.mark.parametrize("size", [8, 24, 32])
def test_old_record_sizes_zero_extend(size: int) -> None:
    """Seed point 3: guests saved by older versions still restore."""
    data = blob((18, 0, vmce(0x1000C02, 7, 9, 1, size)))
    d = Domain(HostProfile.intel(lmce=True), 1)
    d.vcpus[0].banks[0].ctl2 = 0x55
    HvmContext.decode(data).apply_vmce(d)
    v = d.vcpus[0]
    assert v.mcg_cap == 0x1000C02
    assert v.banks[0].ctl2 == (7 if size >= 24 else 0)
    assert v.banks[1].ctl2 == (9 if size >= 24 else 0)
    assert v.mcg_ext_ctl == (1 if size == 32 else 0)


def test_zero_byte_record_gives_zero_banks() -> None:
    d = Domain(INTEL, 1)
    HvmContext.decode(blob((18, 0, b""))).apply_vmce(d)
    assert d.vcpus[0].mcg_cap == 0 and d.rdmsr(0, 0x400) == 0


def test_33_byte_record_refused() -> None:
    ctx = HvmContext.decode(blob((18, 0, b"\0" * 33)))
    with pytest.raises(HvmContextError, match="length 33 exceeds 32"):
        ctx.apply_vmce(Domain(INTEL, 1))


# -- the cross-version matrix (6.7) --------------------------------------------------------

MATRIX = [
    # (saved caps, host, accepted)
    (0x1000802, INTEL, True),  # Xen 4.2, either vendor
    (0x1000802, AMD, False),  # Xen 4.2 AMD guest on >= 4.3 AMD
    (0x1000C02, INTEL, True),
    (0x1000C02, AMD, False),  # Intel guest on AMD
    (0x9000C02, INTEL, True),  # LMCE_P accepted on any Intel host
    (0x9000C02, AMD, False),
    (0x2, AMD, True),
    (0x2, INTEL, True),
    (0x1000116, INTEL, True),  # SLES11 SP2: 22 banks + CTL_P, host-derived
    (0x1FF, AMD, True),  # count and CTL_P always accepted
    (0x1000A02, INTEL, False),  # EXT_P is never accepted
    (0x10000002, INTEL, False),  # reserved bit 28
]


@pytest.mark.parametrize(("caps", "host", "ok"), MATRIX)
def test_cross_version_matrix(caps: int, host: HostProfile, ok: bool) -> None:
    d = Domain(host, 2)
    data = blob((18, 0, vmce(caps, size=8)), (18, 1, vmce(caps, size=8)))
    ctx = HvmContext.decode(data)
    if ok:
        ctx.apply_vmce(d)
        assert all(v.mcg_cap == caps for v in d.vcpus)
    else:
        before = d.snapshot()
        with pytest.raises(HvmContextError, match="unsupported MCA capabilities"):
            ctx.apply_vmce(d)
        assert d.snapshot() == before  # nothing applied


def test_restore_message_is_xens() -> None:
    d = Domain(AMD, 1, domid=5)
    with pytest.raises(RestoreError) as e:
        d.restore({0: VmceSave(0x1000C02)})
    assert str(e.value) == (
        "HVM restore: unsupported MCA capabilities 0x1000c02 for d5v0 (supported: 0)"
    )
    d2 = Domain(INTEL, 1, domid=5)
    with pytest.raises(RestoreError, match=r"\(supported: 0x9000c00\)"):
        d2.restore({0: VmceSave(0x1000A02)})


def test_partial_restore_never_applied() -> None:
    d = Domain(INTEL, 2)
    good, bad = vmce(0x1000C02, 1, 2), vmce(0x1000A02)
    with pytest.raises(HvmContextError):
        HvmContext.decode(blob((18, 0, good), (18, 1, bad))).apply_vmce(d)
    assert d.vcpus[0].banks[0].ctl2 == 0


def test_restore_keeps_runtime_state() -> None:
    d = Domain(INTEL, 1)
    d.vcpus[0].mcg_status = 0x5
    d.restore({0: VmceSave(0x1000C02, 1, 2, 0)})
    assert d.vcpus[0].mcg_status == 0x5  # not part of the save


def test_ext_ctl_restored_unvalidated() -> None:
    d = Domain(INTEL, 1)
    d.restore({0: VmceSave(0x1000C02, mcg_ext_ctl=1)})  # without LMCE_P (pitfall 7)
    assert d.vcpus[0].mcg_ext_ctl == 1
    assert d.rdmsr(0, 0x4D0) is None
    assert d.lmce_target_ok(0)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"\x01\x00", "too short"),
        (Descriptor(2, 0, 24).pack() + Header().pack(), "first record must be HEADER"),
        (Descriptor(1, 0, 16).pack() + b"\0" * 16, "first record must be HEADER"),
        (Descriptor(1, 0, 24).pack() + b"\0" * 10, "HEADER payload truncated"),
        (blob(header=Header(magic=0x12345678)), "bad magic 0x12345678"),
        (blob(header=Header(version=2)), "unsupported version 2"),
        (blob(end=False), "did not end with an END record"),
        (blob((18, 0, vmce(2)))[:-12], "runs past the end"),
        (blob((21, 0, b"x")), "unexpected typecode 21"),
        (blob((1, 0, b"\0" * 24)), "unexpected typecode 1"),
        (blob() + b"junk", "4 bytes after END"),
        (blob()[:-8] + Descriptor(0, 0, 4).pack(), "END must have"),
    ],
)
def test_bad_blobs(data: bytes, message: str) -> None:
    with pytest.raises(HvmContextError, match=message):
        HvmContext.decode(data)


def test_errors_name_offset_and_record() -> None:
    data = blob((18, 0, vmce(2)), (18, 9, vmce(2)))
    with pytest.raises(HvmContextError) as e:
        HvmContext.decode(data).apply_vmce(Domain(INTEL, 4))
    assert str(e.value) == (
        "offset 0x48: record 2 (VMCE_VCPU instance 9): instance beyond the domain's 4 vCPUs"
    )


def test_duplicate_vcpu_record_refused() -> None:
    data = blob((18, 1, vmce(2)), (18, 1, vmce(2)))
    with pytest.raises(HvmContextError, match="duplicate record for vCPU 1"):
        HvmContext.decode(data).vmce_saves()


@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_reader(data: bytes) -> None:
    with contextlib.suppress(HvmContextError):
        HvmContext.decode(data).vmce_saves()


@given(
    st.lists(
        st.tuples(st.integers(2, 20), st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=8
    ),
    u64,
    u64,
)
def test_blob_round_trip(recs: list[tuple[int, int, bytes]], cs: int, cpuid: int) -> None:
    ctx = HvmContext(
        Header(changeset=cs, cpuid=cpuid & 0xFFFFFFFF), [Record(t, i, p) for t, i, p in recs]
    )
    back = HvmContext.decode(ctx.encode())
    assert back.header == ctx.header
    assert [(r.typecode, r.instance, r.payload) for r in back.records] == recs


@given(u64, u64, u64, u64)
def test_vmce_vcpu_round_trip(a: int, b: int, c: int, d: int) -> None:
    rec = VmceVcpu(a, b, c, d)
    assert VmceVcpu.from_payload(rec.pack()) == rec
    assert VmceVcpu.from_save(rec.to_save()) == rec


def test_typecode_names() -> None:
    assert Record(TypeCode.VMCE_VCPU, 0, b"").name == "VMCE_VCPU"
    assert Record(99, 0, b"").name == "type99"
