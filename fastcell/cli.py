"""The `fastcell` command line: one verb per pipeline stage.

Each stage keeps its verb in `fastcell/<stage>/cli.py`; this module only assembles them.
The verb modules import their heavy dependencies (torch, DALI, FAISS) inside the command,
so `fastcell --help` stays fast.
"""

from __future__ import annotations

import typer

from fastcell import __version__
from fastcell.errors import FastcellError
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


def run() -> None:
    """Console entry point: user errors print as one clear message, exit status 2."""
    try:
        app()
    except FastcellError as err:
        typer.secho(f"fastcell: error: {err}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None
