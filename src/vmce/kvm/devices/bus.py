"""A port-I/O bus: dispatches IN/OUT to the device that owns the port range."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol


class PortDevice(Protocol):
    """A device on the port bus; ``offset`` is relative to the device's base port."""

    def io_read(self, vcpu_id: int, offset: int, size: int) -> int:
        """Value of an IN of ``size`` bytes (1, 2 or 4)."""
        ...

    def io_write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        """Handle an OUT of ``size`` bytes."""
        ...


@dataclass(frozen=True)
class PortRange:
    """Ports ``[base, base + length)`` owned by ``device``."""

    base: int
    length: int
    name: str
    device: PortDevice

    @property
    def end(self) -> int:
        """First port after the range."""
        return self.base + self.length


class PortBus:
    """Port ranges sorted by base; unclaimed reads return all ones, writes are dropped."""

    def __init__(self) -> None:
        self._ranges: list[PortRange] = []
        self._bases: list[int] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0

    def register(self, base: int, length: int, device: PortDevice, name: str) -> None:
        """Attach ``device`` at ``[base, base + length)``; overlaps are refused."""
        if not (base >= 0 and length > 0 and base + length <= 0x10000):
            raise ValueError(f"bad port range {base:#x}+{length}")
        new = PortRange(base, length, name, device)
        i = bisect.bisect_left(self._bases, base)
        for neighbour in self._ranges[max(0, i - 1) : i + 1]:
            if neighbour.base < new.end and new.base < neighbour.end:
                raise ValueError(f"{name} at {base:#x}+{length} overlaps {neighbour.name}")
        self._ranges.insert(i, new)
        self._bases.insert(i, base)

    def find(self, port: int) -> PortRange | None:
        """The range holding ``port``."""
        i = bisect.bisect_right(self._bases, port) - 1
        if i >= 0 and port < self._ranges[i].end:
            return self._ranges[i]
        return None

    def read(self, vcpu_id: int, port: int, size: int) -> int:
        """Dispatch an IN."""
        rng = self.find(port)
        if rng is None:
            self.unclaimed_reads += 1
            return (1 << (8 * size)) - 1
        return rng.device.io_read(vcpu_id, port - rng.base, size) & ((1 << (8 * size)) - 1)

    def write(self, vcpu_id: int, port: int, size: int, value: int) -> None:
        """Dispatch an OUT."""
        rng = self.find(port)
        if rng is None:
            self.unclaimed_writes += 1
            return
        rng.device.io_write(vcpu_id, port - rng.base, size, value)

    @property
    def ranges(self) -> tuple[PortRange, ...]:
        """All registered ranges, by base port."""
        return tuple(self._ranges)
