"""Small helpers shared by commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shitu.cli._output import Output

if TYPE_CHECKING:
    from shitu.plugins import PluginHost


def report_broken_plugins(out: Output, host: PluginHost | None = None) -> None:
    """Load the plugins (unless ``host`` is given) and warn on stderr, one line per problem of each plugin
    that failed; never fatal, whatever a plugin did."""
    from shitu.plugins import get_host, iter_plugin_errors

    for line in iter_plugin_errors(host if host is not None else get_host()):
        out.warning(line)


def report_backups(out: Output, backups: list[Path]) -> None:
    """One line per file kept as a backup before it was replaced."""
    from rich.markup import escape

    for backup in backups:
        out.info(f"kept the previous {escape(backup.name.split('.bak')[0])} as {escape(str(backup))}")
