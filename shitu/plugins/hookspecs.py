"""The hooks a shitu plugin may implement.

A plugin is a module (or object) registered under the ``shitu`` entry point group; it implements any of
the hooks below, decorated with :data:`shitu.hookimpl`. Call hooks with keyword arguments only. Each
docstring is the hook's contract.

The host calls each plugin's implementation on its own, so a plugin that raises is recorded (``shitu
plugins`` lists its error) without disturbing the others. A hook name that is not below (a typo) or a hook
wrapper makes the plugin fail to load, rather than being ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("shitu")


@hookspec
def register_models(register: Callable[[Any], None]) -> None:
    """Call ``register(spec)`` once per model this plugin provides (``spec`` is a :class:`shitu.models.ModelSpec`).

    Names are unique across all plugins: a name that is already taken is refused and reported against
    the plugin that registered it second. Must not import heavy libraries at module import time.
    """


@hookspec
def register_dataset_formats(register: Callable[[Any], None]) -> None:
    """Call ``register(fmt)`` once per dataset format (a :class:`shitu.data.formats.DatasetFormat` instance).

    A format validates a folder of its kind and, unless it is ShiTuRecDataset itself, converts it into
    ShiTuRecDataset lists. Names are unique across plugins and matched case-insensitively.
    """


@hookspec(firstresult=True)
def detect_dataset_format(path: Path) -> str | None:
    """Return the name of the dataset format of the folder ``path`` if this plugin recognises it, else None.

    The first non-None answer wins; plugins installed later are asked first, so a third-party plugin can
    claim a layout before the built-ins. Must only look (list and read files), never write.
    """
