"""A debug-exit port (like QEMU's isa-debug-exit): a guest write ends the VM with that code."""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_PORT = 0x501


class DebugExit:
    """Port device: OUT of ``value`` calls ``on_exit(vcpu_id, value)``; IN reads 0."""

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self._on_exit = on_exit

    def io_read(self, vcpu_id: int, offset: int, size: int) -> int:
        """Nothing to read."""
        return 0

    def io_write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        """The guest asks to end the VM with exit code ``value``."""
        self._on_exit(vcpu_id, value)
