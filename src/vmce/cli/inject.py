"""``vmce inject``: inject into a running VM over its control socket, in a syntax people know.

One of:

* ``vmce inject --vm SOCK FILE``: an mce-inject file (the mce-test suite's language);
  ``--path host`` sends its records through the host memory-error path instead of loading
  them directly into the vCPUs' banks;
* ``vmce inject --vm SOCK --hmp "mce -b 0 9 0xbd000000000000c0 0x5 0x3000000 0x86"``: a QEMU
  monitor line (``info registers``, ``info mce``, ``stop``, ``cont`` work too);
* ``vmce inject --vm SOCK --xen -d 1 -p 0x3000000 -t 0``: xen-mceinj's options (its option
  bugs fixed; ``--xen -h`` prints its help and error table);
* ``vmce inject --vm SOCK --query``: the vCPUs' vMCE state.

``--watch`` then prints the VM's events (guest console, vMCE filled and delivered, panic,
shutdown) until ``--for`` seconds pass or the VM shuts down. ``--json`` prints the raw QMP
replies and events. Exit status: 0 done, 1 the VMM refused (or applied only part of a file),
2 bad input (nothing was sent), 3 no VMM at that socket.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vmce.cli.output import console, fail
from vmce.host.hmp import HmpError
from vmce.host.hmp import parse as parse_hmp
from vmce.host.mceinject import MceInjectSyntaxError, parse
from vmce.host.xenmceinj import USAGE, XenMceInj, XenMceInjError, parse_args, table_text
from vmce.kvm.qmp.client import QmpClient, QmpClientError, QmpCommandError

EXIT_REFUSED = 1
EXIT_NO_VMM = 3


def inject(
    ctx: typer.Context,
    vm: Annotated[str, typer.Option("--vm", help="the VM's control socket (vmce run --control)")],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="an mce-inject FILE, or with --xen: xen-mceinj's options"),
    ] = None,
    hmp: Annotated[str | None, typer.Option(help="a QEMU monitor line, e.g. 'mce 0 9 ...'")] = None,
    xen: Annotated[bool, typer.Option("--xen", help="ARGS are xen-mceinj's options")] = False,
    path: Annotated[
        str, typer.Option(help="mce-inject records: direct (into the vCPUs' banks) or host")
    ] = "direct",
    query: Annotated[bool, typer.Option(help="print every vCPU's vMCE state")] = False,
    force: Annotated[
        bool, typer.Option(help="host path: inject even where Xen would crash the domain")
    ] = False,
    watch: Annotated[bool, typer.Option(help="then print the VM's events")] = False,
    seconds: Annotated[
        float | None, typer.Option("--for", help="with --watch: stop after this many seconds")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print QMP replies and events as JSON")
    ] = False,
) -> None:
    """Inject a machine check into a running VM (mce-inject file, QEMU HMP line or xen-mceinj
    options) and optionally watch the guest's reaction."""
    words = list(args or []) + list(ctx.args)
    request = _request(words, hmp, xen, path, force, query)
    if request is None:  # xen-mceinj -h
        sys.stdout.write(USAGE + table_text())
        return
    command, arguments = request
    try:
        client = QmpClient(vm)
    except (QmpClientError, TimeoutError) as e:
        console.print(f"vmce: error: {e}", markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_NO_VMM) from None
    t0 = time.monotonic()
    status = 0
    with client:
        try:
            result = client.execute(command, arguments)
        except QmpCommandError as e:
            _say(f"refused: {e.desc}", as_json, {"error": {"class": e.error_class, "desc": e.desc}})
            status = EXIT_REFUSED
        except (QmpClientError, TimeoutError) as e:
            console.print(f"vmce: error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(EXIT_NO_VMM) from None
        else:
            status = _show(command, result, as_json)
        if watch:
            _watch(client, t0, seconds, as_json)
    if status:
        raise typer.Exit(status)


def _request(
    words: list[str], hmp: str | None, xen: bool, path: str, force: bool, query: bool
) -> tuple[str, dict[str, Any]] | None:
    """The QMP command for what the user asked, checked locally first (exit 2 on bad input)."""
    chosen = sum([hmp is not None, xen, query, bool(words) and not xen])
    if chosen != 1:
        fail("give exactly one of: an mce-inject FILE, --hmp LINE, --xen OPTIONS, --query")
    if query:
        return "query-vmce", {}
    if hmp is not None:
        try:
            parse_hmp(hmp)
        except HmpError as e:
            fail(f"--hmp: {e}")
        return "human-monitor-command", {"command-line": hmp}
    if xen:
        if len(words) == 1 and " " in words[0]:
            words = shlex.split(words[0])
        try:
            opts = parse_args(words)
        except XenMceInjError as e:
            fail(f"xen-mceinj: {e}")
        if opts.help:
            return None
        return "vmce-xen-mceinj", _xen_arguments(opts, force)
    if path not in ("direct", "host"):
        fail(f"--path {path!r}: expected direct or host")
    if len(words) != 1:
        fail("give one mce-inject file")
    file = Path(words[0])
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        fail(f"{file}: {e.strerror}")
    try:
        parse(text, str(file))
    except MceInjectSyntaxError as e:
        fail(str(e))
    args: dict[str, Any] = {"text": text, "source": str(file), "path": path}
    if force:
        args["force"] = True
    return "vmce-mce-inject", args


def _xen_arguments(opts: XenMceInj, force: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "domain": opts.domid,
        "cpu": opts.cpu,
        "page": opts.addr,
        "type": opts.type,
        "lmce": opts.lmce,
        "dump": opts.dump,
    }
    if force:
        args["force"] = True
    return args


def _say(text: str, as_json: bool, data: Any) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()


def _show(command: str, result: Any, as_json: bool) -> int:
    """Print a command's result; the exit status it implies."""
    if as_json:
        _say("", True, {"return": result})
    if command == "human-monitor-command":
        text = str(result)
        if not as_json and text:
            sys.stdout.write(text)
        return EXIT_REFUSED if text.startswith("Error:") else 0
    if as_json:
        return 0 if result.get("complete", True) else EXIT_REFUSED
    if command == "query-vmce":
        for v in result["vcpus"]:
            b = v["banks"][1]
            _say(
                f"vCPU {v['cpu-index']}: MCG_STATUS={v['mcg-status']:#x} "
                f"MC1_STATUS={b['status']:#018x} MC1_ADDR={b['addr']:#x} MC1_MISC={b['misc']:#x}"
                f"{' (#MC pending)' if v['mce-pending'] else ''}",
                False,
                None,
            )
        return 0
    if command == "vmce-xen-mceinj":
        if "dump" in result:
            _say(result["dump"], False, None)
            return 0
        _say(result.get("text") or result.get("note", ""), False, None)
        return 0
    for inj in result["injections"]:
        head = f"line {inj['line']}: {inj['mode']} on CPU {inj['cpu']}"
        if not inj["applied"]:
            _say(f"{head}: not injected: {inj.get('reason', '')}", False, None)
            continue
        if "loaded" in inj:
            who = ", ".join(f"vCPU{x['cpu-index']}" for x in inj["loaded"])
            mc = ", ".join(f"vCPU{v}" for v in inj["pending"]) or "none"
            _say(f"{head}: bank 1 of {who}; #MC on {mc}", False, None)
        for rep in inj.get("host", []):
            _say(f"{head}: host: {rep.get('text') or rep.get('note')}", False, None)
        for note in inj["notes"]:
            _say(f"  note: {note}", False, None)
    return 0 if result["complete"] else EXIT_REFUSED


def _watch(client: QmpClient, t0: float, seconds: float | None, as_json: bool) -> None:
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while True:
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            try:
                e = client.next_event(min(left, 1.0))
            except QmpClientError:
                return  # the VMM went away
            if e is None:
                continue
            if as_json:
                _say("", True, e)
            else:
                _say(f"{time.monotonic() - t0:8.3f} {_describe(e)}", False, None)
            if e.get("event") == "SHUTDOWN":
                return
    except KeyboardInterrupt:
        return


_HEX_FIELDS = ("status", "addr", "misc", "mcg-status")


def _describe(e: dict[str, Any]) -> str:
    name = e.get("event", "?")
    data = e.get("data") or {}
    if name == "CONSOLE":
        return f"CONSOLE {data.get('line', '')}"
    parts = []
    for k, v in data.items():
        if isinstance(v, int) and not isinstance(v, bool) and k in _HEX_FIELDS:
            parts.append(f"{k}={v:#x}")
        else:
            parts.append(f"{k}={v}")
    return f"{name} {' '.join(parts)}".rstrip()
