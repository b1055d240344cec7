"""All vmce benchmarks, one after the other: ``make bench`` (or ``python bench/run.py``).

Each benchmark prints its figures beside a baseline measured in the same run. Pass names to
run some of them: ``python bench/run.py model vmm``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Benchmark scripts in the order they run; each has ``main(argv) -> int``.
BENCHES = ["model", "vmm", "persist", "qmp", "linux"]


def load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("-")] or BENCHES
    status = 0
    for name in names:
        if not (HERE / f"{name}.py").exists():
            print(f"\n== {name}: not present in this checkout, skipped")
            continue
        print(f"\n== {name} " + "=" * (60 - len(name)))
        status |= load(name).main(["--quick"] if quick else [])  # type: ignore[attr-defined]
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
