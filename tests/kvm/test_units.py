"""Pure-Python parts of vmce.kvm that need no /dev/kvm: devices, CPUID, long-mode tables."""

from __future__ import annotations

import struct

import pytest

from vmce.kvm.abi import KvmRun
from vmce.kvm.devices.bus import PortBus
from vmce.kvm.devices.debugexit import DebugExit
from vmce.kvm.devices.serial import Serial16550
from vmce.kvm.events import validate_vector
from vmce.kvm.memory import GuestMemory, GuestMemoryError
from vmce.kvm.pvm import read_emulation_failure
from vmce.kvm.vm import MsrRange
from vmce.kvm.x86 import longmode
from vmce.kvm.x86.cpuid import (
    AMD_ZEN3,
    INTEL_BROADWELL,
    CpuidEntry,
    CpuProfile,
    KvmPvFeature,
    Vendor,
    build_guest_cpuid,
    find,
)
from vmce.kvm.x86.layout import DEFAULT_LAYOUT

# --- serial ---------------------------------------------------------------------------------


def _uart() -> tuple[Serial16550, list[str], list[int]]:
    lines: list[str] = []
    irqs: list[int] = []
    return Serial16550(lines.append, lambda: irqs.append(4)), lines, irqs


def test_serial_collects_lines_and_reports_transmitter_empty() -> None:
    uart, lines, _ = _uart()
    for byte in b"hi\r\nthere":
        assert uart.io_read(0, 5, 1) & 0x60 == 0x60
        uart.io_write(0, 0, 1, byte)
    assert lines == ["hi"] and uart.flush() == "there"


def test_serial_probe_reads_back_like_a_16550a() -> None:
    uart, _, _ = _uart()
    uart.io_write(0, 1, 1, 0)
    assert uart.io_read(0, 1, 1) == 0
    uart.io_write(0, 1, 1, 0x0F)
    assert uart.io_read(0, 1, 1) == 0x0F
    uart.io_write(0, 2, 1, 0x01)  # FCR: FIFO on
    assert uart.io_read(0, 2, 1) & 0xC0 == 0xC0
    for reg, value in ((3, 0x03), (4, 0x0B), (7, 0x5A)):
        uart.io_write(0, reg, 1, value)
        assert uart.io_read(0, reg, 1) == value
    uart.io_write(0, 3, 1, 0x80)  # DLAB: divisor latch
    uart.io_write(0, 0, 1, 0x01)
    assert uart.io_read(0, 0, 1) == 0x01


def test_serial_thri_interrupt_until_iir_read() -> None:
    uart, _, irqs = _uart()
    uart.io_write(0, 1, 1, 0x02)  # enable THRI: THR is empty -> interrupt
    assert irqs == [4]
    assert uart.io_read(0, 2, 1) & 0x0F == 0x02
    assert uart.io_read(0, 2, 1) & 0x0F == 0x01  # reading IIR acknowledged it
    uart.io_write(0, 0, 1, ord("x"))
    assert irqs == [4, 4]


def test_serial_loopback_goes_to_the_receiver() -> None:
    uart, lines, _ = _uart()
    uart.io_write(0, 4, 1, 0x10 | 0x0F)
    assert uart.io_read(0, 6, 1) & 0xF0 == 0xF0
    uart.io_write(0, 0, 1, 0x41)
    assert uart.io_read(0, 5, 1) & 0x01 and uart.io_read(0, 0, 1) == 0x41
    assert lines == []


# --- bus ------------------------------------------------------------------------------------


def test_bus_dispatch_overlap_and_unclaimed_ports() -> None:
    bus = PortBus()
    codes: list[tuple[int, int]] = []
    uart, _, _ = _uart()
    bus.register(0x3F8, 8, uart, "serial")
    bus.register(0x501, 1, DebugExit(lambda v, c: codes.append((v, c))), "exit")
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x3FF, 2, uart, "clash")
    bus.write(1, 0x501, 1, 7)
    assert codes == [(1, 7)]
    assert bus.read(0, 0x3FD, 1) == 0x60
    assert bus.read(0, 0x80, 2) == 0xFFFF and bus.unclaimed_reads == 1


# --- CPUID ----------------------------------------------------------------------------------

HOST = [
    CpuidEntry(0, 0, 0, 0xD, *Vendor.AMD.cpuid_registers()[0:1], 0, 0),
    CpuidEntry(1, 0, 0, 0xA10F11, 0x00020800, 0x80000000, 0x178BFBFF & ~(1 << 7)),
    CpuidEntry(0xB, 0, 1, 0, 1, 0x100, 7),
    CpuidEntry(0xB, 1, 1, 0, 2, 0x201, 7),
    CpuidEntry(0x40000001, 0, 0, 0xFFFFFF, 0, 0, 0),
    CpuidEntry(0x80000000, 0, 0, 0x80000021, 0, 0, 0),
    CpuidEntry(0x80000001, 0, 0, 0xA10F11, 0, 0, 0),
]


def test_cpuid_profile_signatures() -> None:
    assert INTEL_BROADWELL.signature() == 0x406F1
    assert AMD_ZEN3.signature() == 0xA00F11
    with pytest.raises(ValueError):
        CpuProfile(Vendor.AMD, 6, 0x4F).signature()


def test_guest_cpuid_vendor_apic_id_mce_and_pv_bits() -> None:
    table = build_guest_cpuid(HOST, profile=INTEL_BROADWELL, apic_id=3)
    leaf0, leaf1 = find(table, 0), find(table, 1)
    assert leaf0 is not None and leaf1 is not None
    raw = b"".join(x.to_bytes(4, "little") for x in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert raw == b"GenuineIntel"
    assert leaf1.eax == 0x406F1 and leaf1.ebx >> 24 == 3
    assert leaf1.edx & (1 << 7) and leaf1.edx & (1 << 14)
    assert [e.edx for e in table if e.function == 0xB] == [3, 3]
    pv = find(table, 0x40000001)
    assert pv is not None
    for bit in (KvmPvFeature.PV_UNHALT, KvmPvFeature.PV_SEND_IPI, KvmPvFeature.PV_SCHED_YIELD):
        assert not pv.eax & (1 << bit)
    assert pv.eax & (1 << KvmPvFeature.CLOCKSOURCE2)
    ext = find(table, 0x80000001)
    assert ext is not None and ext.eax == 0  # Intel reports no extended signature


def test_guest_cpuid_without_profile_keeps_the_host_signature() -> None:
    table = build_guest_cpuid(HOST, profile=None, apic_id=0)
    leaf1 = find(table, 1)
    assert leaf1 is not None and leaf1.eax == 0xA10F11


# --- long mode ------------------------------------------------------------------------------


def test_gdt_selectors_and_segments() -> None:
    gdt = longmode.build_gdt(DEFAULT_LAYOUT, 2)
    words = struct.unpack(f"<{len(gdt) // 8}Q", gdt)
    assert words[0x10 >> 3] == 0x00AF9B000000FFFF
    assert words[0x18 >> 3] == 0x00CF93000000FFFF
    assert words[0x30 >> 3] == 0x00AFFB000000FFFF
    cs = longmode.segment(words[0x30 >> 3], 0x33)
    assert (cs.l, cs.dpl, cs.type, cs.present, cs.limit) == (1, 3, 0xB, 1, 0xFFFFFFFF)
    tss_low, tss_high = words[8], words[9]
    tr = longmode.segment(tss_low, longmode.tss_selector(0), tss_high)
    assert (tr.base, tr.limit, tr.type, tr.s) == (DEFAULT_LAYOUT.tss(0), 0x67, 0xB, 0)


def test_identity_page_tables_cover_4gib_user_accessible() -> None:
    mem = GuestMemory.flat(0x10000)
    try:
        longmode.write_boot_tables(mem, DEFAULT_LAYOUT, [0x70000])
        assert mem.read_u64(DEFAULT_LAYOUT.pml4) == DEFAULT_LAYOUT.pdpt | 0x7
        last_pd = DEFAULT_LAYOUT.page_directories + 3 * 0x1000
        assert mem.read_u64(DEFAULT_LAYOUT.pdpt + 24) == last_pd | 0x7
        assert mem.read_u64(last_pd + 511 * 8) == (4 << 30) - (2 << 20) | 0x87
        assert mem.read_u64(DEFAULT_LAYOUT.tss(0) + 4) == 0x70000
    finally:
        mem.close()


# --- memory, ranges, vectors, pvm decoding --------------------------------------------------


def test_guest_memory_bounds() -> None:
    mem = GuestMemory([(0, 0x2000), (0x10000, 0x1000)])
    try:
        mem.write_u64(0x1FF8, 0x1122334455667788)
        assert mem.read(0x1FF8, 2) == b"\x88\x77"
        with pytest.raises(GuestMemoryError):
            mem.read(0x1FFC, 8)
        with pytest.raises(GuestMemoryError):
            mem.write(0x11000, b"x")
        assert mem.size == 0x3000
    finally:
        mem.close()
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 0x1001)])


def test_msr_range_validation() -> None:
    assert 0x17A in MsrRange(0x179, 3) and 0x17C not in MsrRange(0x179, 3)
    with pytest.raises(ValueError):
        MsrRange(0x400, 0)
    with pytest.raises(ValueError):
        MsrRange(0x400, 1, read=False, write=False)


def test_vector_validation() -> None:
    validate_vector(18)
    with pytest.raises(ValueError):
        validate_vector(2)
    with pytest.raises(ValueError):
        validate_vector(40)


def test_emulation_failure_decoding() -> None:
    run = KvmRun()
    run.emulation_failure.suberror = 1
    run.emulation_failure.flags = 1
    run.emulation_failure.insn_size = 2
    run.emulation_failure.insn_bytes[0] = 0xCD
    run.emulation_failure.insn_bytes[1] = 0x80
    failure = read_emulation_failure(run, 0x1234)
    assert failure is not None and failure.insn == b"\xcd\x80"
    assert failure.describe() == "instruction bytes cd 80 at RIP 0x1234"
    run.emulation_failure.suberror = 3
    assert read_emulation_failure(run, 0) is None


def test_mptable_checksums_and_entries() -> None:
    from vmce.kvm.x86.mptable import MPTABLE_START, build_mptable

    table = build_mptable(2)
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    assert struct.unpack_from("<I", table, 4)[0] == MPTABLE_START + 16
    length = struct.unpack_from("<H", table, 16 + 4)[0]
    assert table[16:20] == b"PCMP" and len(table) == 16 + length
    assert sum(table[16:]) % 256 == 0
    assert struct.unpack_from("<H", table, 16 + 34)[0] == 2 + 2 + 16 + 2  # entry count
    first_cpu, second_cpu = table[60:80], table[80:100]
    assert first_cpu[0] == 0 and first_cpu[3] == 3 and second_cpu[1] == 1 and second_cpu[3] == 1
    with pytest.raises(ValueError):
        build_mptable(0)
