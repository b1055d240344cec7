"""Just enough of the i8042 keyboard controller for ``reboot=k``: 0xFE on port 0x64 resets.

Reads return 0 (no data waiting, input buffer empty), so a guest that probes the controller
moves on; a reset command calls ``on_reset(vcpu_id)``.
"""

from __future__ import annotations

from collections.abc import Callable

BASE = 0x60
LENGTH = 5
CMD_PULSE_RESET = 0xFE


class I8042:
    def __init__(self, on_reset: Callable[[int], None]) -> None:
        self._on_reset = on_reset

    def io_read(self, vcpu_id: int, offset: int, size: int) -> int:
        return 0

    def io_write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        if offset == 4 and value & 0xFF == CMD_PULSE_RESET:
            self._on_reset(vcpu_id)
