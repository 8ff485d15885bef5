"""Loading plugins: built-ins and third-party packages alike, each isolated from the others.

Every plugin is found through the ``shitu`` entry point group (the built-ins are declared in shitu's own
``pyproject.toml``). Each one is imported, registered and asked for its registrations on its own; a
plugin that fails at any of these steps is unregistered, recorded with its error, and the rest go on.

The host calls each plugin's hook implementation by itself (never one pluggy call across all plugins), so
one plugin that raises cannot hide the answers of the others. ``SHITU_TRACE_PLUGINS=1`` writes every
hook call, its arguments and its result to stderr; ``SHITU_DEBUG=1`` adds the traceback of each failure.
"""

from __future__ import annotations

import difflib
import os
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import import_module
from importlib.metadata import Distribution, EntryPoint, distributions
from pathlib import Path
from typing import Any

import pluggy

from shitu.errors import ShituError
from shitu.plugins import hookspecs

ENTRY_POINT_GROUP = "shitu"
TRACE_VARIABLE = "SHITU_TRACE_PLUGINS"
_BUILTIN_DISTRIBUTION = "shitu"
_BUILTIN_PACKAGE = "shitu.builtin"


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
    """``Type: message`` on one line; never raises, even for an exception whose ``__str__`` does."""
    try:
        text = f"{type(exc).__name__}: {exc}".strip()
    except Exception:
        text = f"{type(exc).__name__}: (its message cannot be shown)"
    return " ".join(text.split())


def _must_propagate(exc: BaseException) -> bool:
    """Only a Ctrl-C gets through a plugin boundary; anything else a plugin raises (even SystemExit) is its
    own failure."""
    return isinstance(exc, KeyboardInterrupt)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def builtin_plugin_modules() -> dict[str, str]:
    """The built-in plugins as ``{name: module}``: every public module of :mod:`shitu.builtin`."""
    package = import_module(_BUILTIN_PACKAGE)
    return {
        info.name: f"{_BUILTIN_PACKAGE}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    }


def _trace_writer(text: str) -> None:
    sys.stderr.write("".join(f"[plugins] {line}\n" for line in text.splitlines()))
    sys.stderr.flush()


class PluginHost:
    """Owns the pluggy manager and everything plugins registered (models, dataset formats)."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.models: dict[str, Any] = {}
        self.dataset_formats: dict[str, Any] = {}
        self._owner: dict[tuple[str, str], str] = {}
        # The host calls implementations one by one, so it traces them itself, in pluggy's format; pluggy's
        # own tracing covers any direct ``pm.hook.<name>(...)`` call. Without a writer nothing is written.
        self._hooktrace = self.pm.trace.root.get("hook")
        self._loadtrace = self.pm.trace.root.get("load")
        if os.environ.get(TRACE_VARIABLE, "").strip() not in ("", "0"):
            self.pm.trace.root.setwriter(_trace_writer)
            self.pm.enable_tracing()
        if load_entry_points:
            self.load_entry_points()

    # -- loading -------------------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every entry point of ``group``: shitu's own first, then the others by name.

        Plugins registered later are asked first by ``detect_dataset_format``, so third-party plugins can
        claim a layout before the built-ins. Built-ins missing from shitu's installed metadata (a source
        tree that was never installed, or an install older than the code) are loaded from
        :mod:`shitu.builtin` directly, still before any third-party plugin.
        """
        found, unreadable = _find_entry_points(group)
        for info in unreadable:
            self._record(info)
        builtins = sorted((ep for ep in found if _is_builtin(ep)), key=lambda ep: ep.name)
        others = sorted((ep for ep in found if not _is_builtin(ep)), key=lambda ep: (ep.name, ep.value))
        for ep in builtins:
            self._load(_entry_point_info(ep), ep.load)
        if group == ENTRY_POINT_GROUP:
            self.load_builtins()
        for ep in others:
            self._load(_entry_point_info(ep), ep.load)

    def load_builtins(self) -> None:
        """Load the built-in plugins of :mod:`shitu.builtin` that are not loaded yet (by module)."""
        from shitu import __version__

        loaded = {info.module.partition(":")[0].strip() for info in self.plugins.values()}
        for name, module in builtin_plugin_modules().items():
            if module in loaded:
                continue
            info = PluginInfo(name, module, _BUILTIN_DISTRIBUTION, __version__, builtin=True)
            self._load(info, lambda module=module: import_module(module))

    def _load(self, info: PluginInfo, load: Callable[[], object]) -> PluginInfo:
        """Import one plugin (``load()``) and register it; an import that fails is recorded, never raised."""
        self._loadtrace("loading plugin", info.name, "from", info.module)
        try:
            plugin = load()
        except BaseException as exc:
            if _must_propagate(exc):
                raise
            self._debug(exc)
            info.errors.append(f"failed to import {info.module}: {_describe(exc)}")
            self._record(info)
            return info
        return self._add(plugin, info)

    def register(self, plugin: object, name: str | None = None) -> PluginInfo:
        """Register a plugin object or module directly (tests, embedding applications).

        Never raises for a faulty plugin: the returned record (also in :attr:`plugins`) holds its errors.
        """
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

    def _record(self, info: PluginInfo) -> bool:
        """Add ``info`` to the listing; a second plugin with a name already listed is refused (and listed
        under a suffixed key so that both show). Returns False when refused."""
        other = self.plugins.get(info.name)
        if other is None:
            self.plugins[info.name] = info
            return True
        source = other.distribution or other.module
        info.errors.append(f"a plugin named {info.name!r} is already registered (from {source}); this one is ignored")
        n = 2
        while f"{info.name} ({n})" in self.plugins:
            n += 1
        self.plugins[f"{info.name} ({n})"] = info
        return False

    def _add(self, plugin: object, info: PluginInfo) -> PluginInfo:
        if not self._record(info):
            return info
        if self.pm.is_registered(plugin):
            info.errors.append(f"this object is already registered as plugin {self.pm.get_name(plugin)!r}")
            return info
        try:
            self.pm.register(plugin, name=info.name)
        except BaseException as exc:
            if _must_propagate(exc):
                raise
            self._debug(exc)
            info.errors.append(f"invalid plugin: {_describe(exc)}")
            if self.pm.get_plugin(info.name) is not None:
                self.pm.unregister(name=info.name)
            return info
        callers = self.pm.get_hookcallers(plugin) or []
        info.hooks = sorted(caller.name for caller in callers)
        problems = self._problems(info.name, callers)
        if problems:
            info.errors.extend(problems)
            self.pm.unregister(name=info.name)
            return info
        # A hook that raises takes the whole plugin out; a refused name only drops that registration.
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

    def _problems(self, plugin_name: str, callers: Iterable[Any]) -> list[str]:
        """What makes a registered plugin unusable: hooks that do not exist (a misspelled name would
        otherwise be ignored silently, as ``pm.check_pending`` reports) and hook wrappers."""
        known = sorted(name for name in vars(hookspecs) if getattr(getattr(hookspecs, name), "shitu_spec", None))
        problems = []
        for caller in callers:
            for impl in caller.get_hookimpls():
                if impl.plugin_name != plugin_name:
                    continue
                if not caller.has_spec() and not impl.optionalhook:
                    close = difflib.get_close_matches(caller.name, known, n=1, cutoff=0.6)
                    hint = f"did you mean {close[0]!r}?" if close else f"known hooks: {', '.join(known)}"
                    problems.append(f"unknown hook {caller.name!r} ({hint})")
                elif impl.wrapper or impl.hookwrapper:
                    problems.append(f"hook wrappers are not supported ({caller.name}): each plugin is called alone")
        return problems

    def _collect(self, info: PluginInfo, kind: str, hook: str, table: dict[str, Any], names: list[str]) -> bool:
        """Call one registration hook of one plugin; validate and record what it registers.

        Returns False when the hook raised (nothing of it is kept).
        """
        key_kind = "model" if kind == "model" else "format"
        pending: list[Any] = []

        def register(item: Any) -> None:
            pending.append(item)

        for impl in self._impls(hook, info.name):
            try:
                self._call(impl, hook, register=register)
            except BaseException as exc:
                if _must_propagate(exc):
                    raise
                self._debug(exc)
                info.errors.append(f"{hook} raised {_describe(exc)}")
                return False
        for item in pending:
            try:
                name = getattr(item, "name", None)
            except Exception as exc:  # a 'name' property that raises
                info.errors.append(f"{hook} registered an item whose name raised {_describe(exc)}")
                continue
            if not isinstance(name, str) or not name.strip():
                info.errors.append(f"{hook} registered {_safe_repr(item)}, which has no name")
                continue
            problem = _invalid(kind, item)
            if problem is not None:
                info.errors.append(f"{hook} registered {name!r}, which {problem}")
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

    def _call(self, impl: pluggy.HookImpl, hook: str, **kwargs: Any) -> Any:
        """Call one implementation as pluggy would (only the arguments it declares), traced."""
        self._hooktrace.root.indent += 1
        self._hooktrace(hook, f"[{impl.plugin_name}]", kwargs)
        try:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
        except BaseException as exc:
            self._hooktrace("finish", hook, f"[{impl.plugin_name}]", "raised", _describe(exc))
            raise
        else:
            self._hooktrace("finish", hook, f"[{impl.plugin_name}]", "-->", result)
            return result
        finally:
            self._hooktrace.root.indent -= 1

    def _note(self, plugin_name: str, error: str) -> None:
        info = self.plugins.get(plugin_name)
        if info is not None and error not in info.errors:
            info.errors.append(error)

    @staticmethod
    def _debug(exc: BaseException) -> None:
        if os.environ.get("SHITU_DEBUG"):
            traceback.print_exception(exc, file=sys.stderr)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def broken(self) -> list[PluginInfo]:
        """Plugins that failed to load or register, or whose hooks raised."""
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
        itself) are passed over. A plugin whose detector raises, or answers something that is not a format
        name, is skipped and its error recorded.
        """
        hook = "detect_dataset_format"
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        for impl in reversed(impls):  # pluggy's own call order: newest first, tryfirst/trylast honoured
            try:
                answer = self._call(impl, hook, path=path)
            except BaseException as exc:
                if _must_propagate(exc):
                    raise
                self._debug(exc)
                self._note(impl.plugin_name, f"{hook} raised {_describe(exc)}")
                continue
            if answer is None:
                continue
            if not isinstance(answer, str):
                self._note(impl.plugin_name, f"{hook} returned {_safe_repr(answer)}, not a format name")
                continue
            fmt = self.dataset_formats.get(answer.lower())
            if convertible_only and (fmt is None or not fmt.converts):
                continue
            return fmt.name if fmt is not None else answer
        return None


def _safe_repr(item: Any) -> str:
    """``repr(item)``, shortened, or the type's name when the plugin's ``__repr__`` raises."""
    try:
        text = repr(item)
    except Exception:
        return f"a {type(item).__name__}"
    return text if len(text) <= 200 else text[:197] + "..."


def _invalid(kind: str, item: Any) -> str | None:
    """Why a registered item cannot be used, or None."""
    if kind == "dataset format":
        from shitu.data.formats import DatasetFormat

        if isinstance(item, type):
            return "is a class, not an instance (register(MyFormat()))"
        if not isinstance(item, DatasetFormat):
            return "is not a shitu.data.formats.DatasetFormat"
    if kind == "model":
        from shitu.models.spec import ModelSpec

        if not isinstance(item, ModelSpec):
            return "is not a shitu.models.ModelSpec"
        from shitu.models.spec import TrainingRecipe

        if item.recipe is not None and not isinstance(item.recipe, TrainingRecipe):
            return "has a recipe that is not a shitu.models.TrainingRecipe (or None)"
        if item.recipe is not None and item.recipe.sampler not in ("pk", "shuffle"):
            return f"has a recipe whose sampler {item.recipe.sampler!r} is neither 'pk' nor 'shuffle'"
    return None


def _entry_point_info(ep: EntryPoint) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(
        name=ep.name,
        module=ep.value,
        distribution=dist.name if dist is not None else None,
        version=_dist_version(dist) if dist is not None else None,
        builtin=_is_builtin(ep),
    )


def _is_builtin(ep: EntryPoint) -> bool:
    return ep.dist is not None and _normalise(ep.dist.name or "") == _BUILTIN_DISTRIBUTION


def _find_entry_points(group: str) -> tuple[list[EntryPoint], list[PluginInfo]]:
    """The entry points of ``group``, one distribution at a time (the first of a name on sys.path wins, as
    importlib's ``entry_points``), so one installed package with an unreadable ``entry_points.txt`` is
    reported instead of breaking the search for all of them."""
    found: list[EntryPoint] = []
    unreadable: list[PluginInfo] = []
    seen: set[str] = set()
    for dist in distributions():
        name = _dist_name(dist)
        key = _normalise(name) if name else f"path:{getattr(dist, '_path', id(dist))}"
        if key in seen:
            continue
        seen.add(key)
        try:
            found.extend(dist.entry_points.select(group=group))
        except Exception as exc:
            text = _read_text(dist, "entry_points.txt")
            if text is None or f"[{group}]" not in text.replace(" ", ""):
                continue  # not a plugin of ours: not our problem
            version = _dist_version(dist)
            shown = name or str(getattr(dist, "_path", "?"))
            info = PluginInfo(shown, "entry_points.txt", name, version)
            info.errors.append(f"cannot read the entry points of {shown}: {_describe(exc)}")
            unreadable.append(info)
    return found, unreadable


def _dist_name(dist: Distribution) -> str | None:
    try:
        return dist.metadata["Name"]
    except Exception:
        return None


def _dist_version(dist: Distribution) -> str | None:
    try:
        return dist.version
    except Exception:
        return None


def _read_text(dist: Distribution, filename: str) -> str | None:
    try:
        return dist.read_text(filename)
    except Exception:
        return None


def _lookup(table: Mapping[str, Any], name: str, kind: str) -> Any:
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
