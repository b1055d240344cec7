"""A probe port block for test guests: every OUT is recorded as (vCPU, port offset, value)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_BASE = 0xE0
DEFAULT_LENGTH = 32


@dataclass(frozen=True)
class ProbeWrite:
    """One OUT seen on the probe ports, with its ``time.perf_counter()`` timestamp."""

    vcpu_id: int
    offset: int
    value: int
    time: float


class ProbePorts:
    """Records OUTs; ``wait_for`` blocks (on a Condition, not a sleep) until a predicate holds."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.writes: list[ProbeWrite] = []

    def io_read(self, vcpu_id: int, offset: int, size: int) -> int:
        """Reads return the vCPU id (handy for stubs)."""
        return vcpu_id

    def io_write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        """Record the write and wake waiters."""
        with self._cond:
            self.writes.append(ProbeWrite(vcpu_id, offset, value, time.perf_counter()))
            self._cond.notify_all()

    def values(self, offset: int | None = None, vcpu_id: int | None = None) -> list[int]:
        """Recorded values, optionally only for one port offset and/or one vCPU."""
        with self._cond:
            return [
                w.value
                for w in self.writes
                if (offset is None or w.offset == offset)
                and (vcpu_id is None or w.vcpu_id == vcpu_id)
            ]

    def wait_for(self, predicate: Callable[[list[ProbeWrite]], bool], timeout: float) -> bool:
        """Wait until ``predicate(writes)`` is true; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.writes), timeout)
