"""``vmce stream inspect``: what a saved VM's libxc stream holds, record by record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmce.cli.output import console, emit_json, fail
from vmce.kvm.persist import describe, index_path
from vmce.save.stream import StreamError

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Xen libxc migration streams (vmce save files).",
)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="the stream file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Check a stream as a restore would; print its records, sizes and each vCPU's vMCE."""
    try:
        index = index_path(file)
    except StreamError as e:
        fail(f"{file}: {e}")
    except OSError as e:
        fail(f"{file}: {e.strerror or e}")
    report = describe(index)
    if as_json:
        emit_json(report.as_json())
        return
    for line in report.lines():
        console.print(line, markup=False, soft_wrap=True)
