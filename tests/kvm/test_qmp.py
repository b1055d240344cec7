"""The control socket in front of a real test guest: our client, qemu.qmp, the three injection
syntaxes, the verdicts the guest reaches, and bad input that must not hurt the VM."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clihelp import start_vm, vmce
from vmce.guest.events import parse_event
from vmce.guest.testguest import GuestConfig, TestGuest, Work
from vmce.guest.verdict import Outcome, decide
from vmce.kvm.qmp import QmpClient, QmpCommandError, QmpServer
from vmce.vmce.direct import busy_vcpus

pytestmark = pytest.mark.kvm

DATA = Path(__file__).resolve().parent.parent / "data" / "mce-inject"
HMP_SRAO = "mce -b 0 9 0xbd000000000000c0 0x5 0x3000000 0x86"
TIMEOUT_PANIC = "Timeout: Not all CPUs entered broadcast exception handler"
SRAO = 0xBD000000000000C0


def guest_event(line: str) -> dict[str, Any] | None:
    e = parse_event(line)
    return None if e is None else {"kind": e.kind, **e.fields}


@dataclass
class Served:
    guest: TestGuest
    server: QmpServer
    path: str

    def client(self) -> QmpClient:
        return QmpClient(self.path)

    def settle(self, timeout: float = 5.0, *, handled: bool = False) -> None:
        """Wait until the VM stopped, or no vCPU is busy with a machine check any more (and,
        with ``handled``, every delivered #MC has its handler's ``mce-exit`` line)."""
        deadline = time.monotonic() + timeout
        quiet_since = None
        while time.monotonic() < deadline:
            vm = self.guest.vm
            if vm.machine.stop_reason is not None:
                return
            done = not busy_vcpus(vm.domain)
            if handled:
                done = done and len(self.guest.find("mce-exit")) >= len(vm.deliveries)
            if not done:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.05:
                return
            time.sleep(0.002)

    def delivered(self) -> int:
        """#MCs the VMM delivered into vCPUs (all must have been accepted)."""
        deliveries = self.guest.vm.deliveries
        assert all(d.accepted for d in deliveries)
        return len(deliveries)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(ncpus: int = 2, work: list[Work] | None = None) -> Served:
        holder: list[QmpServer] = []
        g = TestGuest(
            GuestConfig(
                ncpus=ncpus,
                work=work or [Work.KERNEL, Work.USER],
                monarch_timeout_us=200_000,
            ),
            on_line=lambda line: [s.console_line(line) for s in holder] and None,
        )
        try:
            g.boot()
            # every vCPU at its work (vCPU 1 in its user task), so the #MC context is known
            g.wait_for("work", count=ncpus)
            time.sleep(0.02)
            path = str(tmp_path / f"qmp{len(made)}.sock")
            srv = QmpServer(g.vm, path, line_parser=guest_event)
            srv.start()
        except BaseException:
            g.close()
            raise
        holder.append(srv)
        s = Served(g, srv, path)
        made.append(s)
        return s

    yield make
    for s in made:
        s.server.close()
        s.guest.close()


def hmp(c: QmpClient, line: str) -> str:
    out: str = c.execute("human-monitor-command", {"command-line": line})
    return out


# -- driving a guest ---------------------------------------------------------------------------


def test_our_client_drives_a_guest_and_hmp_banks_are_qemus(serve: Callable[..., Served]) -> None:
    s = serve()
    st = os.stat(s.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    with s.client() as c:
        assert c.greeting["QMP"]["capabilities"] == []
        assert c.execute("query-status") == {
            "running": True,
            "singlestep": False,
            "status": "running",
        }
        cpus = c.execute("query-cpus-fast")
        assert [x["cpu-index"] for x in cpus] == [0, 1] and all(x["thread-id"] for x in cpus)
        c.execute("stop")
        assert c.wait_event("STOP") and c.execute("query-status")["status"] == "paused"
        assert hmp(c, HMP_SRAO).startswith("vmce: bank 9 is reported in guest bank 1")
        # What QEMU documents for `mce -b`: the error in the named CPU's bank (here bank 1),
        # VAL|UC and MCIP|RIPV in every other CPU's bank 1.
        v0, v1 = c.execute("query-vmce")["vcpus"]
        assert v0["mcg-status"] == 0x5 and v1["mcg-status"] == 0x5
        assert (v0["banks"][1]["status"], v0["banks"][1]["addr"], v0["banks"][1]["misc"]) == (
            SRAO,
            0x3000000,
            0x86,
        )
        assert (v1["banks"][1]["status"], v1["banks"][1]["addr"], v1["banks"][1]["misc"]) == (
            0xA000000000000000,
            0,
            0,
        )
        assert v0["banks"][0]["status"] == v1["banks"][0]["status"] == 0
        c.execute("cont")
        c.wait_event("RESUME")
        delivered = {c.wait_event("VMCE_DELIVERED")["data"]["cpu-index"] for _ in range(2)}
        assert delivered == {0, 1}
        mf = c.wait_event("CONSOLE", match=None, timeout=10)
        while (mf["data"].get("guest-event") or {}).get("kind") != "memory-failure":
            mf = c.wait_event("CONSOLE", timeout=10)
        assert mf["data"]["guest-event"]["pfn"] == 0x3000
        assert mf["data"]["guest-event"]["result"] == "Recovered"
        regs = hmp(c, "info registers")
        assert "RIP=" in regs and "CR4=" in regs and "MC1_STATUS=" in regs
        assert "CPU #1: thread_id=" in hmp(c, "info cpus")
        assert c.execute("query-status")["running"]


def test_qemu_qmp_drives_a_guest(serve: Callable[..., Served]) -> None:
    from qemu.qmp import QMPClient
    from qemu.qmp.legacy import QEMUMonitorProtocol

    s = serve()

    async def main() -> list[str]:
        qmp = QMPClient("vmce")
        await qmp.connect(s.path)
        out = await qmp.execute("human-monitor-command", {"command-line": HMP_SRAO})
        assert "bank 1" in str(out)
        seen = []
        async for event in qmp.events:
            seen.append(event["event"])
            ge = event.get("data", {}).get("guest-event") or {}
            if ge.get("kind") == "memory-failure":
                assert ge["result"] == "Recovered"
                break
        await qmp.disconnect()
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 20))
    assert {"VMCE_FILLED", "VMCE_DELIVERED", "MEMORY_FAILURE", "CONSOLE"} <= set(seen)
    legacy = QEMUMonitorProtocol(s.path)
    legacy.connect(negotiate=True)
    assert legacy.cmd("query-status")["status"] == "running"
    legacy.close()


def test_hmp_mce_without_broadcast_times_out_the_rendezvous(serve: Callable[..., Served]) -> None:
    s = serve()
    with s.client() as c:
        assert hmp(c, "mce 0 9 0xbd000000000000c0 0x5 0x3000000 0x86").startswith("vmce:")
        panic = c.wait_event("GUEST_PANICKED", timeout=10)
        assert panic["data"]["message"] == TIMEOUT_PANIC
        down = c.wait_event("SHUTDOWN", timeout=10)
        assert down["data"]["guest"] is True and down["data"]["reason"] == "guest-panic"
        assert c.execute("query-status")["status"] == "guest-panicked"
        assert hmp(c, HMP_SRAO).startswith("Error: the VM is not running")
        with pytest.raises(QmpCommandError, match="the VM is not running"):
            c.execute("vmce-inject", {"status": SRAO, "mcg-status": 5})


# -- mce-inject files ------------------------------------------------------------------------

#: file -> (outcome, the verdict's reason, text the guest's console must show)
DIRECT: dict[str, tuple[Outcome, str, str]] = {
    "srao_mem_scrub": (
        Outcome.RECOVERED,
        "Memory failure: 0x1234: recovery action for free buddy page: Recovered",
        "Action optional: memory scrubbing error",
    ),
    "srao_ewb_all_fields": (
        Outcome.RECOVERED,
        "Memory failure: 0x2000: recovery action for free buddy page: Recovered",
        "Action optional: last level cache writeback error",
    ),
    "hold_two_cpus": (  # both CPUs recover; which one prints last varies
        Outcome.RECOVERED,
        "",
        "Memory failure: 0x2100: recovery action for free buddy page: Recovered\n",
    ),
    "srar_user_kernel_log": (
        Outcome.RECOVERED,
        "Memory failure: 0x3000: recovery action for dirty LRU page: Recovered",
        "Action required: data load error in a user process",
    ),
    "fatal": (Outcome.PANIC, "Fatal machine check", "Processor context corrupt"),
    "fatal_no_en": (Outcome.PANIC, "Fatal machine check from unknown source", ""),
    "uc_no_mcip": (Outcome.PANIC, "Fatal machine check", "MCIP not set in MCA handler"),
    "lmce_seam_nr": (
        Outcome.PANIC,
        "Fatal local machine check",
        "Data load in unrecoverable area of kernel",
    ),
    "srar_nobroadcast": (Outcome.PANIC, TIMEOUT_PANIC, "CPUs not responding to MCE broadcast"),
    "ucna_poll": (Outcome.RUNNING, "", ""),
    "corrected_over": (Outcome.RUNNING, "", ""),
}


def run_file(s: Served, name: str, path: str = "direct", force: bool = False) -> dict[str, Any]:
    with s.client() as c:
        args: dict[str, Any] = {"text": (DATA / name).read_text(), "source": name, "path": path}
        if force:
            args["force"] = True
        r: dict[str, Any] = c.execute("vmce-mce-inject", args)
    s.settle(handled=True)
    return r


def verdict(s: Served) -> Any:
    g = s.guest
    return decide(g.lines, g.events, g.vm.machine.stop_reason, injected=bool(g.vm.deliveries))


def test_sample_files_cover_the_directory() -> None:
    assert sorted(DIRECT) == sorted(p.name for p in DATA.iterdir())


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_mce_inject_file_direct(serve: Callable[..., Served], name: str) -> None:
    s = serve()
    r = run_file(s, name)
    assert r["complete"], r
    outcome, reason, text = DIRECT[name]
    v = verdict(s)
    assert v.outcome is outcome, s.guest.text()[-1500:]
    if name == "hold_two_cpus":
        assert "Memory failure: 0x2200: recovery action for free buddy page: Recovered" in (
            s.guest.lines
        )
    else:
        assert v.reason == reason, s.guest.text()[-1500:]
    assert text in s.guest.text() + "\n"
    if outcome is Outcome.RUNNING:  # POLL: filled, never raised; the guest never polls
        (inj,) = r["injections"]
        assert inj["pending"] == [] and not s.guest.vm.deliveries
        bank = s.guest.vm.domain.vcpus[0].banks[1]
        assert bank.status == inj["loaded"][0]["status"] != 0


HOST: dict[str, tuple[Outcome, str]] = {
    # Xen's host path decides who gets what: the error always lands on vCPU0 (broadcast).
    "srao_mem_scrub": (
        Outcome.RECOVERED,
        "Memory failure: 0x1234: recovery action for free buddy page: Recovered",
    ),
    # CPU 1 runs the user task, but Xen reports the error on vCPU0, in kernel code.
    "srar_user_kernel_log": (Outcome.PANIC, "Fatal machine check"),
    # PCC: the host itself panics; nothing reaches the guest.
    "fatal": (Outcome.RUNNING, ""),
    # Polled errors are logged for dom0, never forwarded.
    "ucna_poll": (Outcome.RUNNING, ""),
}


@pytest.mark.parametrize("name", sorted(HOST))
def test_mce_inject_file_host_path(serve: Callable[..., Served], name: str) -> None:
    s = serve()
    r = run_file(s, name, "host")
    assert r["complete"], r
    v = verdict(s)
    assert (v.outcome, v.reason) == HOST[name], s.guest.text()[-1500:]
    if name == "fatal":
        assert r["injections"][0]["host"][0]["host-panics"] is True


def test_host_path_refuses_what_would_crash_the_domain(serve: Callable[..., Served]) -> None:
    s = serve()
    with pytest.raises(QmpCommandError, match="2 error records in one machine check"):
        run_file(s, "hold_two_cpus", "host")
    assert not s.guest.vm.deliveries and s.guest.vm.domain.crashed is None
    run_file(s, "hold_two_cpus", "host", force=True)  # Xen's behaviour, asked for
    assert s.guest.vm.domain.crashed is not None
    assert "has not handled the previous vMCE" in s.guest.vm.domain.crashed.reason


def test_xen_mceinj_reaches_the_guest_at_its_own_address(serve: Callable[..., Served]) -> None:
    s = serve()
    with s.client() as c:
        r = c.execute("vmce-xen-mceinj", {"domain": 1, "page": 0x3000000, "type": 0})
        assert r["host-result"] == "recovered" and r["type"] == "MCE_SRAO_MEM"
    mce = s.guest.wait_for("mce")[0]
    assert mce.int("status") == 0xBD2000000000017A and mce.int("addr") == 0x3000000
    assert mce.int("bank") == 1 and mce.int("misc") == 0x86
    mf = s.guest.wait_for("memory-failure")[0]
    assert mf.int("pfn") == 0x3000 and mf.str("result") == "Recovered"


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_leaves_the_vm_running(serve: Callable[..., Served]) -> None:
    s = serve()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect(s.path)
    f = raw.makefile("rb")
    assert "QMP" in json.loads(f.readline())

    def ask(data: bytes) -> dict[str, Any]:
        raw.sendall(data)
        while True:
            msg: dict[str, Any] = json.loads(f.readline())
            if "event" not in msg:
                return msg

    r = ask(b'{"execute": "human-monitor-command", "id": 1}')
    assert (
        r["error"]["class"] == "CommandNotFound"
        and "Expecting capabilities" in (r["error"]["desc"])
    )
    assert ask(b'{"execute": "qmp_capabilities"}') == {"return": {}}
    assert "JSON parse error" in ask(b'{"execute": "query-status",,}')["error"]["desc"]
    assert ask(b'{"execute": "launch-missiles", "id": 2}')["error"]["class"] == "CommandNotFound"
    r = ask(b'{"execute": "vmce-inject", "arguments": {"status": true, "mcg-status": 5}}')
    assert r["error"]["desc"] == "Invalid parameter type for 'status', expected: integer"
    r = ask(b'{"execute": "vmce-memory-error", "arguments": {"gpa": 1099511627776}}')
    assert "outside the guest" in r["error"]["desc"]
    raw.sendall(b'{"execute": "human-monitor-command", "arguments": {"command-line": "mce -b')
    f.close()
    raw.close()  # gone mid-command
    with s.client() as c:
        assert c.execute("query-status")["running"]
    assert s.guest.vm.machine.stop_reason is None and not s.guest.vm.deliveries


def test_ten_clients_and_a_flood(serve: Callable[..., Served]) -> None:
    s = serve()
    applied = [0] * 10
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with s.client() as c:
                for j in range(10):
                    assert c.execute("query-status")["running"]
                    out = hmp(c, f"mce -b {i % 2} 9 {SRAO:#x} 5 {(0x1000 + i * 16 + j) << 12} 0x86")
                    if out.startswith("Error:"):
                        assert "has not finished the previous machine check" in out, out
                    else:
                        applied[i] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    s.settle()
    assert sum(applied) > 0 and s.delivered() == 2 * sum(applied)

    # A flood: 500 injections in one burst; each is applied whole or refused.
    before = s.delivered()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(s.path)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b'{"execute": "qmp_capabilities"}')
    burst = b"".join(
        json.dumps(
            {
                "execute": "vmce-inject",
                "arguments": {
                    "status": SRAO,
                    "mcg-status": 5,
                    "addr": (0x1000 + i % 64) << 12,
                    "misc": 0x86,
                    "broadcast": True,
                },
                "id": i,
            }
        ).encode()
        for i in range(500)
    )
    raw.sendall(burst)
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < 500:
        msg = json.loads(f.readline())
        if "id" in msg:
            replies[msg["id"]] = msg
    f.close()
    raw.close()
    ok = [r for r in replies.values() if "return" in r]
    refused = [r for r in replies.values() if "error" in r]
    assert ok and len(ok) + len(refused) == 500
    assert all("has not finished" in r["error"]["desc"] for r in refused)
    s.settle()
    assert s.delivered() - before == 2 * len(ok)  # every applied injection reached both vCPUs
    # The VM runs on. (Its guest may not: a vCPU is injectable again as soon as its handler
    # clears MCIP, as on hardware, and the test guest still prints a line after that, so a #MC
    # can land in its handler's tail and re-enter it on the same IST stack.)
    assert s.guest.vm.machine.stop_reason is None and not busy_vcpus(s.guest.vm.domain)
    with s.client() as c:
        assert c.execute("query-status")["running"]


# -- as a user does it: vmce run --control in one shell, vmce inject in another ---------------


def test_vmce_run_control_and_vmce_inject(tmp_path: Path) -> None:
    sock = str(tmp_path / "vm.sock")
    run = start_vm(sock, "--vcpus", "2")
    try:
        r = vmce("inject", "--vm", sock, "--xen", "-d", "1", "-p", "0x3000000", "-t", "0")
        assert r.returncode == 0, r.stderr
        assert "vMCE injected (broadcast)" in r.stdout
        r = vmce(
            "inject",
            "--vm",
            sock,
            "--hmp",
            "mce -b 0 9 0xbd000000000000c0 0x5 0x2000000 0x86",
            "--watch",
            "--for",
            "1",
        )
        assert r.returncode == 0, r.stderr
        assert "VMCE_DELIVERED cpu-index=0 accepted=True" in r.stdout
        assert "Memory failure: 0x2000: recovery action for free buddy page: Recovered" in r.stdout
        r = vmce("inject", "--vm", sock, str(DATA / "srao_mem_scrub"))
        assert r.returncode == 0, r.stderr
        assert "line 3: EXCP on CPU 0: bank 1 of vCPU0, vCPU1; #MC on vCPU0, vCPU1" in r.stdout
        time.sleep(0.3)
        r = vmce("inject", "--vm", sock, "--hmp", "mce 0 10 0xbd000000000000c0 5 0 0")
        assert r.returncode == 1 and "Error: Invalid MCE bank number" in r.stdout
        r = vmce("inject", "--vm", sock, "--xen", "-t", "9")
        assert r.returncode == 2 and "no error type 9" in r.stderr
        with QmpClient(sock) as c:
            c.execute("quit")
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    data = json.loads(out)
    assert data["verdict"] == "recovered"
    assert "quit requested on the control socket" in data["stop_reason"]
    assert len(data["deliveries"]) == 6 and all(d["accepted"] for d in data["deliveries"])
    assert not os.path.exists(sock)
    r = vmce("inject", "--vm", sock, "--query")
    assert r.returncode == 3 and "cannot connect" in r.stdout
