"""Shared output helpers: rich for people, JSON for scripts, one-line errors for both."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_C_INT = re.compile(r"^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


class CliError(Exception):
    """An error the user caused; printed as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def parse_u64(text: str, what: str = "value") -> int:
    """A C-syntax unsigned integer (``0x1f``, ``017``, ``42``) that fits in 64 bits."""
    t = text.strip().replace("_", "")
    if not _C_INT.match(t):
        fail(f"{what} {text!r} is not a number (use C syntax: 0x1f, 017, 42)")
    value = int(t, 16) if t[:2].lower() == "0x" else int(t, 8) if t.startswith("0") else int(t)
    if value >= 1 << 64:
        fail(f"{what} {text!r} does not fit in 64 bits")
    return value


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def hex64(value: int) -> str:
    return f"{value:#018x}"
