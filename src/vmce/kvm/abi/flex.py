"""Buffers for KVM structures that end in a flexible array (kvm_msrs, kvm_cpuid2...).

The header layout is declared once in :mod:`vmce.kvm.abi.cpu` (with a zero-length array
field); this module only sizes one buffer for ``header + n * entry``.
"""

from __future__ import annotations

import ctypes
from typing import Generic, TypeVar, cast

from vmce.kvm.abi.base import KvmStruct

H = TypeVar("H", bound=KvmStruct)
E = TypeVar("E", bound="ctypes._SimpleCData[int] | KvmStruct")


class FlexBuffer(Generic[H, E]):
    """One contiguous buffer: a ``header`` view and an ``entries`` view of ``count`` items."""

    def __init__(self, header: type[H], entry: type[E], field: str, count: int) -> None:
        offset: int = getattr(header, field).offset
        size = max(ctypes.sizeof(header), offset + count * ctypes.sizeof(entry))
        self.count = count
        self.buffer = ctypes.create_string_buffer(size)
        self.header: H = header.from_buffer(self.buffer)
        self.entries = cast("ctypes.Array[E]", (entry * count).from_buffer(self.buffer, offset))
