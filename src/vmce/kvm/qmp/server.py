"""The control socket: a QMP server inside the VMM process.

``vmce run --control PATH`` starts one. It listens on a unix socket only (there is no TCP
listener): the socket file is created with mode 0600 (the socket's inode mode is set before
``bind``, so the file never exists with looser permissions), it belongs to the user running the
VMM, and a peer whose uid is neither that user's nor root's is hung up on (SO_PEERCRED). An
existing socket file nobody listens on is replaced; a live one or any other file is an error.

Threads, none of them a vCPU thread:

* the I/O thread runs a selector over the listening socket, the clients and a wake-up pipe:
  it greets clients, splits their input into JSON values (:class:`.protocol.JsonStream`),
  queues them, and writes replies and events;
* the command thread executes the queued commands one at a time (:class:`.commands.Controller`)
  and hands the replies back to the I/O thread, so every client gets its replies in order and
  no two injections interleave.

vCPU threads only append to a queue and write one byte to a pipe (non-blocking) when the guest
prints a line or a #MC is delivered; they never wait for the server.

Robustness: malformed JSON, unknown commands and bad arguments get QMP's error reply; a
client may have at most :data:`MAX_INFLIGHT` commands queued (the server stops reading from it
until they are answered, as QEMU does); a client that does not read its output beyond
:data:`MAX_OUTBUF` bytes, or sends a message beyond the protocol's limits, is disconnected; a
client that disconnects has its queued commands dropped (the one executing completes whole).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmce import __version__
from vmce.kvm.qmp import events as ev
from vmce.kvm.qmp.commands import COMMANDS, Controller, SaveFunction
from vmce.kvm.qmp.protocol import (
    ErrorClass,
    FatalInput,
    JsonStream,
    Kind,
    Param,
    ParseError,
    QmpError,
    check_args,
    encode,
    error_reply,
    event,
    greeting,
    parse_request,
    reply,
)
from vmce.kvm.vmcevm import McDelivery, MsrAccess, VmceVm

log = logging.getLogger("vmce.qmp")

#: Commands one client may have queued before the server stops reading from it.
MAX_INFLIGHT = 8
#: Unsent output one client may accumulate before it is disconnected.
MAX_OUTBUF = 8 << 20
#: Clients connected at once; more are hung up on.
MAX_CLIENTS = 64
#: The capabilities the greeting offers (none: no out-of-band execution).
OFFERED: tuple[str, ...] = ()

LineParser = Callable[[str], dict[str, Any] | None]


class ControlSocketError(RuntimeError):
    """The control socket cannot be created; the message says why."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    number: int
    stream: JsonStream = field(default_factory=JsonStream)
    out: bytearray = field(default_factory=bytearray)
    backlog: deque[Any] = field(default_factory=deque)
    inflight: int = 0
    negotiated: bool = False  # I/O thread's view: events may be sent
    negotiated_cmd: bool = False  # command thread's view: commands may run
    closed: bool = False
    hang_up_after_flush: bool = False
    mask: int = 0  # what the selector watches for


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def bind_private(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 from the start."""
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ControlSocketError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a stale socket: nobody listens
        else:
            raise ControlSocketError(f"{path}: another VMM is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)  # bind() creates the file with this mode (& ~umask)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ControlSocketError(f"cannot listen on {path}: {e.strerror or e}") from None
    return sock


class QmpServer:
    """A QMP server for ``vm`` on the unix socket ``path`` (see the module docstring)."""

    def __init__(
        self,
        vm: VmceVm,
        path: str | os.PathLike[str],
        *,
        line_parser: LineParser | None = None,
        save: SaveFunction | None = None,
    ) -> None:
        self.vm = vm
        self.path = Path(path)
        self.line_parser = line_parser
        self.controller = Controller(vm, self._emit_from_command, self._request_quit, save)
        #: Set once a client asked to quit (after its reply and SHUTDOWN went out).
        self.quit_requested = threading.Event()
        self._outbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._commands: queue.SimpleQueue[tuple[_Client, Any] | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe_closed = False
        self._wake_pending = False
        self._clients: dict[int, _Client] = {}
        self._numbers = 0
        self._flags = threading.Lock()
        self._shutdown_sent = False
        self._panic_sent = False
        self._quit_pending = False
        self._closing = False
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._io = threading.Thread(target=self._io_main, name="qmp-io", daemon=True)
        self._worker = threading.Thread(target=self._cmd_main, name="qmp-cmd", daemon=True)
        self._started = False
        self._previous_trace: Callable[[MsrAccess], None] | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._listener = bind_private(self.path)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.vm.on_delivery.append(self._on_delivery)
        self._previous_trace = self.vm.msr_trace
        self.vm.msr_trace = self._trace
        self._started = True
        self._io.start()
        self._worker.start()

    def close(self, flush_timeout: float = 1.0) -> None:
        """Stop serving: flush what can be flushed within ``flush_timeout``, close everything,
        remove the socket file (idempotent)."""
        if self._closing:
            return
        self._closing = True
        self._flush_deadline = time.monotonic() + flush_timeout
        with contextlib.suppress(ValueError):
            self.vm.on_delivery.remove(self._on_delivery)
        if self._started and self.vm.msr_trace == self._trace:
            self.vm.msr_trace = self._previous_trace
        if self._started:
            self._commands.put(None)
            self._wake()
            self._worker.join(5.0)
            self._io.join(flush_timeout + 5.0)
        for c in list(self._clients.values()):
            self._drop(c)
        if self._sel is not None:
            self._sel.close()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        # A thread that did not end in time may still touch the pipe: leak it rather than
        # let a write land in whatever file reuses the descriptor number.
        threads_done = not self._started or not (self._worker.is_alive() or self._io.is_alive())
        with self._flags:
            self._pipe_closed = True
            if threads_done:
                os.close(self._wake_r)
                os.close(self._wake_w)

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def clients(self) -> int:
        return len(self._clients)

    # -- events (any thread) -------------------------------------------------------------

    def post_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Queue event ``name`` for every negotiated client (never blocks; dropped once the
        server is closed)."""
        if self._pipe_closed:
            return
        self._outbox.put(("event", name, data, time.time()))
        self._wake()

    def console_line(self, line: str) -> None:
        """Feed one guest console line (CONSOLE, and GUEST_PANICKED on a panic line)."""
        parsed = None
        if self.line_parser is not None:
            with contextlib.suppress(Exception):
                parsed = self.line_parser(line)
        self.post_event(ev.CONSOLE, ev.console(line, parsed))
        message = ev.panic_message(line)
        if message is not None:
            with self._flags:
                first = not self._panic_sent
                self._panic_sent = True
            if first:
                self.post_event(ev.GUEST_PANICKED, {"action": "poweroff", "message": message})

    def _trace(self, access: MsrAccess) -> None:
        """``VmceVm.msr_trace``, chained: the controller learns when guests clear MCIP."""
        self.controller.note_msr(access)
        previous = self._previous_trace
        if previous is not None:
            previous(access)

    def _on_delivery(self, d: McDelivery) -> None:
        self.post_event(ev.VMCE_DELIVERED, ev.delivered(d))

    def _emit_from_command(self, name: str, data: dict[str, Any]) -> None:
        self.post_event(name, data)

    def _wake(self) -> None:
        with self._flags:
            if self._wake_pending or self._pipe_closed:
                return
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    # -- the command thread ----------------------------------------------------------------

    def _request_quit(self) -> None:
        self._quit_pending = True

    def _cmd_main(self) -> None:
        while True:
            item = self._commands.get()
            if item is None:
                return
            client, payload = item
            if client.closed:
                self._outbox.put(("done", client))
                self._wake()
                continue
            try:
                out, negotiated = self._handle(client, payload)
            except Exception as e:  # never let a bug end the command thread
                log.exception("QMP command failed")
                out, negotiated = error_reply(QmpError(f"internal error: {e}")), False
            self._outbox.put(("reply", client, out, negotiated))
            if self._quit_pending:
                self._quit_pending = False
                with self._flags:
                    self._shutdown_sent = True
                self._outbox.put(
                    ("event", ev.SHUTDOWN, {"guest": False, "reason": "host-qmp-quit"}, time.time())
                )
                self._outbox.put(("quit",))
            self._wake()

    def _handle(self, client: _Client, payload: Any) -> tuple[dict[str, Any], bool]:
        if isinstance(payload, ParseError):
            return error_reply(QmpError(payload.desc)), False
        try:
            req = parse_request(payload)
        except QmpError as e:
            return error_reply(e, e.echo[1], e.echo[0]), False
        try:
            if not client.negotiated_cmd:
                self._negotiate(req.command, req.arguments)
                client.negotiated_cmd = True
                return reply({}, req.id, req.has_id), True
            return reply(self.controller.execute(req.command, req.arguments), req.id, req.has_id), (
                False
            )
        except QmpError as e:
            return error_reply(e, req.id, req.has_id), False

    @staticmethod
    def _negotiate(command: str, arguments: dict[str, Any]) -> None:
        if command != "qmp_capabilities":
            if command in COMMANDS:
                raise QmpError(
                    "Expecting capabilities negotiation with 'qmp_capabilities' before command "
                    f"'{command}'",
                    ErrorClass.COMMAND_NOT_FOUND,
                )
            raise QmpError(
                f"The command {command} has not been found", ErrorClass.COMMAND_NOT_FOUND
            )
        args = check_args((Param("enable", Kind.STR_LIST),), arguments)
        for cap in args.get("enable", []):
            if cap not in OFFERED:
                raise QmpError(f"Capability '{cap}' not available")

    # -- the I/O thread ------------------------------------------------------------------

    def _io_main(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._closing:
                for key, mask in sel.select(0.1):
                    self._on_ready(key, mask)
                self._drain_outbox()
                self._check_vm()
            self._drain_outbox()
            self._check_vm()
            self._final_flush()
        except Exception:
            log.exception("the QMP I/O thread failed")

    def _on_ready(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "accept":
            self._accept()
        elif key.data == "wake":
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        else:
            client: _Client = key.data
            if mask & selectors.EVENT_READ:
                self._read(client)
            if mask & selectors.EVENT_WRITE and not client.closed:
                self._write(client)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("QMP accept: %s", e)
                    return
                raise
            try:
                uid = _peer_uid(sock)
            except OSError:
                uid = -1
            if uid not in (os.getuid(), 0) or len(self._clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            self._numbers += 1
            client = _Client(sock, self._numbers)
            self._clients[client.number] = client
            assert self._sel is not None
            self._sel.register(sock, selectors.EVENT_READ, client)
            client.mask = selectors.EVENT_READ
            major, minor, micro = (int(x) for x in __version__.split(".")[:3])
            self._send(client, encode(greeting(major, minor, micro, f"vmce {__version__}")))

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        try:
            items = client.stream.feed(data)
        except FatalInput as e:
            self._send(client, encode(error_reply(QmpError(f"JSON parse error, {e}"))))
            client.hang_up_after_flush = True
            self._interest(client)
            return
        client.backlog.extend(items)
        self._pump(client)

    def _pump(self, client: _Client) -> None:
        """Queue backlog items while the client has room; read only when it has."""
        while client.backlog and client.inflight < MAX_INFLIGHT:
            client.inflight += 1
            self._commands.put((client, client.backlog.popleft()))
        self._interest(client)

    def _interest(self, client: _Client) -> None:
        """(Re)register the client for what it needs: reading while it has room for commands,
        writing while it has output; a client needing neither is left out of the selector."""
        if client.closed or self._sel is None:
            return
        mask = 0
        room = not client.backlog and client.inflight < MAX_INFLIGHT
        if room and not client.hang_up_after_flush:
            mask |= selectors.EVENT_READ
        if client.out:
            mask |= selectors.EVENT_WRITE
        if mask == client.mask:
            return
        if mask == 0:
            if client.hang_up_after_flush:
                self._drop(client)
                return
            self._sel.unregister(client.sock)
        elif client.mask == 0:
            self._sel.register(client.sock, mask, client)
        else:
            self._sel.modify(client.sock, mask, client)
        client.mask = mask

    def _send(self, client: _Client, data: bytes) -> None:
        if client.closed:
            return
        client.out += data
        if len(client.out) > MAX_OUTBUF:
            log.warning("QMP client %d does not read its output; disconnected", client.number)
            self._drop(client)
            return
        self._write(client)

    def _write(self, client: _Client) -> None:
        while client.out:
            try:
                n = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client)
                return
            del client.out[:n]
        self._interest(client)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        client.backlog.clear()
        self._clients.pop(client.number, None)
        if self._sel is not None and client.mask:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(client.sock)
        client.mask = 0
        client.sock.close()

    def _drain_outbox(self) -> None:
        self._wake_pending = False
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "event":
                _, name, data, when = item
                data_out = encode(event(name, data, when))
                for c in list(self._clients.values()):
                    if c.negotiated:
                        self._send(c, data_out)
            elif kind == "reply":
                _, client, out, negotiated = item
                client.inflight -= 1
                if not client.closed:
                    self._send(client, encode(out))
                    if negotiated:
                        client.negotiated = True
                    self._pump(client)
            elif kind == "done":
                item[1].inflight -= 1
            elif kind == "quit":
                self.quit_requested.set()

    def _check_vm(self) -> None:
        stop = self.vm.machine.stop_reason
        if stop is None:
            return
        with self._flags:
            if self._shutdown_sent:
                return
            self._shutdown_sent = True
            panic = stop.exit_code == ev.GUEST_PANIC_EXIT and not self._panic_sent
            self._panic_sent = True
        if panic:
            self.post_event(ev.GUEST_PANICKED, {"action": "poweroff", "message": stop.message})
        self.post_event(ev.SHUTDOWN, ev.shutdown(stop))
        self._drain_outbox()

    def _final_flush(self) -> None:
        deadline = getattr(self, "_flush_deadline", time.monotonic())
        while time.monotonic() < deadline:
            pending = [c for c in self._clients.values() if c.out and not c.closed]
            if not pending:
                return
            for c in pending:
                self._write(c)
            time.sleep(0.005)
