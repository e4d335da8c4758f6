"""The `fastcell` command line: one verb per pipeline stage.

Each stage keeps its verb in `fastcell/<stage>/cli.py`; this module only assembles them.
The verb modules import their heavy dependencies (torch, DALI, FAISS) inside the command,
so `fastcell --help` stays fast.
"""

from __future__ import annotations

import typer

from fastcell import __version__
from fastcell.errors import FastcellError, describe_os_error
from fastcell.evaluate.cli import compare, embed, evaluate
from fastcell.shard.cli import info, shard
from fastcell.synth.cli import synth
from fastcell.train.cli import train

app = typer.Typer(
    name="fastcell",
    help=(
        "Fast self-supervised single-cell representations from microscopy.\n\n"
        "Pipeline: synth (a BBBC021-shaped screen) -> shard (crops in WebDataset shards) -> "
        "train (SimCLR) -> embed (one vector per cell) -> eval (NSC / NSCB / drop) -> compare (reports side by side)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fastcell {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """fastcell: fast self-supervised single-cell representations from microscopy."""


app.command("synth")(synth)
app.command("shard")(shard)
app.command("info")(info)
app.command("train")(train)
app.command("embed")(embed)
app.command("eval")(evaluate)
app.command("compare")(compare)


INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def _fail(message: str, status: int = 2) -> SystemExit:
    typer.secho(f"fastcell: error: {message}", err=True, fg=typer.colors.RED)
    return SystemExit(status)


def run(argv: list[str] | None = None) -> None:
    """Console entry point and the one error boundary of the command line.

    A user-caused condition (a `FastcellError`, or an OSError such as a full disk, a missing
    permission or a path through a file) prints `fastcell: error: <what>: <problem>` and exits
    with status 2; Ctrl-C (or SIGTERM while a worker pool runs) prints one line and exits 130.
    Usage errors keep typer's message (status 2); bugs keep their traceback.
    """
    try:
        app(args=argv)
    except SystemExit as done:
        if done.code == INTERRUPTED:  # typer turns KeyboardInterrupt into exit status 130
            raise _fail("interrupted; rerun the same command to resume (for `fastcell train`, with --resume)",
                            INTERRUPTED) from None
        raise
    except FastcellError as err:
        raise _fail(str(err)) from None
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            raise
        raise _fail(message) from None
