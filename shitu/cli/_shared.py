"""Small helpers shared by commands."""

from __future__ import annotations

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
