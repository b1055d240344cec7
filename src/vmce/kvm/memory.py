"""Guest RAM: anonymous mappings, GPA-addressed access, and their KVM memory slots."""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

PAGE_SIZE = 4096


class GuestMemoryError(ValueError):
    """An access outside guest RAM (or across two regions)."""


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous guest-physical range ``[gpa, gpa + size)`` backed by host memory."""

    slot: int
    gpa: int
    size: int

    @property
    def end(self) -> int:
        """First GPA after the region."""
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM as one private anonymous ``MAP_NORESERVE`` mapping per region."""

    def __init__(self, layout: Sequence[tuple[int, int]]) -> None:
        """``layout`` is a list of ``(gpa, size)``; sizes and GPAs must be page-aligned."""
        self.regions: list[MemoryRegion] = []
        self._maps: list[mmap.mmap] = []
        self._hvas: list[int] = []
        last_end = -1
        for slot, (gpa, size) in enumerate(sorted(layout)):
            if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page-aligned")
            if gpa < last_end:
                raise GuestMemoryError(f"region {gpa:#x}+{size:#x} overlaps the previous one")
            last_end = gpa + size
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            mm = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            # Take the address through a temporary export, so that close() can unmap later.
            anchor = ctypes.c_char.from_buffer(mm)
            self._hvas.append(ctypes.addressof(anchor))
            del anchor
            self._maps.append(mm)
            self.regions.append(MemoryRegion(slot, gpa, size))

    @classmethod
    def flat(cls, size: int) -> GuestMemory:
        """RAM from GPA 0 to ``size`` in one region."""
        return cls([(0, size)])

    @property
    def size(self) -> int:
        """Total bytes of RAM."""
        return sum(r.size for r in self.regions)

    def host_address(self, region: MemoryRegion) -> int:
        """The user-space address backing ``region`` (for KVM_SET_USER_MEMORY_REGION)."""
        return self._hvas[region.slot]

    def _locate(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        if not self._maps or self._maps[0].closed:
            raise GuestMemoryError("guest memory is closed")
        for region, mm in zip(self.regions, self._maps, strict=True):
            if region.gpa <= gpa and gpa + length <= region.end:
                return mm, gpa - region.gpa
        raise GuestMemoryError(f"GPA range {gpa:#x}+{length:#x} is not inside guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes at ``gpa``."""
        mm, off = self._locate(gpa, length)
        return mm[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` to ``gpa``."""
        mm, off = self._locate(gpa, len(data))
        mm[off : off + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte``."""
        self.write(gpa, bytes([byte]) * length)

    def read_u32(self, gpa: int) -> int:
        """Little-endian 32-bit value at ``gpa``."""
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def write_u32(self, gpa: int, value: int) -> None:
        """Store a little-endian 32-bit value."""
        self.write(gpa, struct.pack("<I", value & 0xFFFFFFFF))

    def read_u64(self, gpa: int) -> int:
        """Little-endian 64-bit value at ``gpa``."""
        return int(struct.unpack("<Q", self.read(gpa, 8))[0])

    def write_u64(self, gpa: int, value: int) -> None:
        """Store a little-endian 64-bit value."""
        self.write(gpa, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))

    def close(self) -> None:
        """Unmap everything (idempotent). Unregister from KVM (close the VM) first."""
        for mm in self._maps:
            mm.close()
