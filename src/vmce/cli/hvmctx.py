"""``vmce hvmctx dump``: the records of an HVM context blob."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vmce.cli.output import console, emit_json, fail
from vmce.mca import MCG_CAP, MCG_EXT_CTL, MCI_CTL2
from vmce.save.hvmctx import HvmContext, HvmContextError, TypeCode, VmceVcpu

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Xen HVM context blobs (XEN_DOMCTL_gethvmcontext).",
)


def _vmce_fields(payload: bytes) -> dict[str, Any]:
    rec = VmceVcpu.from_payload(payload)
    return {
        "format": {8: "v1 (Xen 4.2)", 24: "v2 (Xen 4.3)", 32: "v3 (Xen 4.10)"}.get(
            len(payload), f"{len(payload)} bytes"
        ),
        "caps": f"{rec.caps:#x}",
        "caps_decoded": MCG_CAP.render(rec.caps),
        "mci_ctl2_bank0": f"{rec.mci_ctl2_bank0:#x}",
        "mci_ctl2_bank0_decoded": MCI_CTL2.render(rec.mci_ctl2_bank0),
        "mci_ctl2_bank1": f"{rec.mci_ctl2_bank1:#x}",
        "mci_ctl2_bank1_decoded": MCI_CTL2.render(rec.mci_ctl2_bank1),
        "mcg_ext_ctl": f"{rec.mcg_ext_ctl:#x}",
        "mcg_ext_ctl_decoded": MCG_EXT_CTL.render(rec.mcg_ext_ctl),
    }


@app.command()
def dump(
    file: Annotated[Path, typer.Argument(help="the blob", exists=False)],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """One row per record; VMCE_VCPU fields spelled out."""
    try:
        blob = file.read_bytes()
    except OSError as e:
        fail(f"{file}: {e.strerror}")
    try:
        ctx = HvmContext.decode(blob)
    except HvmContextError as e:
        fail(f"{file}: {e}")
    h = ctx.header
    rows: list[dict[str, Any]] = []
    for r in ctx.records:
        row: dict[str, Any] = {
            "offset": f"{r.offset:#x}",
            "type": r.name,
            "typecode": r.typecode,
            "instance": r.instance,
            "length": len(r.payload),
        }
        if r.typecode == TypeCode.VMCE_VCPU:
            try:
                row["vmce"] = _vmce_fields(r.payload)
            except ValueError as e:
                fail(f"{file}: offset {r.offset:#x}: {e}")
        rows.append(row)
    if as_json:
        emit_json(
            {
                "header": {
                    "magic": f"{h.magic:#x}",
                    "version": h.version,
                    "changeset": f"{h.changeset:#x}",
                    "cpuid": f"{h.cpuid:#x}",
                    "gtsc_khz": h.gtsc_khz,
                },
                "records": rows,
            }
        )
        return
    console.print(
        f"HEADER magic {h.magic:#x} version {h.version} changeset {h.changeset:#x} "
        f"cpuid {h.cpuid:#x} gtsc_khz {h.gtsc_khz}"
    )
    table = Table("offset", "type", "inst", "len", "contents")
    for row in rows:
        text = ""
        if "vmce" in row:
            v = row["vmce"]
            text = (
                f"{v['format']}: MCG_CAP {v['caps']} ({v['caps_decoded']}); "
                f"MC0_CTL2 {v['mci_ctl2_bank0']}; MC1_CTL2 {v['mci_ctl2_bank1']}; "
                f"MCG_EXT_CTL {v['mcg_ext_ctl']}"
            )
        table.add_row(row["offset"], row["type"], str(row["instance"]), str(row["length"]), text)
    console.print(table)
