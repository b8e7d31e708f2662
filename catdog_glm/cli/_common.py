"""What every command shares: the console, logging set-up and turning library errors into one line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from catdog_glm.config import PRECISIONS
from catdog_glm.errors import CatdogError, ConfigError

console = Console()
# Options shared by the classifier commands; every --checkpoint goes through vision.checkpoint.resolve_checkpoint.
ClassifierModelOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        "--model",
        help="Checkpoint, run folder or exported .onnx model (default: the best checkpoint under checkpoint/).",
    ),
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option(help="Checkpoint file or run folder (default: the best checkpoint under checkpoint/)."),
]
# One --precision vocabulary (config.PRECISIONS: auto, fp32, bf16, fp16, int8); each command takes what makes sense.
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="auto (the fastest of int8/bf16/fp32 validated for this checkpoint), fp32, bf16, fp16 (GPU) or int8."
    ),
]
# Replaced by --precision; accepted with a deprecation warning for one release, hidden from --help.
AmpOption = Annotated[bool | None, typer.Option("--amp/--no-amp", hidden=True, help="Deprecated: --precision.")]
err_console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, handlers=[handler], format="%(message)s", force=True
    )
    for noisy in ("swanlab", "PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def deprecated(old: str, new: str) -> None:
    """One line on stderr: `old` still works in this release, `new` is the spelling to use."""
    err_console.print(
        f"Warning: {old} is deprecated and will be removed in the next release; use {new}.",
        highlight=False,
        soft_wrap=True,
    )


def legacy_precision(precision: str, *, amp: bool | None = None, dtype: str | None = None) -> str:
    """--precision, or what an old spelling (--amp/--no-amp, --dtype X) asked for, with a deprecation line."""
    if amp is not None:
        old, value = ("--amp" if amp else "--no-amp"), ("auto" if amp else "fp32")
    elif dtype is not None:
        old, value = f"--dtype {dtype}", dtype
    else:
        return precision
    deprecated(old, f"--precision {value}" if value in PRECISIONS else "--precision")
    if precision not in ("auto", value):
        raise ConfigError(f"{old} and --precision {precision} disagree; pass only --precision")
    return value


def config_options(config_cls):
    """Decorator: the command takes one option per field of the dataclass `config_cls` that has help metadata
    (`config.option`), named, typed and defaulted as the field, between its first parameter (the context) and its
    own options; the command receives them as keyword arguments (`**options`). Each option is written once, as
    a config field."""

    def decorate(command):
        own = list(inspect.signature(command, eval_str=True).parameters.values())
        first, rest = own[0], [p for p in own[1:] if p.kind is not inspect.Parameter.VAR_KEYWORD]
        hints = typing.get_type_hints(config_cls)
        derived = []
        for f in dataclasses.fields(config_cls):
            if "help" not in f.metadata:
                continue
            option = typer.Option(*f.metadata["flags"], help=f.metadata["help"])
            derived.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=Annotated[hints[f.name], option],
                    default=f.metadata.get("cli_default", f.default),
                )
            )
        params = [first, *derived, *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest)]
        command.__signature__ = inspect.Signature(params, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def fail(message: str, code: int = 1) -> typer.Exit:
    from rich.markup import escape

    # the message is plain text: a path or value like "[gMASK]" must print as written, not as rich markup
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn):
    """Print a CatdogError as `Error: ...` (one line, no traceback) and exit 1; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging(kwargs.get("verbose", False))
        try:
            return fn(*args, **kwargs)
        except CatdogError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            sys.exit(130)

    return wrapper
