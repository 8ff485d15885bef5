"""Small helpers shared by commands."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


@contextmanager
def shown_warnings(out: Output) -> Iterator[None]:
    """While inside, a :class:`~shitu.embed.resolve.RandomWeightsWarning` is shown at once as a ``warning:``
    line (bold red) on stderr, in JSON mode too, every time; other warnings are shown as Python shows them."""
    from rich.markup import escape

    from shitu.embed.resolve import RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", RandomWeightsWarning)
        python_way = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, RandomWeightsWarning):
                out.console.print(f"[bold red]warning:[/] {escape(str(message))}")
            else:
                python_way(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


@contextmanager
def chosen_backend(out: Output, backend: Any, precision: Any, calibration: list[str] | None = None) -> Iterator[None]:
    """While inside, models load on ``backend`` in ``precision`` (see :mod:`shitu.export.backends`), int8
    calibrated on the ``calibration`` images; each choice other than the default JAX fp32 is shown as one
    ``backend:`` line on stderr, in JSON mode too."""
    backend, precision = str(getattr(backend, "value", backend)), str(getattr(precision, "value", precision))
    if (backend, precision) == ("jax", "fp32") and not calibration:
        yield
        return
    from rich.markup import escape

    from shitu.export.backends import inference_backend

    def report(choice: Any) -> None:
        out.console.print(f"[cyan]backend:[/] {escape(choice.describe())}")

    with inference_backend(backend, precision, report=report, calibration=calibration or None):
        yield
