"""Binary layouts declared once: a dataclass whose fields carry their ``struct`` format.

Example::

    @dataclass(frozen=True)
    class Descriptor(Layout):
        typecode: int = u16()
        instance: int = u16()
        length: int = u32()

    Descriptor.size() == 8
    Descriptor.unpack_from(buf, off)
    Descriptor(18, 0, 32).pack()

The ``struct.Struct``, the size and the field order all derive from the declaration; the byte
order is the class attribute ``BYTE_ORDER`` (little-endian unless a subclass says otherwise).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, Self


def _fmt(code: str, default: Any = 0) -> Any:
    return dataclasses.field(default=default, metadata={"fmt": code})


def u8(default: int = 0) -> Any:
    return _fmt("B", default)


def u16(default: int = 0) -> Any:
    return _fmt("H", default)


def u32(default: int = 0) -> Any:
    return _fmt("I", default)


def u64(default: int = 0) -> Any:
    return _fmt("Q", default)


def raw(size: int) -> Any:
    """A fixed-size byte string field."""
    return _fmt(f"{size}s", b"\0" * size)


_RESERVED = frozenset({"struct", "size", "field_names", "unpack_from", "pack", "_compiled"})
_STRUCTS: dict[type, tuple[struct.Struct, tuple[str, ...]]] = {}


class Layout:
    """Base of every fixed binary record; subclasses are frozen dataclasses."""

    BYTE_ORDER: ClassVar[str] = "<"

    @classmethod
    def _compiled(cls) -> tuple[struct.Struct, tuple[str, ...]]:
        entry = _STRUCTS.get(cls)
        if entry is None:
            fields = dataclasses.fields(cls)  # type: ignore[arg-type]
            clash = {f.name for f in fields} & _RESERVED
            if clash:
                raise TypeError(f"{cls.__name__}: field names {sorted(clash)} shadow Layout")
            st = struct.Struct(cls.BYTE_ORDER + "".join(f.metadata["fmt"] for f in fields))
            entry = _STRUCTS[cls] = (st, tuple(f.name for f in fields))
        return entry

    @classmethod
    def struct(cls) -> struct.Struct:
        return cls._compiled()[0]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return cls._compiled()[1]

    @classmethod
    def size(cls) -> int:
        return cls.struct().size

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        return cls(*cls.struct().unpack_from(buf, offset))

    def pack(self) -> bytes:
        st, names = self._compiled()
        return st.pack(*[getattr(self, n) for n in names])
