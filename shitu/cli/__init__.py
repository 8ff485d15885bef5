"""The ``shitu`` command: a thin layer that parses, calls the library and renders.

Heavy libraries (JAX, Pillow, matplotlib) are imported inside commands, so ``shitu --help`` is instant.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from shitu import __version__
from shitu.cli._output import error_line, machine_fault_line
from shitu.errors import ShituError

app = typer.Typer(
    name="shitu",
    help="Image recognition by feature extraction: check data, train, evaluate, embed and search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"shitu {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Image recognition by feature extraction: check data, train, evaluate, embed and search."""


def _register_commands() -> None:
    from shitu.cli import (
        check,
        convert,
        demo,
        export,
        import_weights,
        index,
        models,
        plugins,
        predict,
        serve,
        split,
        train,
    )
    from shitu.cli import eval as eval_cli

    modules = (demo, check, convert, split, train, eval_cli, predict, index, export, serve, import_weights, models)
    for module in (*modules, plugins):
        module.register(app)


_register_commands()


def _is_usage_error(exc: BaseException) -> bool:
    """Typer's (vendored click) parameter and usage errors: they carry an exit code and a message."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script: runs the app and turns every failure into one stderr line."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=list(argv) if argv is not None else None, prog_name="shitu", standalone_mode=False)
    except ShituError as exc:
        error_line(str(exc))
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        error_line("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # the reader went away (e.g. '| head'): not an error of ours
        sys.stderr.close()
        sys.exit(1)
    except Exception as exc:
        fault = machine_fault_line(exc)
        if fault is not None:
            error_line(fault)
            sys.exit(1)
        if _is_usage_error(exc):
            ctx = getattr(exc, "ctx", None)
            name = " ".join(ctx.command_path.split()[1:]) if ctx is not None else ""
            error_line(f"{exc.format_message()} (see 'shitu {name + ' ' if name else ''}--help')")
            sys.exit(exc.exit_code)
        error_line(f"internal error: {type(exc).__name__}: {exc} (set SHITU_DEBUG=1 for the traceback)")
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
