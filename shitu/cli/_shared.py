"""Small helpers shared by commands."""

from __future__ import annotations

from shitu.cli._output import Output


def report_broken_plugins(out: Output) -> None:
    """Load the plugins and warn (stderr) about each one that failed; never fatal."""
    from shitu.plugins import get_host, iter_plugin_errors

    for line in iter_plugin_errors(get_host()):
        out.warning(line)
