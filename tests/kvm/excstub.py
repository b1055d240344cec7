"""Names for guests/stubs/exc.s: modes, user actions, probe offsets and symbols."""

from __future__ import annotations

from enum import IntEnum

from stubbuild import SCRATCH


class Mode(IntEnum):
    """Boot-info qword 0."""

    HALT = 0
    SPIN0 = 1
    INT3 = 2
    USER = 3
    RDTSC0 = 4
    UD2 = 5
    INT80_CPL0 = 6
    RDTSC_LOOP0 = 7


class UserAction(IntEnum):
    """Boot-info qword 1 in Mode.USER."""

    SPIN = 0
    INT80 = 1
    HLT = 2
    CLI = 3
    UD2 = 4
    OUT_IOPL3 = 5
    OUT_IOPL0 = 6
    RDTSC = 7
    PAGE_FAULT = 8
    SYSCALL = 9
    TIMER = 10
    INT3 = 11
    INT81 = 12
    RDTSC_LOOP = 13


class Off(IntEnum):
    """Probe port offsets used by exc.s."""

    VECTOR = 0
    ERROR_CODE = 1
    RIP = 2
    CS = 4
    RFLAGS = 5
    RSP = 6
    SS = 8
    FRAME_TOP = 9
    HANDLER_CS = 11
    USER_DATA = 12
    MARKER = 13
    HEARTBEAT = 14
    READY = 15
    CR2 = 16
    SYSCALL_CS = 18
    SYSCALL_SS = 19
    TSC0 = 20
    TSC1 = 22


MARK_ENTER_USER = 0x5E7
MARK_AFTER_INT3 = 0x3333


#: Per-vCPU counter incremented by UserAction.SPIN.
def user_counter(index: int) -> int:
    """GPA of vCPU ``index``'s CPL3 spin counter."""
    return SCRATCH + 0x100 + 8 * index


USER_TSC = SCRATCH + 0x200


def boot_info(mode: Mode, param: int = 0, resume: bool = False, timer: int = 0) -> list[int]:
    """The four boot-info qwords."""
    return [mode, param, int(resume), timer]
