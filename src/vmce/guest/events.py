"""Structured console lines from our guests: ``@vmce <event> key=value key="text"``."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

PREFIX = "@vmce "
_NUMBER = re.compile(r"^(0x[0-9a-fA-F]+|[0-9]+)$")


@dataclass(frozen=True)
class GuestEvent:
    """One event line, with its fields (numbers already converted)."""

    kind: str
    fields: dict[str, int | str] = field(default_factory=dict)
    line: str = ""
    time: float = 0.0

    def int(self, key: str) -> int:
        value = self.fields[key]
        if not isinstance(value, int):
            raise ValueError(f"event {self.kind}: field {key}={value!r} is not a number")
        return value

    def str(self, key: str) -> str:
        return str(self.fields[key])


def parse_event(line: str, time: float = 0.0) -> GuestEvent | None:
    """The event on ``line``, or ``None`` if it is ordinary console output."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        words = shlex.split(line[start + len(PREFIX) :])
    except ValueError:
        return None
    if not words:
        return None
    fields: dict[str, int | str] = {}
    for w in words[1:]:
        key, sep, value = w.partition("=")
        if not sep:
            continue
        fields[key] = int(value, 0) if _NUMBER.match(value) else value
    return GuestEvent(words[0], fields, line, time)
