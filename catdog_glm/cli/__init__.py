"""The `catdog` command: a thin dispatcher over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import typer

from catdog_glm import __version__
from catdog_glm.cli import chat, data, evaluate, export, models, predict, serve, serve_chat, train

app = typer.Typer(
    name="catdog",
    help="Train, evaluate and serve a cat-vs-dog classifier, and self-host ChatGLM3 — offline, safely, fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("serve-classifier")(serve.serve_classifier)
app.command("chat")(chat.chat)
app.command("serve-chat")(serve_chat.serve_chat)
app.command("pull")(models.pull)
app.command("models")(models.models)
app.add_typer(data.app, name="data")
app.add_typer(export.app, name="export")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"catdog-glm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, evaluate and serve a cat-vs-dog classifier, and self-host ChatGLM3 — offline, safely, fast."""


def main() -> None:
    app()
