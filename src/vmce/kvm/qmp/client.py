"""A small synchronous QMP client (what ``vmce inject``, the tests and the benchmark use).

It speaks plain QMP, so it works against QEMU too: read the greeting, negotiate, send
``{"execute", "arguments", "id"}`` and wait for the reply with that id, keeping every event
that arrives meanwhile for :meth:`QmpClient.events` / :meth:`QmpClient.next_event`.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from typing import Any


class QmpClientError(Exception):
    """The connection failed or the server broke the protocol."""


class QmpCommandError(Exception):
    """The server answered a command with an error reply."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.error_class = cls
        self.desc = desc


class QmpClient:
    """One connection to a QMP server on a unix socket."""

    def __init__(self, path: str, *, timeout: float = 10.0, negotiate: bool = True) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = bytearray()
        self._events: deque[dict[str, Any]] = deque()
        self._next_id = 0
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise QmpClientError(f"cannot connect to {path}: {e.strerror or e}") from None
        self.greeting = self._recv_message(timeout)
        if "QMP" not in self.greeting:
            raise QmpClientError(f"not a QMP greeting: {self.greeting}")
        if negotiate:
            self.execute("qmp_capabilities")

    # -- messages ------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _recv_message(self, timeout: float | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    raise QmpClientError(f"the server sent invalid JSON: {line!r}") from e
                if not isinstance(msg, dict):
                    raise QmpClientError(f"the server sent a non-object: {line!r}")
                return msg
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("no message from the QMP server in time")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no message from the QMP server in time") from None
            except OSError as e:
                raise QmpClientError(f"connection error: {e}") from None
            if not data:
                raise QmpClientError("the QMP server closed the connection")
            self._buf += data

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message of any kind (reply or event), without bookkeeping."""
        return self._recv_message(self.timeout if timeout is None else timeout)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; raises :class:`QmpCommandError`."""
        self._next_id += 1
        msg_id = f"vmce-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self.send_raw(json.dumps(msg).encode() + b"\n")
        return self.wait_reply(msg_id)

    def wait_reply(self, msg_id: Any, timeout: float | None = None) -> Any:
        while True:
            msg = self._recv_message(self.timeout if timeout is None else timeout)
            if "event" in msg:
                self._events.append(msg)
                continue
            if msg.get("id") != msg_id:
                if "error" in msg and "id" not in msg:
                    err = msg["error"]
                    raise QmpCommandError(err.get("class", "?"), err.get("desc", "?"))
                continue  # a reply to someone else's id: drop it, as the spec says
            if "error" in msg:
                err = msg["error"]
                raise QmpCommandError(err.get("class", "?"), err.get("desc", "?"))
            return msg.get("return")

    # -- events --------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every event received so far and not yet taken."""
        out = list(self._events)
        self._events.clear()
        return out

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event within ``timeout`` seconds, or ``None``."""
        if self._events:
            return self._events.popleft()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self._recv_message(left)
            except TimeoutError:
                return None
            if "event" in msg:
                return msg

    def wait_event(
        self, name: str, timeout: float = 10.0, match: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The first event called ``name`` (whose data contains ``match``); others are kept."""
        deadline = time.monotonic() + timeout
        kept: list[dict[str, Any]] = []
        try:
            while True:
                for i, e in enumerate(self._events):
                    if _matches(e, name, match):
                        del self._events[i]
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {name} event within {timeout} s")
                try:
                    msg = self._recv_message(left)
                except TimeoutError:
                    raise TimeoutError(f"no {name} event within {timeout} s") from None
                if "event" in msg:
                    if _matches(msg, name, match):
                        return msg
                    kept.append(msg)
        finally:
            self._events.extend(kept)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _matches(e: dict[str, Any], name: str, match: dict[str, Any] | None) -> bool:
    if e.get("event") != name:
        return False
    data = e.get("data") or {}
    return all(data.get(k) == v for k, v in (match or {}).items())
