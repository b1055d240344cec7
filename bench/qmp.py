"""Control-socket benchmarks: QMP commands per second, and injection latency from the command
to the guest's #MC handler, beside one MSR-exit round trip measured in the same VM.

One test guest (2 vCPUs: kernel work, user work) with the QMP server in this process; the
client is vmce's synchronous client over the unix socket.

* Commands/s: ``query-status`` one at a time (send, wait for the reply), then pipelined (all
  sent at once; the server keeps at most 8 in flight per client).
* Injection latency: ``vmce-inject`` (QEMU's ``mce -b`` record, broadcast) from the moment
  the client sends it to (a) the reply, (b) vCPU 0's first MCG_STATUS read in its handler and
  (c) the last vCPU's, taken from the VMM's MSR trace.
* MSR-exit round trip: in the same handlers, the time between two vMCE MSR reads of one
  vCPU that the handler makes a few instructions apart (MC0_STATUS then MC1_STATUS, MC1_ADDR
  then MC1_MISC): one exit to the VMM, the model's answer, re-entry and those instructions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from vmce.guest.testguest import GuestConfig, TestGuest, Work
from vmce.kvm.qmp import QmpClient, QmpServer
from vmce.kvm.vmcevm import MsrAccess
from vmce.vmce.direct import busy_vcpus

MCG_STATUS = 0x17A
#: Reads the handler makes a few instructions apart: MC0_STATUS then MC1_STATUS (its bank
#: loop), MC1_ADDR then MC1_MISC. The time between them is one MSR-exit round trip.
ADJACENT_READS = {(0x401, 0x405), (0x406, 0x407)}
SRAO = 0xBD000000000000C0


def commands_per_second(c: QmpClient, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(n):
        c.execute("query-status")
    sync = n / (time.perf_counter() - t0)
    burst = b"".join(
        json.dumps({"execute": "query-status", "id": f"p{i}"}).encode() for i in range(n)
    )
    t0 = time.perf_counter()
    c.send_raw(burst)
    c.wait_reply(f"p{n - 1}", timeout=60)  # replies come in order
    pipelined = n / (time.perf_counter() - t0)
    return sync, pipelined


def injection_latency(
    g: TestGuest, c: QmpClient, rounds: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per round: (reply, vCPU0 handler, last vCPU handler) seconds after the send, and every
    gap between consecutive MSR exits of one vCPU inside the handlers."""
    trace: list[MsrAccess] = []
    g.vm.msr_trace = trace.append  # the server chains its own hook in front of this one
    replies: list[float] = []
    first0: list[float] = []
    last: list[float] = []
    gaps: list[float] = []
    for r in range(rounds):
        _wait_idle(g)
        trace.clear()
        args = {
            "status": SRAO,
            "mcg-status": 5,
            "addr": (0x1000 + r % 64) << 12,
            "misc": 0x86,
            "broadcast": True,
        }
        t0 = time.monotonic()
        c.execute("vmce-inject", args)
        replies.append(time.monotonic() - t0)
        _wait_idle(g)
        firsts = {}
        for a in trace:
            if a.msr == MCG_STATUS and not a.write:
                firsts.setdefault(a.vcpu_id, a.time)
        first0.append(firsts[0] - t0)
        last.append(max(firsts.values()) - t0)
        for vid in firsts:
            mine = [a for a in trace if a.vcpu_id == vid]
            gaps += [
                y.time - x.time
                for x, y in itertools.pairwise(mine)
                if not x.write and not y.write and (x.msr, y.msr) in ADJACENT_READS
            ]
    return replies, first0, last, gaps


def _wait_idle(g: TestGuest) -> None:
    deadline = time.monotonic() + 10
    while busy_vcpus(g.vm.domain) and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)  # past the server's settle window


def run(work: list[Work], n: int, rounds: int) -> tuple[float, float, list[tuple[str, float]], int]:
    """(sync/s, pipelined/s, latency rows, gaps measured) with the vCPUs doing ``work``."""
    cfg = GuestConfig(ncpus=2, work=work)
    with tempfile.TemporaryDirectory() as d, TestGuest(cfg) as g:
        g.boot()
        server = QmpServer(g.vm, str(Path(d) / "qmp.sock"))
        server.start()
        try:
            with QmpClient(str(server.path)) as c:
                sync, pipelined = commands_per_second(c, n)
                replies, first0, last, gaps = injection_latency(g, c, rounds)
        finally:
            server.close()
    rows = [
        ("baseline: one MSR-exit round trip", statistics.median(gaps)),
        ("command -> reply", statistics.median(replies)),
        ("command -> vCPU 0's handler (MCG_STATUS)", statistics.median(first0)),
        ("command -> last vCPU's handler", statistics.median(last)),
    ]
    return sync, pipelined, rows, len(gaps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    n = 500 if args.quick else 3000
    rounds = 10 if args.quick else 50
    for title, work in (
        ("vCPUs halted (cores free for the server)", [Work.IDLE, Work.IDLE]),
        ("vCPUs spinning (kernel and user loops: both host cores busy)", [Work.KERNEL, Work.USER]),
    ):
        sync, pipelined, rows, ngaps = run(work, n, rounds)
        rt = rows[0][1]
        print(f"\n{title}; QMP over a unix socket, {n} commands:")
        print(
            f"  query-status, one at a time      {sync:8.0f} commands/s  {1e6 / sync:7.1f} us each"
        )
        print(f"  query-status, pipelined          {pipelined:8.0f} commands/s")
        print(f"  injection latency (vmce-inject, broadcast), median of {rounds}:")
        for name, t in rows:
            print(f"    {name:<42} {t * 1e6:8.0f} us  {t / rt:7.1f}x")
        print(f"    (round trip: median of {ngaps} adjacent MSR reads inside the handlers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
