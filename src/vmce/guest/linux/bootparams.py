"""The zero page (``struct boot_params``) and memory map for the 64-bit boot protocol.

Layout (kvm-linux.md 4.1-4.4): the setup header is copied from the bzImage and only it (the
image's sentinel byte must not be copied); ``type_of_loader`` 0xFF, CAN_USE_HEAP, the command
line and initrd pointers, and an e820 map with RAM below 640 KiB (for the AP trampoline), the
MP table's page reserved, and RAM from 1 MiB to the end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from vmce.guest.linux.bzimage import SETUP_HEADER, SetupHeader

BOOT_PARAMS_SIZE = 4096
E820_ENTRIES_OFF = 0x1E8
E820_TABLE_OFF = 0x2D0
E820_ENTRY = struct.Struct("<QQI")
E820_MAX = 128
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
CAN_USE_HEAP = 0x80
LOADED_HIGH = 0x01


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type


def memory_map(mem_bytes: int, mptable: int = 0x9FC00) -> list[E820Entry]:
    """RAM below the MP table, the MP table and BIOS area reserved, RAM from 1 MiB."""
    return [
        E820Entry(0, mptable, E820Type.RAM),
        E820Entry(mptable, 0xA0000 - mptable, E820Type.RESERVED),
        E820Entry(0xF0000, 0x10000, E820Type.RESERVED),
        E820Entry(0x100000, mem_bytes - 0x100000, E820Type.RAM),
    ]


def build(
    header: SetupHeader,
    *,
    cmdline_addr: int,
    initrd_addr: int,
    initrd_size: int,
    e820: list[E820Entry],
) -> bytes:
    """The 4 KiB boot_params for ``startup_64``."""
    if len(e820) > E820_MAX:
        raise ValueError(f"at most {E820_MAX} e820 entries")
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER : SETUP_HEADER + len(header.raw)] = header.raw
    bp[TYPE_OF_LOADER] = 0xFF
    bp[LOADFLAGS] = header.loadflags | CAN_USE_HEAP | LOADED_HIGH
    struct.pack_into("<H", bp, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, CMD_LINE_PTR, cmdline_addr)
    struct.pack_into("<II", bp, RAMDISK_IMAGE, initrd_addr, initrd_size)
    bp[E820_ENTRIES_OFF] = len(e820)
    for i, e in enumerate(e820):
        E820_ENTRY.pack_into(bp, E820_TABLE_OFF + i * E820_ENTRY.size, e.addr, e.size, e.type)
    return bytes(bp)
