"""Whole-VM streams without KVM: the page layout, the KVM <-> Xen record mapping round trip,
the cross-version matrix of VMCE_VCPU, the bad-input suite and a bounded fuzz test.

The streams come from :mod:`persistsynth`: a plausible captured machine written by the real
saver (:func:`vmce.kvm.persist.save.write_image_stream`), so everything but KVM itself is real.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persistsynth import HEADERS, Rec, Synth, edit_context, find, join, make_synth, split
from vmce.kvm.abi import MpState
from vmce.kvm.persist import describe, index_stream, plan_restore
from vmce.kvm.persist.image import VmImage
from vmce.kvm.persist.pages import (
    MAX_PAGES_PER_RECORD,
    PAGE_RECORD_HEAD,
    plan_batches,
)
from vmce.kvm.persist.vendor import VmConfigEntry
from vmce.kvm.vstate import MachineState, VcpuState
from vmce.save import hvmrecords as hr
from vmce.save.hvmctx import Descriptor, HvmContext, TypeCode
from vmce.save.stream import RecordType, StreamError, inspect_stream, read_stream
from vmce.vmce import Domain, HostProfile, VmceSave

INTEL, AMD, INTEL_LMCE = HostProfile.intel(), HostProfile.amd(), HostProfile.intel(lmce=True)


@pytest.fixture
def stream(tmp_path: Path) -> Callable[..., tuple[Path, bytes, Synth]]:
    def make(*, vmce_size: int = 32, **kw: object) -> tuple[Path, bytes, Synth]:
        s = make_synth(**kw)  # type: ignore[arg-type]
        path = tmp_path / f"vm{len(list(tmp_path.iterdir()))}.xen"
        return path, s.write(path, vmce_size=vmce_size), s

    return make


def restore_plan(path: Path, profile: HostProfile | None = None) -> VmImage:
    return plan_restore(path, profile=profile)[1]


# -- page layout ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(5, 2048).map(lambda x: x * 8), st.integers(1, 400_000))
def test_plan_puts_every_record_but_the_last_on_page_boundaries(start: int, npfns: int) -> None:
    plan = plan_batches(start, npfns)
    assert plan.total == npfns and all(1 <= c <= MAX_PAGES_PER_RECORD for c in plan.counts)
    offset, unaligned = start, 0
    for i, count in enumerate(plan.counts):
        pages_at = offset + PAGE_RECORD_HEAD + 8 * count
        if pages_at % 4096:
            unaligned += count
            assert i == len(plan.counts) - 1 or plan.unaligned == npfns
        offset = pages_at + 4096 * count
    assert unaligned <= plan.unaligned
    if npfns >= 512 * 300:
        assert plan.unaligned < 64  # a 1 GiB guest copies a handful of pages at most


def test_pages_are_mappable_from_the_file(stream: Callable[..., tuple[Path, bytes, Synth]]) -> None:
    path, data, _ = stream(pages=4096)
    with open(path, "rb") as f:
        index = index_stream(f.fileno())
    aligned = sum(r.count for r in index.runs if r.aligned)
    assert aligned >= 4096 - 511 and sum(r.count for r in index.runs) == 4096
    for run in index.runs:  # each run's file bytes are the guest's pages
        for k in (0, run.count - 1):
            off = run.offset + k * 4096
            assert data[off : off + 8] == struct.pack("<Q", 0xC0DE0000 + run.pfn + k)


# -- the mapping round trip -------------------------------------------------------------------


def same_vcpu(a: VcpuState, b: VcpuState) -> None:
    for name in ("regs", "sregs", "xsave", "xcrs", "debugregs", "events"):
        assert getattr(a, name).to_bytes() == getattr(b, name).to_bytes(), name
    assert a.mp_state == b.mp_state and a.halted == b.halted and a.tsc_khz == b.tsc_khz
    assert {k: v for k, v in b.msrs.items() if v or k in a.msrs} == a.msrs | {
        k: v for k, v in b.msrs.items() if k not in a.msrs and v
    }
    assert all(b.msrs[k] == v for k, v in a.msrs.items())
    assert (a.lapic is None) == (b.lapic is None)
    if a.lapic is not None and b.lapic is not None:
        assert a.lapic.to_bytes() == b.lapic.to_bytes()


def same_machine(a: MachineState, b: MachineState) -> None:
    for x, y in zip(a.vcpus, b.vcpus, strict=True):
        same_vcpu(x, y)
    pa, pb = a.platform, b.platform
    assert pa.clock.clock == pb.clock.clock
    for name in ("pic_master", "pic_slave", "ioapic", "pit"):
        x, y = getattr(pa, name), getattr(pb, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.to_bytes() == y.to_bytes(), name
    assert a.serial == b.serial


@pytest.mark.parametrize(
    "kw",
    [{}, {"irqchip": True}, {"irqchip": True, "pit": True}, {"vcpus": 1}, {"broken": (2, 3, 9)}],
    ids=["plain", "irqchip", "irqchip+pit", "one-vcpu", "broken-pages"],
)
def test_round_trip(
    stream: Callable[..., tuple[Path, bytes, Synth]], kw: dict[str, object]
) -> None:
    path, _, s = stream(**kw)
    image = restore_plan(path)
    same_machine(s.state, image.machine)
    assert image.config == VmConfigEntry.of(
        vcpus=s.config.vcpus,
        memory_size=s.config.memory_size,
        irqchip=s.state.platform.irqchip,
        pit=s.state.platform.has_pit,
        profile=INTEL,
        policy=s.config.policy,
        domid=1,
        host_mfn_base=s.config.host_mfn_base,
    )
    assert image.cpu == s.config.guest_cpu()
    assert image.broken == frozenset(kw.get("broken", ()))  # type: ignore[arg-type]
    assert image.vmce == {i: s.domain.save_vcpu(i) for i in range(s.config.vcpus)}


def test_xen_sees_its_own_records(stream: Callable[..., tuple[Path, bytes, Synth]]) -> None:
    _, data, _ = stream(irqchip=True, pit=True)
    _, recs = split(data)
    assert [r.type for r in recs] == [
        RecordType.X86_CPUID_POLICY,
        RecordType.X86_MSR_POLICY,
        RecordType.STATIC_DATA_END,
        RecordType.PAGE_DATA,
        RecordType.X86_TSC_INFO,
        RecordType.HVM_PARAMS,
        RecordType.HVM_CONTEXT,
        RecordType.END,
    ]
    blob = recs[find(recs, RecordType.HVM_CONTEXT)].body
    xen, trailer = hr.split_blob(blob)
    ctx = HvmContext.decode(xen)  # exactly what Xen's hvm_load would read
    keys = [(r.typecode, r.instance) for r in ctx.records]
    assert keys == sorted(keys)
    assert {TypeCode(t).name for t, _ in keys} == {
        "CPU", "PIC", "IOAPIC", "LAPIC", "LAPIC_REGS", "PIT", "MTRR", "CPU_XSAVE", "VMCE_VCPU",
        "TSC_ADJUST", "CPU_MSR",
    }  # fmt: skip
    assert all(len(r.payload) == 32 for r in ctx.records if r.typecode == TypeCode.VMCE_VCPU)
    cpu = hr.HvmCpu.from_record(ctx.records[0])
    assert (cpu.rip, cpu.rax, cpu.shadow_gs, cpu.msr_lstar) == (
        0x100000,
        7,
        0x1234_0000,
        0xFFFF_8000_0000_1000,
    )
    assert trailer.startswith(Descriptor(0x8000, 0, 8).pack() + b"VMCE")
    # The generic reader and inspector take vmce's streams as they are.
    assert read_stream(io.BytesIO(data), page_sink=lambda *a: None).stream.size == len(data)
    assert inspect_stream(io.BytesIO(data)).size == len(data)


def test_inspect_report_names_each_vcpus_vmce(
    stream: Callable[..., tuple[Path, bytes, Synth]],
) -> None:
    path, _, _ = stream()
    with open(path, "rb") as f:
        text = "\n".join(describe(index_stream(f.fileno())).lines())
    assert "machine: 2 vCPUs, 64 KiB RAM, no irqchip" in text
    assert "VMCE_VCPU v3 (Xen 4.10): MCG_CAP 0x1000c02 (SER_P|TES_P|CMCI_P COUNT=0x02)" in text
    assert "vendor trailer: VM_CONFIG x1, KVM_VCPU x2" in text


def test_inflight_vmce_travels(stream: Callable[..., tuple[Path, bytes, Synth]]) -> None:
    s = make_synth()
    s.domain.fill(hr_record(), 0x5)
    s.domain.vcpus[0].mce_pending = True
    path = Path(stream()[0]).with_name("inflight.xen")
    s.write(path)
    image = restore_plan(path)
    assert image.inflight[0] == hr.VmceInflight(
        mcg_status=5, bank1_status=0xBD000000000000C0, bank1_addr=0x3000000, bank1_misc=0x86,
        mce_pending=1,
    )  # fmt: skip
    assert image.inflight[1] == hr.VmceInflight(mcg_status=0x5)  # MCIP | RIPV, no data


def hr_record() -> object:
    from vmce.vmce import BankRecord

    return BankRecord(0xBD000000000000C0, 0x3000000, 0x86)


# -- the cross-version matrix (seed point 3) --------------------------------------------------

XEN42_CAPS = 0x01000802  # TES_P | SER_P | 2, what Xen 4.2.0 wrote for both vendors
OLD_HOST_CAPS = 0x0100_0109  # host-derived (pre-4.2): SER_P | CTL_P | 9 banks


@pytest.mark.parametrize("size", [8, 24, 32])
@pytest.mark.parametrize(
    ("source", "caps", "dest", "refused"),
    [
        (INTEL, None, INTEL, None),
        (INTEL, None, INTEL_LMCE, None),
        (INTEL, None, AMD, "unsupported MCA capabilities 0x1000c02 for d1v0 (supported: 0)"),
        (AMD, None, INTEL, None),
        (AMD, None, AMD, None),
        (INTEL, XEN42_CAPS, INTEL, None),
        (INTEL, XEN42_CAPS, AMD, "unsupported MCA capabilities 0x1000802 for d1v0"),
        (INTEL, OLD_HOST_CAPS, INTEL, None),
        (INTEL, OLD_HOST_CAPS, AMD, "unsupported MCA capabilities 0x1000109"),
        (INTEL_LMCE, 0x09000C02, INTEL, None),
        (INTEL_LMCE, 0x09000C02, AMD, "unsupported MCA capabilities 0x9000c02"),
    ],
)
def test_cross_version_matrix(
    tmp_path: Path,
    size: int,
    source: HostProfile,
    caps: int | None,
    dest: HostProfile,
    refused: str | None,
) -> None:
    s = make_synth(profile=source)
    if source.is_intel:
        for v in s.domain.vcpus:
            v.banks[0].ctl2, v.banks[1].ctl2 = 0x40000001, 0x40000002
    if caps is not None:
        s.domain.restore({i: VmceSave(caps, 0x40000001, 0x40000002, 1) for i in (0, 1)})
    path = tmp_path / "v.xen"
    s.write(path, vmce_size=size)
    if refused is not None:
        with pytest.raises(StreamError, match="HVM_CONTEXT") as e:
            restore_plan(path, dest)
        assert "HVM restore: " + refused in str(e.value)
        return
    image = restore_plan(path, dest)
    saved = {i: s.domain.save_vcpu(i) for i in (0, 1)}
    for i, got in image.vmce.items():
        want = saved[i]
        assert got.caps == want.caps  # a guest saved with 9 banks keeps them
        ctl2 = (want.mci_ctl2_bank0, want.mci_ctl2_bank1) if size >= 24 else (0, 0)
        assert (got.mci_ctl2_bank0, got.mci_ctl2_bank1) == ctl2  # zero-extended
        assert got.mcg_ext_ctl == (want.mcg_ext_ctl if size == 32 else 0)
    # Applied to the restoring host's model, the guest sees its old MCG_CAP and bank count.
    dom = Domain(dest, 2)
    dom.restore(image.vmce)
    assert dom.rdmsr(0, 0x179) == (caps if caps is not None else source.default_mcg_cap)
    if caps == OLD_HOST_CAPS:
        assert dom.rdmsr(0, 0x400 + 4 * 8) == (1 << 64) - 1  # bank 8 CTL: in range, all ones
        assert dom.rdmsr(0, 0x17B) == (1 << 64) - 1  # MCG_CTL exists: CTL_P was saved


def test_mca_cap_param_needs_lmce_on_the_host(tmp_path: Path) -> None:
    s = make_synth(profile=INTEL_LMCE)
    assert s.domain.set_mca_cap(1) == 0
    path = tmp_path / "lmce.xen"
    s.write(path)
    assert restore_plan(path).mca_cap == 1
    with pytest.raises(StreamError, match=r"HVM_PARAMS.*MCA_CAP 0x1 refused"):
        restore_plan(path, INTEL)


# -- bad input ---------------------------------------------------------------------------------


def _set(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw) :]


def _recs(fn: Callable[[list[Rec]], None]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        head, recs = split(data)
        fn(recs)
        return join(head, recs)

    return mutate


def _page_pfn(data: bytes, value: int) -> bytes:
    head, recs = split(data)
    i = find(recs, RecordType.PAGE_DATA)
    body = bytearray(recs[i].body)
    body[8:16] = struct.pack("<Q", value)
    recs[i] = Rec(recs[i].type, bytes(body))
    return join(head, recs)


def _ctx_record(typecode: int, instance: int, payload: bytes) -> Callable[[bytes], bytes]:
    def fn(blob: bytes) -> bytes:
        xen, trailer = hr.split_blob(blob)
        extra = Descriptor(typecode, instance, len(payload)).pack() + payload
        return xen[:-8] + extra + xen[-8:] + trailer

    return lambda data: edit_context(data, fn)


def _drop_vendor(code: int) -> Callable[[bytes], bytes]:
    def fn(blob: bytes) -> bytes:
        ctx, inflight, vendor = hr.decode_context_full(blob)
        return hr.encode_context(ctx, inflight, [r for r in vendor if r.typecode != code])

    return lambda data: edit_context(data, fn)


def _end_offset(data: bytes) -> int:
    return len(data) - 8


BAD: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty file", lambda d: b"", "image header at offset 0x0: truncated (0 of 24 bytes)"),
    ("wrong marker", lambda d: _set(d, 0, b"\0" * 8), "marker 0x0000000000000000 is not all ones"),
    ("wrong id", lambda d: _set(d, 8, b"XENG"), "id 0x58454e47, expected 0x58454e46"),
    ("version 1", lambda d: _set(d, 12, struct.pack(">I", 1)), "version 1, expected one of"),
    ("version 4", lambda d: _set(d, 12, struct.pack(">I", 4)), "version 4"),
    ("big endian", lambda d: _set(d, 16, b"\0\x01"), "big-endian stream"),
    ("PV domain", lambda d: _set(d, 24, struct.pack("<I", 1)), "x86 PV stream"),
    ("page shift", lambda d: _set(d, 28, struct.pack("<H", 13)), "page_shift 13"),
    ("cut in a header", lambda d: d[: HEADERS + 4], "record 0 at offset 0x28: truncated record"),
    ("cut in PAGE_DATA", lambda d: d[:5000], "record 3 (PAGE_DATA, type 0x1)"),
    ("no END", lambda d: d[:-8], "stream ends without an END record"),
    ("data after END", lambda d: d + bytes(8), "data after the END record"),
    (
        "TSC_INFO length",
        _recs(lambda r: r.__setitem__(find(r, RecordType.X86_TSC_INFO), Rec(8, bytes(16)))),
        "X86_TSC_INFO, type 0x8) at offset",
    ),
    (
        "bad padding",
        lambda d: d[:-8] + Rec(0x8000_0001, b"abc").pack(pad=b"\0\0\0\0\x01") + d[-8:],
        "non-zero padding after the body",
    ),
    ("pfn beyond RAM", lambda d: _page_pfn(d, 0x40), "pfn[0] 0x40 is beyond the guest's max_pfn"),
    ("pfn reserved bits", lambda d: _page_pfn(d, 1 << 55), "reserved bits 59:52 set"),
    ("pfn type 5", lambda d: _page_pfn(d, 5 << 60), "invalid type 0x5"),
    ("pfn sent twice", lambda d: _page_pfn(d, 1), "pfn[1] 0x1 was already sent"),
    (
        "PAGE_DATA count 0",
        _recs(lambda r: r.__setitem__(find(r, RecordType.PAGE_DATA), Rec(1, bytes(8)))),
        "PAGE_DATA count is 0",
    ),
    (
        "duplicate TSC_INFO",
        _recs(lambda r: r.insert(find(r, RecordType.X86_TSC_INFO), r[find(r, 8)])),
        "duplicate X86_TSC_INFO record",
    ),
    (
        "params after context",
        _recs(lambda r: r.insert(-1, r.pop(find(r, RecordType.HVM_PARAMS)))),
        "HVM_PARAMS after HVM_CONTEXT",
    ),
    (
        "policy after static end",
        _recs(lambda r: r.insert(3, r.pop(0))),
        "X86_CPUID_POLICY after STATIC_DATA_END",
    ),
    (
        "unknown mandatory type",
        _recs(lambda r: r.insert(4, Rec(0x13, b""))),
        "unknown mandatory record type 0x13",
    ),
    (
        "VMCE_VCPU of 40 bytes",
        _ctx_record(TypeCode.VMCE_VCPU, 3, bytes(40)),
        "VMCE_VCPU instance 3: VMCE_VCPU is 40 bytes, at most 32 allowed",
    ),
    ("RTC record", _ctx_record(TypeCode.RTC, 0, bytes(16)), "RTC instance 0: no equivalent"),
    (
        "CPU of vCPU 5",
        _ctx_record(TypeCode.TSC_ADJUST, 5, bytes(8)),
        "TSC_ADJUST instance 5: the VM has 2 vCPUs",
    ),
    ("no VM_CONFIG", _drop_vendor(0x8100), "no vmce VM_CONFIG entry"),
    ("no KVM_VCPU", _drop_vendor(0x8101), "KVM_VCPU or KVM_PLATFORM entries missing"),
    (
        "HVM context garbage",
        lambda d: edit_context(d, lambda b: b[:-8] + b"\xff" * 8),
        "HVM context blob",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_streams_are_refused_naming_record_and_offset(
    stream: Callable[..., tuple[Path, bytes, Synth]],
    mutate: Callable[[bytes], bytes],
    message: str,
) -> None:
    path, data, _ = stream()
    path.write_bytes(mutate(data))
    with pytest.raises(StreamError) as e:
        restore_plan(path)
    text = str(e.value)
    assert message in text
    assert "offset 0x" in text


def test_optional_unknown_records_are_skipped(
    stream: Callable[..., tuple[Path, bytes, Synth]],
) -> None:
    path, data, _ = stream()
    path.write_bytes(_recs(lambda r: r.insert(4, Rec(0x8000_0001, b"vendor!")))(data))
    index, _ = plan_restore(path)
    assert index.stream.records[4].note == "optional record skipped"


def vmce_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmce.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", [["stream", "inspect"], ["restore"]])
def test_cli_refuses_bad_streams_in_one_line(
    stream: Callable[..., tuple[Path, bytes, Synth]], command: list[str]
) -> None:
    path, data, _ = stream()
    path.write_bytes(_page_pfn(data, 0x40) if command == ["restore"] else data[:5000])
    r = vmce_cli(*command, str(path))
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vmce: error: {path}: record 3 (PAGE_DATA")


def test_cli_inspect_json(stream: Callable[..., tuple[Path, bytes, Synth]]) -> None:
    import json

    path, data, _ = stream()
    r = vmce_cli("stream", "inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["size"] == len(data) and out["machine"]["vcpus"] == 2
    assert [v["vmce_vcpu"]["caps"] for v in out["vcpus"]] == ["0x1000c02", "0x1000c02"]
    assert out["records"][-1]["type"] == "END"


# -- fuzz --------------------------------------------------------------------------------------

_BASE: dict[str, bytes] = {}


def base_stream(tmp: Path) -> bytes:
    if "data" not in _BASE:
        _BASE["data"] = make_synth(pages=8, vcpus=1).write(tmp / "base.xen")
    return _BASE["data"]


#: Positions: the headers and policies, the HVM context and END (counted from the end of
#: the stream), or anywhere.
position = st.one_of(st.integers(0, 400), st.integers(-6000, -1), st.integers(0, 10**6))
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("cut"), position, st.just(0)),
    st.tuples(st.just("insert"), position, st.integers(0, 255)),
    st.tuples(st.just("word"), position, st.integers(0, 2**32 - 1)),
)


def apply(data: bytes, muts: list[tuple[str, int, int]]) -> bytes:
    for kind, pos, value in muts:
        if not data:
            break
        pos %= len(data)
        if kind == "flip":
            data = data[:pos] + bytes([data[pos] ^ value]) + data[pos + 1 :]
        elif kind == "cut":
            data = data[:pos]
        elif kind == "insert":
            data = data[:pos] + bytes([value]) * 8 + data[pos:]
        else:
            data = data[:pos] + struct.pack("<I", value) + data[pos + 4 :]
    return data


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(mutation, min_size=1, max_size=3))
def test_fuzz_refuses_cleanly_and_agrees_with_the_reader(
    tmp_path: Path, muts: list[tuple[str, int, int]]
) -> None:
    """Whatever the damage: a StreamError naming a place, or a checked image, never anything
    else; and the seekable scan refuses exactly where the streaming reader does."""
    data = apply(base_stream(tmp_path), muts)
    path = tmp_path / "fuzz.xen"
    path.write_bytes(data)
    try:
        read_stream(io.BytesIO(data), page_sink=lambda *a: None)
        reader_error = None
    except StreamError as e:
        reader_error = str(e)
    try:
        index, image = plan_restore(path)
    except StreamError as e:
        assert "offset 0x" in str(e)
        if "was already sent" in str(e):  # only the scan refuses a pfn sent twice
            return
        if reader_error is not None:
            assert str(e) == reader_error
        return
    assert reader_error is None
    assert image.vcpus == 1 and index.stream.size == len(data)


def test_mp_state_and_halt_survive(stream: Callable[..., tuple[Path, bytes, Synth]]) -> None:
    path, _, _ = stream()
    image = restore_plan(path)
    assert [v.halted for v in image.machine.vcpus] == [False, True]
    assert all(v.mp_state is MpState.RUNNABLE for v in image.machine.vcpus)


def test_a_console_line_cut_by_the_save_is_completed_after_the_restore() -> None:
    from vmce.kvm.devices.serial import Serial16550

    before: list[str] = []
    uart = Serial16550(before.append)
    for offset, value in ((3, 0x03), (1, 0x02), (2, 0x01)):  # LCR 8N1, IER THRI, FIFO on
        uart.io_write(0, offset, 1, value)
    for byte in b"first\nsec":
        uart.io_write(0, 0, 1, byte)
    uart.feed(b"xy")
    state = uart.save_state()
    assert (state.pending, state.rx, state.ier, state.fifo) == (b"sec", b"xy", 2, True)
    after: list[str] = []
    again = Serial16550(after.append)
    again.load_state(state)
    for byte in b"ond\n":
        again.io_write(0, 0, 1, byte)
    assert before == ["first"] and after == ["second"]
    assert again.io_read(0, 0, 1) == ord("x") and again.save_state().rx == b"y"


# -- the vendor trailer carries the KVM entries -----------------------------------------------


def test_trailer_frames_the_kvm_entries_and_old_readers_skip_them() -> None:
    from vmce.save.hvmctx import Header, Record

    ctx = HvmContext(Header())
    extra = [Record(0x8100, 0, b"config!!"), Record(0x8101, 1, b"vcpu")]
    inflight = {0: hr.VmceInflight(mcg_status=5)}
    blob = hr.encode_context(ctx, inflight, extra)
    _, got, others = hr.decode_context_full(blob)
    assert got == inflight and [(r.typecode, r.instance, r.payload) for r in others] == [
        (0x8100, 0, b"config!!"),
        (0x8101, 1, b"vcpu"),
    ]
    assert hr.decode_context(blob)[1] == inflight  # the in-flight-only reader skips them
    assert hr.encode_context(ctx, {}, extra).startswith(ctx.encode())  # no inflight: still framed
    assert hr.encode_context(ctx) == ctx.encode()  # nothing to carry: Xen's blob exactly
    with pytest.raises(ValueError, match="not an extra vendor entry"):
        hr.encode_trailer({}, [Record(0x8001, 0, bytes(64))])
    with pytest.raises(ValueError, match="two vendor entries"):
        hr.encode_trailer({}, [Record(0x8100, 0, b""), Record(0x8100, 0, b"")])
    dup = hr.encode_trailer({}, extra[:1])
    twice = dup[:-8] + dup[16:-8] + dup[-8:]  # the same entry again before END
    with pytest.raises(hr.HvmContextError, match="duplicate entry"):
        hr.decode_context_full(ctx.encode() + twice)
    unknown = hr.encode_trailer({}, extra[:1]).replace(struct.pack("<H", 0x8100), b"\x99\x81", 1)
    with pytest.raises(hr.HvmContextError, match="0x8199"):
        hr.decode_context_full(ctx.encode() + unknown)
