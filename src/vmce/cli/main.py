"""The ``vmce`` command: entry point and sub-command wiring."""

from __future__ import annotations

import os
import sys

import typer

from vmce.cli import decode, demo, guest, hvmctx, inject, mceinject, run
from vmce.cli import restore as restore_cmd
from vmce.cli import save as save_cmd
from vmce.cli import stream as stream_cmd
from vmce.cli.output import CliError, err_console

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="vmce: machine-check fault injection and a Xen-style virtual MCA for KVM guests.",
)
app.command()(decode.decode)
app.command()(demo.demo)
app.command()(run.run)
app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(
    inject.inject
)
app.add_typer(hvmctx.app, name="hvmctx")
app.add_typer(mceinject.app, name="mce-inject")
app.add_typer(guest.app, name="guest")
app.command()(save_cmd.save)
app.command()(restore_cmd.restore)
app.add_typer(stream_cmd.app, name="stream")


def main() -> None:
    """Run the CLI; user errors become one line on stderr and exit status 2."""
    try:
        app(standalone_mode=True)
    except CliError as e:
        err_console.print(f"vmce: error: {e}", markup=False, soft_wrap=True)
        sys.exit(2)
    except BrokenPipeError:
        # The reader went away (``vmce ... | head``): stop quietly, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
