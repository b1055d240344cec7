"""vmce run --control, vmce save, vmce stream inspect, vmce restore: a user's round trip."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from clihelp import start_vm, vmce
from vmce.kvm.qmp.client import QmpClient

pytestmark = pytest.mark.kvm


def test_save_inspect_restore_from_the_command_line(tmp_path: Path) -> None:
    sock, stream = str(tmp_path / "vm.sock"), tmp_path / "guest.xen"
    run = start_vm(sock, "--vcpus", "2", "--work", "user")
    try:
        time.sleep(0.3)
        r = vmce("save", str(stream), "--vm", sock, "--json")
        assert r.returncode == 0, r.stderr
        assert stream.exists() and stream.stat().st_size > 64 << 20
        with QmpClient(sock) as c:
            c.execute("quit")
        run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    r = vmce("stream", "inspect", str(stream), "--json")
    assert r.returncode == 0, r.stderr
    assert "VMCE_VCPU" in r.stdout
    r = vmce("restore", str(stream), "--timeout", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    counters = data["work_counters"]
    assert all(
        now > saved > 0 for now, saved in zip(counters["now"], counters["saved"], strict=True)
    ), counters
    bad = tmp_path / "bad.xen"
    bad.write_bytes(stream.read_bytes()[:100])
    r = vmce("restore", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "offset" in r.stderr
    r = vmce("save", str(tmp_path / "x.xen"), "--vm", str(tmp_path / "nobody.sock"))
    assert r.returncode == 2 and "nobody.sock" in r.stderr
