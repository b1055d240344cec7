"""The Linux ``_IOC`` encoding of ioctl request numbers (``asm-generic/ioctl.h``).

A request number packs a direction, an argument size, a type byte and a number::

    bits 31..30 direction (NONE 0, WRITE 1, READ 2), 29..16 size, 15..8 type, 7..0 nr

The KVM request numbers in :mod:`vmce.kvm.abi.requests` are derived from these helpers and the
``ctypes`` sizes of the argument structures, never typed in as hex.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from typing import TypeAlias

_NRBITS = 8
_TYPEBITS = 8
_SIZEBITS = 14
_NRSHIFT = 0
_TYPESHIFT = _NRSHIFT + _NRBITS
_SIZESHIFT = _TYPESHIFT + _TYPEBITS
_DIRSHIFT = _SIZESHIFT + _SIZEBITS

#: The ioctl type byte of every KVM request.
KVMIO = 0xAE


class IocDir(IntEnum):
    """Data direction of an ioctl, seen from user space."""

    NONE = 0
    WRITE = 1
    READ = 2


#: A ctypes type whose size is the ioctl argument size.
CType: TypeAlias = type[ctypes.Structure] | type[ctypes.Union] | type[ctypes.c_uint64]


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    """Pack one request number; ``size`` must fit the 14-bit size field."""
    if not 0 <= size < (1 << _SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_SIZEBITS} bits")
    if not (0 <= typ < 256 and 0 <= nr < 256):
        raise ValueError(f"ioctl type {typ:#x} / nr {nr:#x} out of range")
    return (direction << _DIRSHIFT) | (size << _SIZESHIFT) | (typ << _TYPESHIFT) | nr


def io(typ: int, nr: int) -> int:
    """``_IO(type, nr)``: a request without an argument structure."""
    return _ioc(IocDir.NONE, typ, nr, 0)


def ior(typ: int, nr: int, argtype: CType) -> int:
    """``_IOR(type, nr, argtype)``: the kernel writes ``argtype`` back to user space."""
    return _ioc(IocDir.READ, typ, nr, ctypes.sizeof(argtype))


def iow(typ: int, nr: int, argtype: CType) -> int:
    """``_IOW(type, nr, argtype)``: user space passes ``argtype`` to the kernel."""
    return _ioc(IocDir.WRITE, typ, nr, ctypes.sizeof(argtype))


def iowr(typ: int, nr: int, argtype: CType) -> int:
    """``_IOWR(type, nr, argtype)``: ``argtype`` goes both ways."""
    return _ioc(IocDir.READ | IocDir.WRITE, typ, nr, ctypes.sizeof(argtype))
