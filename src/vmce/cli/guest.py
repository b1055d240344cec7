"""``vmce guest``: prepare guest material (the test guest's build, Debian Linux's packages)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from vmce.cli.output import console, emit_json, fail
from vmce.guest import testguest
from vmce.guest.linux.debs import MaterialError
from vmce.guest.linux.material import prepare

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Guest material: built once, cached outside the repository.",
)


@app.command()
def linux(
    kernel: Annotated[Path | None, typer.Option(help="a linux-image-*-amd64 .deb to use")] = None,
    busybox: Annotated[Path | None, typer.Option(help="a busybox-static .deb to use")] = None,
    refresh: Annotated[bool, typer.Option(help="download and build again")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Fetch the pinned Debian kernel and busybox, build the initramfs, cache them."""
    try:
        m = prepare(kernel, busybox, refresh=refresh)
    except MaterialError as e:
        fail(str(e))
    data = {
        "directory": str(m.directory),
        "vmlinuz": str(m.vmlinuz),
        "initramfs": str(m.initramfs),
        **asdict(m.manifest),
    }
    if as_json:
        emit_json(data)
        return
    for k, v in data.items():
        console.print(f"{k:>18}: {v}", soft_wrap=True)


@app.command("test")
def test_guest(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Build the vmce test guest (C and assembly) into the cache."""
    try:
        path = testguest.build()
    except testguest.BuildError as e:
        fail(str(e))
    if as_json:
        emit_json({"elf": str(path)})
    else:
        console.print(f"test guest: {path}", soft_wrap=True)
