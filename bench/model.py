"""vmce benchmarks: one command (``make bench``), figures and ratios against baselines
measured in the same run.

Targets (from the issues): vMCE MSR dispatch within 3x of a bare dict lookup plus call.
"""

from __future__ import annotations

import argparse
import struct
import sys
import timeit
from collections.abc import Callable

from vmce.save.hvmctx import HvmContext
from vmce.vmce import Domain, HostProfile

Result = tuple[str, float, float]


def per_call(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Best seconds per call of ``fn`` over ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def bench_msr_dispatch(n: int) -> list[Result]:
    dom = Domain(HostProfile.intel(), 4)
    table: dict[int, Callable[[object], int]] = {0x405: lambda v: 0}
    vcpu = dom.vcpus[0]

    def baseline() -> object:
        return table[0x405](vcpu)

    base = per_call(baseline, n)
    out: list[Result] = []
    for name, msr in (
        ("rdmsr MCG_STATUS", 0x17A),
        ("rdmsr MC1_STATUS", 0x405),
        ("rdmsr MCG_CAP", 0x179),
        ("rdmsr MC0_CTL", 0x400),
    ):
        t = per_call(lambda m=msr: dom.rdmsr(0, m), n)  # type: ignore[misc]
        out.append((name, t, t / base))
    for name, msr, val in (
        ("wrmsr MCG_STATUS", 0x17A, 0),
        ("wrmsr MC1_STATUS", 0x405, 0),
        ("wrmsr MC1_CTL2", 0x281, 0x40000001),
    ):
        t = per_call(lambda m=msr, x=val: dom.wrmsr(0, m, x), n)  # type: ignore[misc]
        out.append((name, t, t / base))
    out.insert(0, ("baseline: dict lookup + call", base, 1.0))
    return out


def bench_hvmctx(n: int) -> list[Result]:
    dom = Domain(HostProfile.intel(), 8)
    ctx = HvmContext.from_domain(dom)
    blob = ctx.encode()
    values = [v for r in ctx.records for v in struct.unpack("<QQQQ", r.payload)]
    flat = struct.Struct("<" + "Q" * len(values))

    base = per_call(lambda: flat.pack(*values), n)
    enc = per_call(ctx.encode, n)
    dec = per_call(lambda: HvmContext.decode(blob), n)
    return [
        (f"baseline: struct.pack of the same {len(blob)} bytes", base, 1.0),
        ("HVM context encode (8 vCPUs)", enc, enc / base),
        ("HVM context decode (8 vCPUs)", dec, dec / base),
    ]


def show(title: str, rows: list[Result]) -> None:
    print(f"\n{title}")
    for name, secs, ratio in rows:
        rate = 1 / secs if secs else float("inf")
        print(f"  {name:<46} {secs * 1e9:9.0f} ns  {rate / 1e6:7.2f} M/s  {ratio:6.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args(argv)
    n = 20_000 if args.quick else 200_000
    msr = bench_msr_dispatch(n)
    show("vMCE MSR dispatch (per access; ratio to the baseline)", msr)
    show("HVM context (per blob; ratio to the baseline)", bench_hvmctx(n // 20))
    worst = max(r for _, _, r in msr[1:])
    verdict = "met" if worst <= 3.0 else "MISSED"
    print(f"\ntarget: MSR dispatch within 3x of the baseline: worst {worst:.2f}x -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
