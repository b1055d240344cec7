"""``vmce mce-inject check``: what each record of an mce-inject file would inject."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vmce.cli.output import console, emit_json, fail
from vmce.host.direct import plan
from vmce.host.mceinject import MceInjectSyntaxError, parse_file, resolve
from vmce.mca import MCG_STATUS, MCI_STATUS
from vmce.vmce.direct import GUEST_ERROR_BANK

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Linux mce-inject files (the language of mce-test).",
)


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="the mce-inject file")],
    cpus: Annotated[int, typer.Option(help="online vCPUs of the guest", min=1, max=4096)] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Parse FILE and show, per injection, what every vCPU's vMCE would get."""
    try:
        records = parse_file(file)
    except MceInjectSyntaxError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{file}: {e.strerror}")
    try:
        injections = resolve(records, list(range(cpus)))
    except ValueError as e:
        fail(f"{file}: {e}")
    out: list[dict[str, Any]] = []
    for inj in injections:
        loads = plan(inj)
        out.append(
            {
                "line": inj.line,
                "cpu": inj.cpu,
                "mode": inj.mode.name,
                "vcpus": [
                    {
                        "vcpu": ld.vcpu,
                        "raise_mc": ld.raise_mc,
                        "mcg_status": f"{ld.mcg_status:#x}",
                        "bank": GUEST_ERROR_BANK,
                        "source_bank": ld.source_bank,
                        "status": f"{ld.status:#x}",
                        "status_decoded": MCI_STATUS.render(ld.status),
                        "class": ld.error_class.value,
                        "addr": f"{ld.addr:#x}",
                        "misc": f"{ld.misc:#x}",
                    }
                    for ld in loads
                ],
            }
        )
    if as_json:
        emit_json({"file": str(file), "cpus": cpus, "injections": out})
        return
    if not out:
        console.print(f"{file}: no records to inject")
        return
    for inj_out in out:
        console.print(
            f"[bold]line {inj_out['line']}[/]: {inj_out['mode']} on CPU {inj_out['cpu']}",
            soft_wrap=True,
        )
        table = Table("vCPU", "#MC", "MCG_STATUS", "MC1_STATUS", "class", "ADDR", "MISC")
        for v in inj_out["vcpus"]:
            table.add_row(
                str(v["vcpu"]),
                "yes" if v["raise_mc"] else "no (poll)",
                f"{v['mcg_status']} {MCG_STATUS.render(int(v['mcg_status'], 16))}",
                f"{v['status']} {v['status_decoded']}",
                v["class"],
                v["addr"],
                v["misc"],
            )
        console.print(table)
