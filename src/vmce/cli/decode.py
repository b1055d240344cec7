"""``vmce decode``: a register value, field by field, for people or scripts."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from vmce.cli.output import console, emit_json, fail, parse_u64
from vmce.mca import REGISTERS, ErrorClass, classify, mcacod_kind
from vmce.mca.classify import address_is_physical
from vmce.mca.constants import MCI_STATUS_MSCOD_FILTER

KINDS = ", ".join(REGISTERS)


def decode(
    value: Annotated[str, typer.Argument(help="the register value (C syntax: 0x..., 017, 42)")],
    kind: Annotated[str, typer.Option("--kind", "-k", help=f"register: {KINDS}")] = "status",
    misc: Annotated[
        str | None, typer.Option(help="MCi_MISC, to say whether a status' address is physical")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Decode an MCA register value into its fields (default: MCi_STATUS)."""
    reg = REGISTERS.get(kind)
    if reg is None:
        fail(f"unknown --kind {kind!r} (expected one of: {KINDS})")
    v = parse_u64(value)
    fields = reg.decode(v)
    data: dict[str, Any] = {
        "register": reg.name,
        "value": f"{v:#x}",
        "render": reg.render(v),
        "fields": {k: n for k, n in fields.items() if k != "RSVD" or n},
    }
    if reg.name == "MCi_STATUS":
        cls = classify(v)
        data["class"] = cls.value
        data["class_text"] = cls.description
        if cls is not ErrorClass.INVALID:
            data["mcacod_kind"] = mcacod_kind(v).name.lower()
        data["guest_value"] = f"{v & MCI_STATUS_MSCOD_FILTER:#x}"
        if misc is not None:
            data["address_physical"] = address_is_physical(v, parse_u64(misc, "--misc"))
    if as_json:
        emit_json(data)
        return
    console.print(f"[bold]{reg.name}[/] = {v:#018x}   {data['render']}", soft_wrap=True)
    table = Table("field", "bits", "value", "meaning", box=None, pad_edge=False)
    for f in sorted(reg.fields, key=lambda f: -f.lo):
        hi = f.lo + f.width - 1
        bits = f"{f.lo}" if f.width == 1 else f"{hi}:{f.lo}"
        n = fields[f.name]
        table.add_row(
            f.name, bits, f"{n:#x}" if f.width > 1 else str(n), f.doc, style=None if n else "dim"
        )
    if fields["RSVD"]:
        table.add_row("RSVD", "-", f"{fields['RSVD']:#x}", "reserved bits set", style="yellow")
    console.print(table)
    if "class" in data:
        console.print(f"class: [bold]{data['class']}[/] ({data['class_text']})")
        if "mcacod_kind" in data:
            console.print(f"MCACOD: {data['mcacod_kind'].replace('_', ' ')}")
        console.print(f"as a guest sees it (MSCOD masked): {data['guest_value']}")
        if "address_physical" in data:
            console.print(f"address physical: {data['address_physical']}")
