"""QMP's wire protocol (QEMU docs/interop/qmp-spec), independent of sockets and of the VM.

* The server speaks first: ``{"QMP": {"version": {...}, "capabilities": []}}``. No capability
  is offered (no out-of-band execution).
* Input is a stream of JSON objects, with or without newlines between them. :class:`JsonStream`
  splits it the way QEMU's JSON streamer does (by counting brackets outside strings), so a
  message can arrive in pieces or several in one read. A lexical error (an ASCII control
  character outside ``\\t\\r\\n``, or the byte 0xFF) discards the partial message and answers
  ``JSON parse error``: that is how the spec tells a client to resynchronise. Messages larger
  than :data:`MAX_MESSAGE` or nested deeper than :data:`MAX_DEPTH` end the connection.
  Single-quoted strings (a QEMU extension) are not accepted.
* Every reply and event is one line of ASCII JSON ending in CRLF. A reply echoes the
  command's ``id`` whenever the input got far enough to have one.
* Errors carry QMP's classes (:class:`ErrorClass`) and QEMU's wording where QEMU has one:
  unknown command and command before ``qmp_capabilities`` are ``CommandNotFound``; malformed
  input and bad arguments are ``GenericError`` and are reported before the command has any
  effect.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

#: The largest message accepted (QEMU allows far more; vmce's largest input is an mce-inject
#: file, and these are a few kB).
MAX_MESSAGE = 1 << 20
#: The deepest nesting accepted.
MAX_DEPTH = 64


class ErrorClass(Enum):
    """QMP's error classes (QEMU's ``QapiErrorClass``)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(Exception):
    """A command's error reply: class and description."""

    def __init__(
        self,
        desc: str,
        cls: ErrorClass = ErrorClass.GENERIC,
        *,
        echo: tuple[bool, Any] = (False, None),
    ) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc
        #: (has_id, id) of the request, to echo in the reply.
        self.echo = echo

    def payload(self) -> dict[str, str]:
        return {"class": self.cls.value, "desc": self.desc}


class FatalInput(Exception):
    """Input the server cannot recover from on this connection (too large, too deep)."""


# --------------------------------------------------------------------------------------------
# Output


def encode(obj: Mapping[str, Any]) -> bytes:
    """One server message: ASCII JSON (non-ASCII escaped) and CRLF."""
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": ")).encode() + b"\r\n"


def greeting(major: int, minor: int, micro: int, package: str) -> dict[str, Any]:
    return {
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": package,
            },
            "capabilities": [],
        }
    }


def reply(value: Any, msg_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"return": value}
    if has_id:
        out["id"] = msg_id
    return out


def error_reply(err: QmpError, msg_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"error": err.payload()}
    if has_id:
        out["id"] = msg_id
    return out


def timestamp(now: float | None = None) -> dict[str, int]:
    t = time.time() if now is None else now
    seconds = math.floor(t)
    return {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)}


def event(
    name: str, data: Mapping[str, Any] | None = None, now: float | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"event": name}
    if data is not None:
        out["data"] = dict(data)
    out["timestamp"] = timestamp(now)
    return out


# --------------------------------------------------------------------------------------------
# Input framing


@dataclass(frozen=True)
class ParseError:
    """A piece of input that is not a usable JSON value; the reply is a GenericError."""

    desc: str


Item = Any  # a decoded JSON value, or a ParseError

# Outside strings: the characters that matter. Inside: the end of the string or an escape.
_OUTSIDE = re.compile(rb'[{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_INSIDE = re.compile(rb'["\\\x00-\x1f\xff]')
_SPACE = b" \t\r\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass
class JsonStream:
    """Splits a byte stream into JSON values (see the module docstring)."""

    _buf: bytearray = field(default_factory=bytearray)
    _pos: int = 0  # how far _buf has been scanned
    _depth: int = 0
    _in_string: bool = False

    def feed(self, data: bytes) -> list[Item]:
        """The complete values (or :class:`ParseError`) that ``data`` finishes, in order.

        Raises :class:`FatalInput` when the input exceeds the limits."""
        self._buf += data
        out: list[Item] = []
        while True:
            item = self._next()
            if item is None:
                break
            out.append(item)
        if len(self._buf) > MAX_MESSAGE:
            raise FatalInput(f"message longer than {MAX_MESSAGE} bytes")
        return out

    def _reset(self, upto: int) -> None:
        del self._buf[:upto]
        self._pos = 0
        self._depth = 0
        self._in_string = False

    def _next(self) -> Item | None:
        buf = self._buf
        if self._depth == 0 and not self._in_string:
            # Between values: skip white space; a scalar at top level ends at white space.
            start = 0
            while start < len(buf) and buf[start] in _SPACE:
                start += 1
            if start:
                del buf[:start]
                self._pos = 0
            if not buf:
                return None
            first = buf[0]
            if first not in b"{[":
                return self._scalar()
            self._pos = 1
            self._depth = 1
        while True:
            pattern = _INSIDE if self._in_string else _OUTSIDE
            m = pattern.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return None
            ch = buf[m.start()]
            self._pos = m.end()
            if ch == 0xFF or ch < 0x20:
                self._reset(m.end())
                return ParseError(f"JSON parse error, stray byte {ch:#04x}")
            if self._in_string:
                if ch == ord("\\"):
                    if self._pos >= len(buf):  # the escaped character has not arrived yet
                        self._pos -= 1
                        return None
                    self._pos += 1
                else:
                    self._in_string = False
                continue
            if ch == ord('"'):
                self._in_string = True
            elif ch in b"{[":
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    raise FatalInput(f"JSON nested deeper than {MAX_DEPTH}")
            else:
                self._depth -= 1
                if self._depth == 0:
                    end = self._pos
                    text = bytes(buf[:end])
                    self._reset(end)
                    return _decode(text)

    def _scalar(self) -> Item | None:
        buf = self._buf
        if buf[0] in b"}]":
            ch = chr(buf[0])
            self._reset(1)
            return ParseError(f"JSON parse error, unexpected '{ch}'")
        end = 0
        while end < len(buf) and buf[end] not in _SPACE and buf[end] not in b"{[}]":
            if buf[end] == 0xFF or buf[end] < 0x20:
                self._reset(end + 1)
                return ParseError("JSON parse error, stray byte")
            end += 1
        if end == len(buf):
            return None  # the token may go on
        token = bytes(buf[:end])
        self._reset(end)
        value = _decode(token)
        if isinstance(value, ParseError):
            return value
        return ParseError("QMP input must be a JSON object")


def _decode(text: bytes) -> Item:
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        return ParseError("JSON parse error, invalid UTF-8 sequence")
    try:
        value, end = _DECODER.raw_decode(s)
    except (ValueError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        return ParseError(f"JSON parse error, {msg.lower()}")
    if s[end:].strip():
        return ParseError("JSON parse error, trailing characters")
    return value


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Request:
    """A well-formed command request."""

    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


_MEMBERS = {"execute", "exec-oob", "arguments", "id"}


def parse_request(value: Any) -> Request:
    """Validate a decoded message as ``{"execute", "arguments"?, "id"?}``.

    Raises :class:`QmpError` whose ``echo`` carries the request's id when it has one."""
    if not isinstance(value, dict):
        raise QmpError("QMP input must be a JSON object")
    has_id = "id" in value
    msg_id = value.get("id")

    def fail(desc: str) -> QmpError:
        return QmpError(desc, echo=(has_id, msg_id))

    for key in value:
        if key not in _MEMBERS:
            raise fail(f"QMP input member '{key}' is unexpected")
    if "exec-oob" in value:
        if "execute" in value:
            raise fail("QMP input must not contain both 'execute' and 'exec-oob'")
        raise fail("QMP input member 'exec-oob' is unexpected: capability 'oob' is not enabled")
    if "execute" not in value:
        raise fail("QMP input lacks member 'execute'")
    command = value["execute"]
    if not isinstance(command, str):
        raise fail("QMP input member 'execute' must be a string")
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        raise fail("QMP input member 'arguments' must be an object")
    return Request(command, arguments, msg_id, has_id)


# --------------------------------------------------------------------------------------------
# Arguments


class Kind(Enum):
    """Argument types."""

    UINT64 = "uint64"
    INT = "int"  # a non-negative integer with a smaller maximum
    BOOL = "bool"
    STR = "str"
    INT_LIST = "int-list"
    STR_LIST = "str-list"
    NUMBER = "number"


#: How QEMU's error messages name each type.
_EXPECTED = {
    Kind.UINT64: "integer",
    Kind.INT: "integer",
    Kind.BOOL: "boolean",
    Kind.STR: "string",
    Kind.INT_LIST: "array of integers",
    Kind.STR_LIST: "array of strings",
    Kind.NUMBER: "number",
}


@dataclass(frozen=True)
class Param:
    """One command argument."""

    name: str
    kind: Kind
    required: bool = False
    choices: tuple[str, ...] = ()
    maximum: int | None = None
    help: str = ""

    def expected(self) -> str:
        return _EXPECTED[self.kind]


U64_MAX = (1 << 64) - 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_args(params: tuple[Param, ...], args: Mapping[str, Any]) -> dict[str, Any]:
    """The validated arguments (absent optional ones left out); raises :class:`QmpError`."""
    known = {p.name: p for p in params}
    for key in args:
        if key not in known:
            raise QmpError(f"Parameter '{key}' is unexpected")
    out: dict[str, Any] = {}
    for p in params:
        if p.name not in args:
            if p.required:
                raise QmpError(f"Parameter '{p.name}' is missing")
            continue
        value = args[p.name]
        bad = QmpError(f"Invalid parameter type for '{p.name}', expected: {p.expected()}")
        if p.kind in (Kind.UINT64, Kind.INT):
            if not _is_int(value):
                raise bad
            limit = U64_MAX if p.maximum is None else p.maximum
            if not 0 <= value <= limit:
                raise QmpError(f"Parameter '{p.name}' expects a value in 0..{limit:#x}")
        elif p.kind is Kind.BOOL:
            if not isinstance(value, bool):
                raise bad
        elif p.kind is Kind.STR:
            if not isinstance(value, str):
                raise bad
            if p.choices and value not in p.choices:
                raise QmpError(f"Parameter '{p.name}' does not accept value '{value}'")
        elif p.kind is Kind.INT_LIST:
            if not isinstance(value, list) or not all(_is_int(x) for x in value):
                raise bad
            limit = U64_MAX if p.maximum is None else p.maximum
            if any(not 0 <= x <= limit for x in value):
                raise QmpError(f"Parameter '{p.name}' expects values in 0..{limit}")
        elif p.kind is Kind.STR_LIST:
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise bad
        elif p.kind is Kind.NUMBER:
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise bad
            if value < 0:
                raise QmpError(f"Parameter '{p.name}' must not be negative")
        out[p.name] = value
    return out
