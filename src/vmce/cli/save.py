"""``vmce save``: save a running VM (started with ``vmce run --control``) to a stream file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmce.cli.output import console, emit_json, fail
from vmce.kvm.qmp.client import QmpClient, QmpClientError, QmpCommandError


def save(
    file: Annotated[Path, typer.Argument(help="where to write the Xen migration stream")],
    vm: Annotated[str, typer.Option("--vm", help="the VM's control socket")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Save a running VM through its control socket; it keeps running.

    Restore it with ``vmce restore FILE``; ``vmce stream inspect FILE`` shows what is inside.
    """
    try:
        with QmpClient(vm) as client:
            reply = client.execute("vmce-save", {"path": str(file.resolve())})
    except QmpClientError as e:
        fail(f"{vm}: {e}")
    except QmpCommandError as e:
        fail(f"{vm}: the VMM refused to save: {e}")
    if as_json:
        emit_json(reply)
    else:
        console.print(f"saved to {file}: {reply}", soft_wrap=True)
