"""``shitu plugins``: what is installed, what each plugin registers, and what failed to load."""

from __future__ import annotations

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output
from shitu.cli._shared import report_broken_plugins


def plugins(json: JsonOption = False) -> int:
    """List plugins: name, version, the models and dataset formats each registers, and load errors.

    Exits 0 even when a plugin is broken: its errors are listed (and warned about on stderr).
    """
    from rich.markup import escape
    from rich.table import Table

    from shitu.plugins import get_host

    out = Output(json)
    host = get_host()
    infos = list(host.plugins.values())
    out.emit({"plugins": [info.to_dict() for info in infos]})
    table = Table(title="shitu plugins", title_justify="left")
    for column in ("plugin", "version", "registers", "status"):
        table.add_column(column)
    for info in infos:
        registers = [f"model {m}" for m in info.models] + [f"format {f}" for f in info.dataset_formats]
        version = info.version or "-"
        if info.builtin:
            version += " (built-in)"
        elif info.distribution:
            version += f" ({info.distribution})"
        status = "[green]ok[/]" if info.ok else "[red]" + escape("; ".join(info.errors)) + "[/]"
        table.add_row(escape(info.name), escape(version), escape("\n".join(registers) or "-"), status)
    out.render(table)
    report_broken_plugins(out, host)
    return 0


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
