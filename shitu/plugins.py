"""Loading plugins: built-ins and third-party packages alike, each isolated from the others.

Every plugin is found through the ``shitu`` entry point group (the built-ins are declared in shitu's own
``pyproject.toml``). Each one is imported, registered and asked for its registrations on its own; a
plugin that fails at any of these steps is unregistered, recorded with its error, and the rest go on.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pluggy

from shitu import hookspecs
from shitu.errors import ShituError

ENTRY_POINT_GROUP = "shitu"
_BUILTIN_DISTRIBUTION = "shitu"


@dataclass
class PluginInfo:
    """What ``shitu plugins`` shows for one plugin."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    dataset_formats: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())


class PluginHost:
    """Owns the pluggy manager and everything plugins registered (models, dataset formats)."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.models: dict[str, Any] = {}
        self.dataset_formats: dict[str, Any] = {}
        self._owner: dict[tuple[str, str], str] = {}
        if os.environ.get("SHITU_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(f"[plugins] {text}"))
            self.pm.enable_tracing()
        if load_entry_points:
            self.load_entry_points()

    # -- loading -------------------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every entry point of ``group``: shitu's own first, then the others by name."""

        def order(ep: EntryPoint) -> tuple[int, str]:
            dist = ep.dist.name if ep.dist is not None else ""
            return (0 if dist == _BUILTIN_DISTRIBUTION else 1, ep.name)

        seen: set[str] = set()
        for ep in sorted(entry_points(group=group), key=order):
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.name if dist is not None else None,
                version=dist.version if dist is not None else None,
                builtin=dist is not None and dist.name == _BUILTIN_DISTRIBUTION,
            )
            try:
                plugin = ep.load()
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                info.errors.append(f"failed to import {ep.value}: {_describe(exc)}")
                self._debug(exc)
                self.plugins[ep.name] = info
                continue
            self._add(plugin, info)

    def register(self, plugin: object, name: str | None = None) -> PluginInfo:
        """Register a plugin object or module directly (tests, embedding applications)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        info = PluginInfo(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        return self._add(plugin, info)

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        self.plugins.pop(name, None)
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        for key, owner in list(self._owner.items()):
            if owner == name:
                kind, item = key
                del self._owner[key]
                (self.models if kind == "model" else self.dataset_formats).pop(item, None)

    def _add(self, plugin: object, info: PluginInfo) -> PluginInfo:
        if info.name in self.plugins and self.plugins[info.name].ok:
            info.errors.append(f"a plugin named {info.name!r} is already registered")
            self.plugins.setdefault(info.name + " (duplicate)", info)
            return info
        self.plugins[info.name] = info
        try:
            self.pm.register(plugin, name=info.name)
            self.pm.check_pending()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            info.errors.append(f"invalid plugin: {_describe(exc)}")
            if self.pm.get_plugin(info.name) is not None:
                self.pm.unregister(name=info.name)
            return info
        info.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or [])
        # A hook that raises takes the whole plugin out; a refused duplicate name only drops that name.
        fatal = not self._collect(info, "model", "register_models", self.models, info.models)
        fatal = fatal or not self._collect(
            info, "dataset format", "register_dataset_formats", self.dataset_formats, info.dataset_formats
        )
        if fatal:
            self.unregister(info.name)
            info.models.clear()
            info.dataset_formats.clear()
            self.plugins[info.name] = info
        return info

    def _collect(self, info: PluginInfo, kind: str, hook: str, table: dict[str, Any], names: list[str]) -> bool:
        """Call one registration hook of one plugin; validate and record what it registers.

        Returns False when the hook raised (nothing of it is kept).
        """
        key_kind = "model" if kind == "model" else "format"
        pending: list[Any] = []
        for impl in self._impls(hook, info.name):
            try:
                impl.function(register=pending.append)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                info.errors.append(f"{hook} raised {_describe(exc)}")
                self._debug(exc)
                return False
        for item in pending:
            name = getattr(item, "name", None)
            if not isinstance(name, str) or not name:
                info.errors.append(f"{hook} registered {item!r}, which has no name")
                continue
            key = name.lower()
            owner = self._owner.get((key_kind, key))
            if owner is not None:
                info.errors.append(f"{kind} {name!r} is already registered by plugin {owner!r}")
                continue
            self._owner[(key_kind, key)] = info.name
            table[key] = item
            names.append(name)
        return True

    def _impls(self, hook: str, plugin_name: str) -> list[pluggy.HookImpl]:
        caller = getattr(self.pm.hook, hook)
        return [impl for impl in caller.get_hookimpls() if impl.plugin_name == plugin_name]

    @staticmethod
    def _debug(exc: BaseException) -> None:
        if os.environ.get("SHITU_DEBUG"):
            traceback.print_exception(exc, file=sys.stderr)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def broken(self) -> list[PluginInfo]:
        """Plugins that failed to load or register."""
        return [info for info in self.plugins.values() if not info.ok]

    def dataset_format(self, name: str) -> Any:
        """The dataset format registered as ``name`` (case-insensitive) or a ShituError with suggestions."""
        return _lookup(self.dataset_formats, name, "dataset format")

    def model(self, name: str) -> Any:
        """The model registered as ``name`` (case-insensitive) or a ShituError with suggestions."""
        return _lookup(self.models, name, "model")

    def detect_format(self, path: Path, *, convertible_only: bool = False) -> str | None:
        """Ask each plugin, newest first, which format the folder is; the first answer wins.

        With ``convertible_only``, answers naming a format that cannot be converted (ShiTuRecDataset
        itself) are passed over. A plugin whose detector raises is skipped (and its error recorded).
        """
        impls = self.pm.hook.detect_dataset_format.get_hookimpls()
        for impl in reversed(impls):  # pluggy's own call order
            try:
                answer = impl.function(path=path)
            except Exception as exc:
                info = self.plugins.get(impl.plugin_name)
                if info is not None:
                    info.errors.append(f"detect_dataset_format raised {_describe(exc)}")
                self._debug(exc)
                continue
            if answer is None:
                continue
            fmt = self.dataset_formats.get(str(answer).lower())
            if convertible_only and (fmt is None or not fmt.converts):
                continue
            return fmt.name if fmt is not None else str(answer)
        return None


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    found = table.get(name.lower())
    if found is not None:
        return found
    known = sorted(getattr(item, "name", key) for key, item in table.items())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known: {', '.join(known) or 'none'}"
    raise ShituError(f"unknown {kind} {name!r}", hint=hint)


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset_host(host: PluginHost | None = None) -> None:
    """Replace the process-wide host (tests); None means load again on next use."""
    global _host
    _host = host


def iter_plugin_errors(host: PluginHost) -> Iterable[str]:
    """One line per problem of every broken plugin, for stderr."""
    for info in host.broken:
        for error in info.errors:
            yield f"plugin {info.name!r} ({info.module}): {error}"


RegisterFn = Callable[[Any], None]
