"""An Intel MP 1.4 table for SMP guests without ACPI (kvm-linux.md 4.4), as Firecracker does.

Linux finds the floating pointer at 0x9fc00 (the 639 KiB scan window), then the PCMP
configuration table right after it: one processor entry per vCPU (APIC ID = index, vCPU 0 the
BSP), an ISA bus, the IOAPIC (ID = vCPUs + 1), 16 ISA interrupts mapped 1:1 onto IOAPIC pins,
and ExtINT -> LINT0 of the BSP, NMI -> LINT1 of all LAPICs.
"""

from __future__ import annotations

import struct
from enum import IntEnum

MPTABLE_START = 0x9FC00
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
APIC_VERSION = 0x14
MAX_CPUS = 254
ISA_IRQS = 16


class EntryType(IntEnum):
    """MP configuration table entry types."""

    PROCESSOR = 0
    BUS = 1
    IOAPIC = 2
    INTSRC = 3
    LINTSRC = 4


class IrqType(IntEnum):
    """Interrupt types of INTSRC/LINTSRC entries."""

    INT = 0
    NMI = 1
    SMI = 2
    EXTINT = 3


CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
CPU_FEATURE_STEPPING = 0x600
CPU_FEATURE_FLAGS = 0x201  # APIC | FPU


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(nr_cpus: int, base: int = MPTABLE_START) -> bytes:
    """Floating pointer + configuration table, to be written at ``base``."""
    if not 1 <= nr_cpus <= MAX_CPUS:
        raise ValueError(f"the MP table holds 1..{MAX_CPUS} CPUs, not {nr_cpus}")
    entries = bytearray()
    for cpu in range(nr_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack(
            "<BBBBII8x",
            EntryType.PROCESSOR,
            cpu,
            APIC_VERSION,
            flags,
            CPU_FEATURE_STEPPING,
            CPU_FEATURE_FLAGS,
        )
    entries += struct.pack("<BB6s", EntryType.BUS, 0, b"ISA   ")
    ioapic_id = nr_cpus + 1
    entries += struct.pack("<BBBBI", EntryType.IOAPIC, ioapic_id, APIC_VERSION, 1, IOAPIC_ADDR)
    for irq in range(ISA_IRQS):
        entries += struct.pack("<BBHBBBB", EntryType.INTSRC, IrqType.INT, 0, 0, irq, ioapic_id, irq)
    entries += struct.pack("<BBHBBBB", EntryType.LINTSRC, IrqType.EXTINT, 0, 0, 0, 0, 0)
    entries += struct.pack("<BBHBBBB", EntryType.LINTSRC, IrqType.NMI, 0, 0, 0, 0xFF, 1)
    count = nr_cpus + 2 + ISA_IRQS + 2
    length = 44 + len(entries)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHII",
            b"PCMP",
            length,
            4,
            0,
            b"VMCE    ",
            b"000000000000",
            0,
            0,
            count,
            LAPIC_ADDR,
            0,
        )
    )
    header[7] = _checksum(bytes(header) + entries)
    table_addr = base + 16
    floating = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", table_addr, 1, 4, 0, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating) + bytes(header) + bytes(entries)
