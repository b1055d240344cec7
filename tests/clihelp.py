"""Running the ``vmce`` command as a user would, for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def vmce(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``vmce ARGS`` in a subprocess: its exit status, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "vmce.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_vm(sock: str, *args: str, wait: float = 30) -> subprocess.Popen[str]:
    """``vmce run --control SOCK ARGS`` in the background, returned once the socket is up."""
    run = subprocess.Popen(
        [sys.executable, "-m", "vmce.cli.main", "run", *args, "--control", sock, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + wait
    while not os.path.exists(sock):
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            out, err = run.communicate()
            raise AssertionError(f"vmce run --control did not come up:\n{out}\n{err}")
        time.sleep(0.05)
    return run
