"""ioctl calls on KVM file descriptors, with errors that name the request.

``fcntl.ioctl`` releases the GIL and is used everywhere, except for requests whose integer
argument does not fit a signed C int (``KVM_SET_TSS_ADDR(0xfffbd000)``): ``fcntl.ioctl``
raises ``OverflowError`` there, so :func:`ioctl_ulong` goes through ``ctypes`` libc instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import fcntl
import os
from typing import Any

from vmce.kvm.abi import Ioctl


class KvmError(OSError):
    """A KVM ioctl failed; ``errno`` is the kernel's, the message names the request."""


def _error(request: Ioctl, err: int) -> KvmError:
    return KvmError(err, f"{request.c_name} failed: {os.strerror(err)}")


def ioctl(fd: int, request: Ioctl, arg: int = 0) -> int:
    """Issue ``request`` with an integer argument (signed C int range) and return the result."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise _error(request, exc.errno or errno_mod.EIO) from None


def ioctl_buf(fd: int, request: Ioctl, buf: Any) -> int:
    """Issue ``request`` with a mutable ctypes object that the kernel may read and write."""
    try:
        return int(fcntl.ioctl(fd, request, buf, True))
    except OSError as exc:
        raise _error(request, exc.errno or errno_mod.EIO) from None


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def ioctl_ulong(fd: int, request: Ioctl, arg: int) -> int:
    """Issue ``request`` with an unsigned long argument (via libc; also releases the GIL)."""
    result = int(_libc.ioctl(fd, int(request), arg))
    if result < 0:
        raise _error(request, ctypes.get_errno())
    return result
