"""Base classes for the KVM ``ctypes`` layouts.

Every layout names its C counterpart in ``_c_name_`` so that the ABI test can compare
``sizeof``/``offsetof`` of every field with the kernel headers. Nested anonymous C structs
(``kvm_vcpu_events.exception``) are declared as Python classes with ``_c_name_ = ""``; they are
checked through the parent's field paths.
"""

from __future__ import annotations

import ctypes
from typing import ClassVar, Self


class KvmStruct(ctypes.Structure):
    """A ``struct`` of the KVM ABI (native alignment, like the C compiler)."""

    _c_name_: ClassVar[str] = ""

    def to_bytes(self) -> bytes:
        """The raw bytes of this structure, as the kernel sees them."""
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """A new structure holding a copy of ``data`` (which must be exactly the size)."""
        if len(data) != ctypes.sizeof(cls):
            raise ValueError(f"{cls.__name__} needs {ctypes.sizeof(cls)} bytes, got {len(data)}")
        return cls.from_buffer_copy(data)

    def copy(self) -> Self:
        """An independent copy."""
        return type(self).from_buffer_copy(self)


class KvmUnion(ctypes.Union):
    """A ``union`` of the KVM ABI."""

    _c_name_: ClassVar[str] = ""
