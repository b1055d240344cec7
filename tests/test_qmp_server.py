"""The control socket without KVM: QMP framing, errors, events, many clients, floods, and
qemu.qmp against it. The VM is :class:`qmpfake.FakeVm` (the real vMCE model, no vCPUs)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpfake import FakeVm
from vmce.kvm.qmp import server as server_mod
from vmce.kvm.qmp.client import QmpClient, QmpCommandError
from vmce.kvm.qmp.protocol import (
    MAX_DEPTH,
    MAX_MESSAGE,
    FatalInput,
    JsonStream,
    Kind,
    Param,
    ParseError,
    QmpError,
    check_args,
    encode,
    parse_request,
)
from vmce.kvm.qmp.server import ControlSocketError, QmpServer

SRAO = 0xBD000000000000C0

# -- framing -------------------------------------------------------------------------------


def feed_all(chunks: list[bytes]) -> list[Any]:
    s = JsonStream()
    out: list[Any] = []
    for c in chunks:
        out += s.feed(c)
    return out


def test_stream_splits_joined_and_pieced_messages() -> None:
    text = (
        b'{"execute": "a"}{"execute":"b", "arguments": {"x": "}{\\"["}}\r\n  {"id": [1, {"y": 2}]}'
    )
    whole = feed_all([text])
    assert whole == [
        {"execute": "a"},
        {"execute": "b", "arguments": {"x": '}{"['}},
        {"id": [1, {"y": 2}]},
    ]
    assert feed_all([bytes([b]) for b in text]) == whole  # one byte at a time
    esc = b'{"a": "\\\\"}'  # an escaped backslash right before the closing quote
    assert feed_all([esc[:7], esc[7:]]) == [{"a": "\\"}]


@pytest.mark.parametrize(
    ("data", "first"),
    [
        (b'{"execute": }', "JSON parse error"),
        (b'{"a": NaN}', "JSON parse error"),
        (b"42 ", "QMP input must be a JSON object"),
        (b"abc ", "JSON parse error"),
        (b"} ", "JSON parse error, unexpected '}'"),
        (b'{"a": "\xff"}', "JSON parse error, stray byte 0xff"),
        (b'{"a": "\xc3\x28"}', "invalid UTF-8"),
    ],
)
def test_stream_reports_bad_input(data: bytes, first: str) -> None:
    out = feed_all([data])
    assert isinstance(out[0], ParseError) and first in out[0].desc


def test_lexical_error_resynchronises() -> None:
    """A control character discards the partial message (the spec's way to resync)."""
    out = feed_all([b'{"execute": "half', b"\x01", b'{"execute": "next"}'])
    assert isinstance(out[0], ParseError) and out[1] == {"execute": "next"}


def test_stream_limits_are_fatal() -> None:
    with pytest.raises(FatalInput):
        JsonStream().feed(b"[" * (MAX_DEPTH + 1))
    with pytest.raises(FatalInput):
        JsonStream().feed(b'{"a": "' + b"x" * MAX_MESSAGE)


@pytest.mark.parametrize(
    ("value", "desc"),
    [
        ([1], "QMP input must be a JSON object"),
        ({"execute": "x", "bogus": 1}, "QMP input member 'bogus' is unexpected"),
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
        ({"execute": 5}, "QMP input member 'execute' must be a string"),
        ({"execute": "x", "arguments": []}, "QMP input member 'arguments' must be an object"),
        ({"exec-oob": "x"}, "capability 'oob' is not enabled"),
    ],
)
def test_request_validation(value: Any, desc: str) -> None:
    with pytest.raises(QmpError, match=desc):
        parse_request(value)


def test_argument_checks() -> None:
    params = (
        Param("n", Kind.UINT64, required=True),
        Param("b", Kind.BOOL),
        Param("m", Kind.STR, choices=("x", "y")),
        Param("l", Kind.INT_LIST, maximum=3),
    )
    assert check_args(params, {"n": 1, "l": [0, 3]}) == {"n": 1, "l": [0, 3]}
    for args, desc in (
        ({}, "Parameter 'n' is missing"),
        ({"n": 1, "z": 0}, "Parameter 'z' is unexpected"),
        ({"n": True}, "Invalid parameter type for 'n', expected: integer"),
        ({"n": "1"}, "Invalid parameter type for 'n', expected: integer"),
        ({"n": -1}, "expects a value in"),
        ({"n": 1 << 64}, "expects a value in"),
        ({"n": 1, "b": 1}, "expected: boolean"),
        ({"n": 1, "m": "z"}, "does not accept value 'z'"),
        ({"n": 1, "l": [4]}, "expects values in 0..3"),
    ):
        with pytest.raises(QmpError, match=desc):
            check_args(params, args)


def test_output_is_ascii_with_crlf() -> None:
    data = encode({"event": "CONSOLE", "data": {"line": "caf\u00e9"}})
    assert data.endswith(b"\r\n") and data.isascii() and b"\\u00e9" in data


# -- the server against a fake VM ----------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[QmpServer, FakeVm, str]]:
    vm = FakeVm(2)
    path = str(tmp_path / "qmp.sock")
    srv = QmpServer(vm, path)  # type: ignore[arg-type]
    srv.start()
    yield srv, vm, path
    srv.close()


class Raw:
    """A raw connection: bytes out, one JSON line in."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(5)
        self.s.connect(path)
        self.f = self.s.makefile("rb")

    def line(self) -> dict[str, Any]:
        raw = self.f.readline()
        assert raw.endswith(b"\r\n"), raw
        msg: dict[str, Any] = json.loads(raw)
        return msg

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.s.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def ask(self, data: bytes | dict[str, Any]) -> dict[str, Any]:
        self.send(data)
        while True:
            msg = self.line()
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.f.close()
        self.s.close()


def test_socket_is_private(served: tuple[QmpServer, FakeVm, str]) -> None:
    _, _, path = served
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


def test_socket_file_rules(tmp_path: Path) -> None:
    vm = FakeVm(1)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    srv = QmpServer(vm, stale)  # type: ignore[arg-type]
    srv.start()
    try:
        with pytest.raises(ControlSocketError, match="another VMM is listening"):
            QmpServer(vm, stale).start()  # type: ignore[arg-type]
    finally:
        srv.close()
    assert not stale.exists()  # removed on close
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(ControlSocketError, match="is not a socket"):
        QmpServer(vm, plain).start()  # type: ignore[arg-type]


def test_greeting_and_negotiation(served: tuple[QmpServer, FakeVm, str]) -> None:
    _, _, path = served
    c = Raw(path)
    g = c.line()["QMP"]
    assert g["capabilities"] == [] and g["version"]["package"].startswith("vmce")
    assert set(g["version"]["qemu"]) == {"major", "minor", "micro"}
    r = c.ask({"execute": "query-status", "id": 1})
    assert r == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities' before command "
            "'query-status'",
        },
        "id": 1,
    }
    r = c.ask({"execute": "huh"})
    assert r["error"] == {"class": "CommandNotFound", "desc": "The command huh has not been found"}
    r = c.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert r["error"]["desc"] == "Capability 'oob' not available"
    assert c.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    r = c.ask({"execute": "qmp_capabilities", "id": "again"})
    assert r["error"]["class"] == "CommandNotFound" and r["id"] == "again"
    assert "already complete" in r["error"]["desc"]
    c.close()


def negotiated(path: str) -> Raw:
    c = Raw(path)
    c.line()
    assert c.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    return c


def test_bad_input_gets_qmp_errors(served: tuple[QmpServer, FakeVm, str]) -> None:
    _srv, vm, path = served
    c = negotiated(path)
    r = c.ask(b'{"execute": }')
    assert r["error"]["class"] == "GenericError" and "JSON parse error" in r["error"]["desc"]
    assert "id" not in r
    r = c.ask({"execute": "no-such-command", "id": {"any": ["json"]}})
    assert r["error"]["class"] == "CommandNotFound" and r["id"] == {"any": ["json"]}
    r = c.ask({"execute": "vmce-inject", "arguments": {"status": "x", "mcg-status": 5}, "id": 7})
    assert r == {
        "error": {
            "class": "GenericError",
            "desc": "Invalid parameter type for 'status', expected: integer",
        },
        "id": 7,
    }
    r = c.ask({"execute": "vmce-inject", "arguments": {"status": SRAO}, "id": None})
    assert r["error"]["desc"] == "Parameter 'mcg-status' is missing" and r["id"] is None
    r = c.ask({"execute": "query-status", "arguments": {"verbose": True}})
    assert r["error"]["desc"] == "Parameter 'verbose' is unexpected"
    r = c.ask(b"\xff")
    assert "stray byte" in r["error"]["desc"]
    r = c.ask(
        {"execute": "vmce-inject", "arguments": {"cpus": [9], "status": SRAO, "mcg-status": 5}}
    )
    assert r["error"]["desc"] == "CPU #9 not found"
    assert c.ask({"execute": "query-status", "id": 3.5}) == {
        "return": {"running": True, "singlestep": False, "status": "running"},
        "id": 3.5,
    }
    assert all(v.banks[1].status == 0 for v in vm.domain.vcpus)  # nothing was applied
    c.close()


def test_events_only_after_negotiation_with_timestamps(
    served: tuple[QmpServer, FakeVm, str],
) -> None:
    srv, _, path = served
    early = Raw(path)
    early.line()
    c = negotiated(path)
    srv.post_event("TEST_EVENT", {"n": 1})
    e = c.line()
    assert e["event"] == "TEST_EVENT" and e["data"] == {"n": 1}
    assert set(e["timestamp"]) == {"seconds", "microseconds"}
    assert abs(e["timestamp"]["seconds"] - time.time()) < 5
    # the un-negotiated client got nothing: its next line is the reply to its command
    assert "return" in early.ask({"execute": "qmp_capabilities"})
    early.close()
    c.close()


def test_injection_events_and_state(served: tuple[QmpServer, FakeVm, str]) -> None:
    _srv, _vm, path = served
    with QmpClient(path) as c:
        r = c.execute(
            "vmce-inject",
            {"cpus": [1], "bank": 9, "status": SRAO, "mcg-status": 5, "addr": 0x3000, "misc": 0x86},
        )
        assert r["pending"] == [1] and r["notes"] == ["bank 9 is reported in guest bank 1"]
        filled = c.wait_event("VMCE_FILLED")["data"]
        assert filled == {
            "cpu-index": 1,
            "bank": 1,
            "status": SRAO,
            "addr": 0x3000,
            "misc": 0x86,
            "mcg-status": 5,
            "mce": True,
            "source": "qmp",
        }
        assert c.wait_event("VMCE_DELIVERED")["data"]["cpu-index"] == 1
        state = c.execute("query-vmce", {"cpu-index": 1})
        assert state["vcpus"][0]["banks"][1]["status"] == SRAO
        c.execute("stop")
        assert c.wait_event("STOP") and c.execute("query-status")["status"] == "paused"
        c.execute("cont")
        assert c.wait_event("RESUME") and c.execute("query-status")["running"]
        names = {x["name"] for x in c.execute("query-commands")}
        assert {"vmce-inject", "human-monitor-command", "vmce-mce-inject", "quit"} <= names
        with pytest.raises(QmpCommandError, match="save is not available in this build"):
            c.execute("vmce-save", {"path": "/tmp/x"})


def test_hmp_over_qmp(served: tuple[QmpServer, FakeVm, str]) -> None:
    _, vm, path = served
    with QmpClient(path) as c:

        def hmp(line: str) -> str:
            out: str = c.execute("human-monitor-command", {"command-line": line})
            return out

        assert hmp("mce 0 10 0xbd000000000000c0 5 0 0") == "Error: Invalid MCE bank number\n"
        assert hmp("mce 0 9 0x3d000000000000c0 5 0 0") == "Error: Invalid MCE status code\n"
        assert hmp("mce 7 9 0xbd000000000000c0 5 0 0") == "Error: CPU #7 not found\n"
        assert hmp("bogus") == "Error: unknown command: 'bogus'\n"
        assert all(v.banks[1].status == 0 for v in vm.domain.vcpus)
        assert hmp("mce 0 1 0xbd000000000000c0 5 0x3000000 0x86") == ""
        line = "mce -b 1 9 0xbd000000000000c0 5 0x3000000 0x86"
        # vCPU 0 is still in its handler (QEMU would reset the guest): refused, nothing loaded
        assert "Error: not injected: vCPU 0 has not finished" in hmp(line)
        assert vm.domain.vcpus[1].banks[1].status == 0
        deadline = time.monotonic() + 5
        while vm.handled < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert "bank 9 is reported" in hmp(line)
        assert "VM status: running" in hmp("info status")
        assert "MC1_STATUS" in hmp("info mce")
        assert "mce [-b]" in hmp("help")


def test_host_path_commands(served: tuple[QmpServer, FakeVm, str]) -> None:
    _, vm, path = served
    with QmpClient(path) as c:
        r = c.execute("vmce-xen-mceinj", {"domain": 1, "page": 0x3000000, "type": 0})
        assert r["host-result"] == "recovered" and r["banks"][0]["guest-addr"] == 0x3000000
        assert r["banks"][0]["delivery"]["filled"] == [0, 1]
        deadline = time.monotonic() + 5
        while any(v.mcg_status for v in vm.domain.vcpus) and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(QmpCommandError, match="already broken"):
            c.execute("vmce-xen-mceinj", {"domain": 1, "page": 0x3000000, "type": 0})
        assert vm.domain.crashed is None
        assert c.execute("vmce-xen-mceinj", {"domain": 1, "page": 0x5000, "dump": True}) == {
            "dump": "Dom1: gaddr=0x5000",
            "injected": False,
        }
        with pytest.raises(QmpCommandError, match="gaddr exceeds max_gpa"):
            c.execute("vmce-xen-mceinj", {"domain": 1, "page": 1 << 40})
        with pytest.raises(QmpCommandError, match="domain 7 does not exist"):
            c.execute("vmce-xen-mceinj", {"domain": 7})
        r = c.execute("vmce-xen-mceinj", {"domain": 1, "page": 0x4000, "type": 2})
        assert r["delivery"] == "CMCI" and "never forwards" in r["note"]
        r = c.execute("vmce-memory-error", {"gpa": 0x2567123, "error": "srao"})
        assert r["banks"][0]["guest-addr"] == 0x2567123


def test_mce_inject_command(served: tuple[QmpServer, FakeVm, str]) -> None:
    _, _vm, path = served
    with QmpClient(path) as c:
        with pytest.raises(QmpCommandError, match=r"t\.mce:2:8: unknown keyword 'BOGUS'"):
            c.execute("vmce-mce-inject", {"text": "CPU 0\nSTATUS BOGUS\n", "source": "t.mce"})
        with pytest.raises(QmpCommandError, match="CPU 5 is not online"):
            c.execute("vmce-mce-inject", {"text": "CPU 5 BANK 1 STATUS UNCORRECTED SRAO 0xc0"})
        text = (
            "CPU 1 BANK 1 STATUS UNCORRECTED SRAO 0xc0 MCGSTATUS RIPV MCIP ADDR 0x1000 MISC 0x8c\n"
            "CPU 0 BANK 4 STATUS CORRECTED ADDR 0x2000 POLL\n"
            "CPU 0 BANK 2 STATUS UNCORRECTED SRAO 0xc0 MCGSTATUS RIPV MCIP NOBROADCAST\n"
        )
        r = c.execute("vmce-mce-inject", {"text": text})
        assert r["complete"] and r["applied"] == 3
        first, poll, nobc = r["injections"]
        assert first["targets"] == [0, 1] and first["pending"] == [1, 0]
        assert poll["pending"] == [] and any("POLL" in n for n in poll["notes"])
        assert nobc["targets"] == [0] and nobc["pending"] == [0]


def test_disconnect_mid_command(served: tuple[QmpServer, FakeVm, str]) -> None:
    srv, vm, path = served
    c = negotiated(path)
    c.send(b'{"execute": "vmce-inject", "arguments": {"status": ')  # half a command
    c.close()
    c = negotiated(path)
    c.send(
        {"execute": "vmce-inject", "arguments": {"cpus": [0, 1], "status": SRAO, "mcg-status": 5}}
    )
    c.close()  # gone before the reply
    with QmpClient(path) as again:
        # Like QEMU, the server drops a gone client's queued commands; one already executing
        # completes. Either way the injection is whole: on both vCPUs or on neither.
        time.sleep(0.3)
        assert vm.handled in (0, 2)
        assert len({v.banks[1].status for v in vm.domain.vcpus}) == 1
        assert again.execute("query-status")["running"]
    time.sleep(0.05)
    assert srv.clients == 0


def test_ten_clients_at_once(served: tuple[QmpServer, FakeVm, str]) -> None:
    srv, vm, path = served
    errors: list[BaseException] = []
    ok = [0] * 10

    def client(i: int) -> None:
        try:
            with QmpClient(path) as c:
                for _ in range(20):
                    assert c.execute("query-status")["running"]
                for _ in range(5):
                    try:
                        c.execute("vmce-inject", {"cpus": [i % 2], "status": SRAO, "mcg-status": 5})
                        ok[i] += 1
                    except QmpCommandError as e:
                        assert "has not finished" in e.desc
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    deadline = time.monotonic() + 5
    while vm.handled < sum(ok) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert vm.handled == sum(ok) > 0
    time.sleep(0.05)
    assert srv.clients == 0


def test_flood_applied_whole_or_refused(served: tuple[QmpServer, FakeVm, str]) -> None:
    _, vm, path = served
    c = negotiated(path)
    n = 500
    burst = b"".join(
        json.dumps(
            {
                "execute": "vmce-inject",
                "arguments": {"status": SRAO, "mcg-status": 5, "broadcast": True, "addr": i},
                "id": i,
            }
        ).encode()
        for i in range(n)
    )
    c.send(burst)
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < n:
        msg = c.line()
        if "event" not in msg:
            replies[msg["id"]] = msg
    applied = [i for i, r in replies.items() if "return" in r]
    refused = [r for r in replies.values() if "error" in r]
    assert applied and len(applied) + len(refused) == n
    assert all(
        r["error"]["class"] == "GenericError" and "has not finished" in r["error"]["desc"]
        for r in refused
    )
    deadline = time.monotonic() + 10
    while vm.handled < 2 * len(applied) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert vm.handled == 2 * len(applied)  # every applied injection reached both vCPUs
    assert vm.domain.vcpus[0].banks[1].addr == applied[-1]  # the last one applied is in place
    assert c.ask({"execute": "query-status"})["return"]["running"]
    c.close()


def test_slow_reader_is_dropped_others_served(
    served: tuple[QmpServer, FakeVm, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, _, path = served
    monkeypatch.setattr(server_mod, "MAX_OUTBUF", 64 << 10)
    lazy = negotiated(path)  # never reads again
    for i in range(40000):
        srv.post_event("FLOOD", {"i": i, "pad": "x" * 64})
        if i % 100 == 0 and srv.clients == 0:
            break
    deadline = time.monotonic() + 5
    while srv.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.clients == 0  # dropped: it would have made the VMM hold its output forever
    with QmpClient(path) as fresh:
        assert fresh.execute("query-status")["running"]
    lazy.close()


def test_oversized_message_ends_the_connection(served: tuple[QmpServer, FakeVm, str]) -> None:
    _srv, _, path = served
    c = negotiated(path)
    with pytest.raises(OSError):
        c.send(b'{"execute": "x", "arguments": {"a": "' + b"y" * (MAX_MESSAGE + 100))
        c.send(b"z" * (1 << 20))
    c.close()
    with QmpClient(path) as again:
        assert again.execute("query-status")["running"]


def test_quit(served: tuple[QmpServer, FakeVm, str]) -> None:
    srv, _, path = served
    with QmpClient(path) as c:
        assert c.execute("quit") == {}
        e = c.wait_event("SHUTDOWN")
        assert e["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert srv.quit_requested.wait(2)


def test_qemu_qmp_library_works_unchanged(served: tuple[QmpServer, FakeVm, str]) -> None:
    from qemu.qmp import ExecuteError, QMPClient
    from qemu.qmp.legacy import QEMUMonitorProtocol

    _, _, path = served

    async def main() -> None:
        qmp = QMPClient("vmce-test")
        await qmp.connect(path)
        assert qmp.greeting is not None
        status = await qmp.execute("query-status")
        assert status["status"] == "running"  # type: ignore[index]
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("nope")
        assert info.value.error_class == "CommandNotFound"
        out = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        assert out == "VM status: running\n"
        await qmp.execute("vmce-inject", {"cpus": [0], "status": SRAO, "mcg-status": 5, "addr": 1})
        async for event in qmp.events:
            if event["event"] == "VMCE_DELIVERED":
                assert event["data"]["cpu-index"] == 0
                break
        await qmp.disconnect()

    asyncio.run(asyncio.wait_for(main(), 20))

    legacy = QEMUMonitorProtocol(path)
    legacy.connect(negotiate=True)
    assert legacy.cmd_raw("query-status")["return"]["running"]
    assert legacy.cmd("query-vmce", **{"cpu-index": 1})["vcpus"][0]["cpu-index"] == 1
    legacy.close()
