"""PaddleX-style configuration: one YAML file per model, overridden by ``Section.key=value``.

A configuration is a mapping of sections (``Global``, ``CheckDataset``, ``Train``, ...); a section
maps keys to values or to nested sub-sections.  The loaded YAML is its own schema: an override must
name a key that exists and give a value of the same type as that key's current value (see
:func:`load_config` for the exact rules).  Every problem is reported as a :class:`ShituError`.

This module imports only the standard library and PyYAML so that the command line starts fast.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from shitu.errors import ShituError

__all__ = ["Config", "Overrides", "available_configs", "load_config"]

#: Overrides as the CLI gives them (``["Train.batch_size=32", ...]``) or as the Python API gives
#: them (``{"Train.batch_size": 32}``).
Overrides = Sequence[str] | Mapping[str, Any]

_CONFIG_PACKAGE = "shitu"
_CONFIG_DIR = "configs"
_YAML_SUFFIXES = (".yaml", ".yml")

_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})
_NULL = frozenset({"", "~", "null", "Null", "NULL"})
#: Keys whose default is text but that may be set to null (``-o Train.pretrain_weight_path=null``: no weights).
NULLABLE_TEXT_KEYS = frozenset({"Train.pretrain_weight_path"})
_INT_RE = re.compile(r"[-+]?[0-9]+")
_FLOAT_RE = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")

#: What PyYAML's safe constructors may raise besides YAMLError (bad dates, huge ints, deep or
#: self-referencing data; AttributeError for a '!!timestamp' tag on text that is no date).
_YAML_ERRORS = (yaml.YAMLError, RecursionError, ValueError, OverflowError, TypeError, AttributeError)

#: The most values a YAML text may expand to through aliases. Anchors and aliases share one object, but
#: every consumer (validation, overrides, deep copies) walks the expanded tree, so a few lines nesting
#: aliases ("billion laughs") would take hours; real configs hold a few hundred values.
MAX_YAML_VALUES = 100_000

_MISSING: Any = object()  # sentinel: no default given to Config.get
_ANY: Any = object()  # sentinel prototype: any plain value (elements of a mixed list)


# --------------------------------------------------------------------------------------------
# Shipped configs and YAML loading
# --------------------------------------------------------------------------------------------


def _config_dir() -> Any:
    """The directory (a ``Traversable``) holding the shipped YAML files."""
    return resources.files(_CONFIG_PACKAGE) / _CONFIG_DIR


def available_configs() -> list[str]:
    """Return the sorted names of the shipped model configs (the YAML file stems)."""
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in _config_dir().iterdir()
        if entry.is_file() and entry.name.endswith(".yaml")
    )


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys in a mapping (a common, silent mistake)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


class _YamlTooLarge(ValueError):
    """The YAML text expands to more than :data:`MAX_YAML_VALUES` values (a ValueError: one of _YAML_ERRORS)."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Number of values ``node`` expands to, aliases counted every time they are used (memoised by node,
    so the count itself takes time linear in the text). A node that contains itself counts as too large."""
    known = sizes.get(id(node))
    if known is not None:
        if known < 0:
            raise _YamlTooLarge("a YAML alias refers to the collection that contains it")
        return known
    sizes[id(node)] = -1  # being counted: meeting it again below is a cycle
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(item, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    if total > MAX_YAML_VALUES:
        raise _YamlTooLarge(
            f"the YAML expands to more than {MAX_YAML_VALUES} values through aliases (a 'billion laughs' text?)"
        )
    sizes[id(node)] = total
    return total


def _load_yaml(text: str) -> Any:
    """``yaml.load`` with the safe ``_Loader``, refusing texts whose aliases expand beyond MAX_YAML_VALUES."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _mark_line(text: str, mark: Any) -> int | None:
    """1-based line of a PyYAML mark, counting only newlines: YAML also breaks lines at U+0085, U+2028
    and U+2029, which editors show inside a line, so ``mark.line`` would point below the real line."""
    if mark is None:
        return None
    index = getattr(mark, "index", None)
    if isinstance(index, int) and 0 <= index <= len(text):
        return text.count("\n", 0, index) + 1
    return mark.line + 1


def _yaml_error(exc: yaml.YAMLError, path: str, text: str = "") -> ShituError:
    """Turn a PyYAML error into a ShituError located at ``path:line``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
    else:  # e.g. yaml.reader.ReaderError: undecodable or unprintable characters
        problem = str(exc)
    line = _mark_line(text, mark) if text else (mark.line + 1 if mark is not None else None)
    return ShituError(f"invalid YAML: {problem}", path=path, line=line)


def _key_line(text: str, keys: Sequence[Any]) -> int | None:
    """1-based line of the mapping key reached by ``keys`` in YAML ``text``; None if unknown."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # pragma: no cover - text already parsed once
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(key):
                line, node = _mark_line(text, key_node.start_mark), value_node
                break
        else:
            break
    return line


def _check_structure(data: Any, text: str, path: str) -> dict[str, Any]:
    """Check that loaded YAML is a mapping of sections holding plain values; return it."""
    if data is None:
        raise ShituError(
            "empty config: expected a mapping of sections (Global, Train, ...)",
            path=path,
        )
    if not isinstance(data, dict):
        raise ShituError(
            f"the top level must be a mapping of sections, got {_type_name_of(data)}",
            path=path,
            line=1,
        )

    def check(node: Any, keys: tuple[Any, ...]) -> None:
        where = ".".join(map(str, keys))
        if isinstance(node, dict):
            for key, value in node.items():
                sub = (*keys, key)
                problem = _bad_key_reason(key)
                if problem:
                    raise ShituError(
                        f"invalid key {key!r}{' in ' + repr(where) if where else ''}: {problem}",
                        path=path,
                        line=_key_line(text, sub),
                    )
                if len(sub) == 1 and not isinstance(value, dict):
                    raise ShituError(
                        f"section {key!r} must be a mapping of keys, got {_type_name_of(value)}",
                        path=path,
                        line=_key_line(text, sub),
                    )
                check(value, sub)
        elif isinstance(node, list):
            for item in node:
                check(item, keys)
        elif node is not None and not isinstance(node, (bool, int, float, str)):
            raise ShituError(
                f"unsupported value for {where!r}: {_type_name_of(node)} "
                "(use null, bool, int, float, str, a list or a mapping)",
                path=path,
                line=_key_line(text, keys),
            )

    check(data, ())
    return data


def _bad_key_reason(key: Any) -> str | None:
    """Why ``key`` cannot be a config key (None when it is fine)."""
    if not isinstance(key, str):
        return f"keys must be strings, got {_type_name_of(key)}"
    if not key or key != key.strip():
        return "keys must be non-empty and have no surrounding whitespace"
    if "." in key or "=" in key:
        return "keys must not contain '.' or '='"
    return None


def _parse_yaml(text: str, path: str) -> dict[str, Any]:
    """Parse config YAML ``text`` (read from ``path``) into a checked mapping of sections."""
    try:
        data = _load_yaml(text)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, path, text) from None
    except _YAML_ERRORS as exc:
        raise ShituError(f"invalid YAML: {exc}", path=path) from None
    try:
        return _check_structure(data, text, path)
    except RecursionError:
        raise ShituError("invalid config: data nested too deeply or refers to itself", path=path) from None


#: ``"package.module:relative/path.yaml"``: a config shipped inside a plugin package.
_PACKAGED_RE = re.compile(r"[A-Za-z_][\w.]*:[^:\\]+\.ya?ml")


def _read_packaged(reference: str) -> str:
    """The text of ``"package.module:relative/path.yaml"``, a file beside that module (importlib.resources;
    a module that is not a package resolves to the package that holds it)."""
    from importlib import import_module

    name, _, relative = reference.partition(":")
    try:
        module = import_module(name)
    except Exception as exc:  # a plugin's import may fail in any way
        raise ShituError(f"config {reference!r}: cannot import {name}: {exc}") from None
    package = name if hasattr(module, "__path__") else (module.__package__ or name)
    try:
        entry = resources.files(package).joinpath(*relative.split("/"))
        return entry.read_text(encoding="utf-8")
    except (OSError, TypeError, UnicodeDecodeError) as exc:
        raise ShituError(f"config {reference!r} cannot be read: {exc}") from None


def _registered_model_config(name: str) -> str | None:
    """The config reference of a model a plugin registered under ``name`` (None: no such model, or its
    config is ``name`` itself)."""
    from shitu.plugins import get_host

    spec = get_host().models.get(name.lower())  # the host keys models case-insensitively
    if spec is None or spec.config == name:
        return None
    return str(spec.config)


def _read_source(source: str | os.PathLike[str]) -> tuple[str, str]:
    """Resolve ``source`` (model name, packaged config reference or YAML path) to ``(display source, YAML
    text)``. A model name is a built-in config's, or that of a model a plugin registered (its spec's config)."""
    names = available_configs()
    if isinstance(source, str) and source in names:
        entry = _config_dir() / f"{source}.yaml"
        return source, entry.read_text(encoding="utf-8")
    if isinstance(source, str) and _PACKAGED_RE.fullmatch(source) and not Path(source).exists():
        return source, _read_packaged(source)
    if isinstance(source, str) and source and "/" not in source and not source.endswith(_YAML_SUFFIXES):
        reference = _registered_model_config(source)
        if reference is not None:
            if reference not in names and not _PACKAGED_RE.fullmatch(reference):
                raise ShituError(
                    f"model {source!r} names the config {reference!r}, neither a built-in config nor "
                    "'package.module:relative/path.yaml'"
                )
            return _read_source(reference)
    if not isinstance(source, (str, os.PathLike)):
        raise ShituError(f"config source must be a model name or a YAML path, got {_type_name_of(source)}")
    text_source = os.fspath(source)
    path = Path(text_source)
    looks_like_path = (
        not isinstance(source, str)
        or text_source.endswith(_YAML_SUFFIXES)
        or any(sep in text_source for sep in ("/", os.sep, os.altsep or "/"))
        or path.is_file()
    )
    if not looks_like_path:
        matches = difflib.get_close_matches(text_source, names, n=3, cutoff=0.5)
        hint = (
            f"did you mean {_or_list(matches)}?"
            if matches
            else f"available: {', '.join(names)}; or give a path to a YAML file"
        )
        raise ShituError(f"unknown model config {text_source!r}", hint=hint)
    if not path.exists():
        stem = path.stem if path.suffix in _YAML_SUFFIXES else None
        hint = f"the built-in config is named {stem!r}" if stem in names else None
        raise ShituError("config file not found", path=text_source, hint=hint)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ShituError(f"cannot read config file: {exc.strerror or exc}", path=text_source) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ShituError("config file is not valid UTF-8", path=text_source, line=line) from None
    return text_source, text


def load_config(source: str | os.PathLike[str], overrides: Overrides = ()) -> Config:
    """Load a config by model name, packaged reference or YAML path, then apply ``overrides`` in order.

    A model name is a shipped config's, or that of a model a plugin registered: its spec's ``config``
    (a shipped name or ``"package.module:relative/path.yaml"``, read with importlib.resources), with
    ``Global.model`` set to the name.

    ``overrides`` is a sequence of ``"Section.key=value"`` strings (the CLI's ``-o``; nested keys
    as ``Section.sub.key=value``) or a mapping ``{"Section.key": value}`` of Python values.  The
    loaded YAML is the schema: the key must exist, and the value must have the type of the key's
    current value:

    * bool: ``true``/``false`` (also ``True``/``False``/``TRUE``/``FALSE``);
    * int: an integer (not a bool, not ``1.5``);
    * float: an int or float, stored as float (``1e-3`` is accepted); finite only;
    * str: any text, taken verbatim (``Global.output=123`` gives ``"123"``);
    * list: a YAML flow list (``[1, 2]``) whose elements match the default's element type;
    * null: any scalar (text parsed as null, bool, int or float where it reads as one, else kept
      verbatim as str) or null.

    Non-null keys refuse null; a section can't be assigned, nor a key set inside a scalar.
    Raises ShituError for an unknown model name (with close matches), unreadable or invalid YAML
    (with path and line), a top level that is not a mapping of sections, and any bad override.
    """
    display, text = _read_source(source)
    data = _parse_yaml(text, display)
    config = Config(data, source=display)
    if isinstance(source, str) and display != source and config.get("Global.model", source) != source:
        # A plugin model's config may be another model's file: loaded for this model, it names this one.
        config = config.with_overrides({"Global.model": source})
    return config.with_overrides(overrides)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _type_name_of(value: Any) -> str:
    """Human name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _expected(proto: Any) -> str:
    """Human description of the values a key whose default is ``proto`` accepts."""
    if proto is _ANY:
        return "a plain value"
    if proto is None:
        return "a scalar (str, int, float or bool) or null"
    if isinstance(proto, bool):
        return "bool (true or false)"
    if isinstance(proto, int):
        return "int"
    if isinstance(proto, float):
        return "float"
    if isinstance(proto, str):
        return "str"
    if isinstance(proto, list):
        return f"list of {_expected(_element_proto(proto))}"
    return _type_name_of(proto)  # pragma: no cover - structure is checked on load


def _element_proto(default: list[Any]) -> Any:
    """Prototype element of a list default: what each element of a new list must match."""
    kinds = {type(item) for item in default}
    if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float, str):
        return default[0]
    if kinds == {int, float}:
        return 0.0
    return _ANY


def _all_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of ``data``: sections, sub-sections and leaves, in file order."""
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_all_keys(value, f"{dotted}."))
    return keys


def _or_list(items: Sequence[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [repr(item) for item in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _suggest(node: Any, parts: Sequence[str], prefix: str = "") -> list[str]:
    """Existing dotted keys close to ``parts``, matching one component at a time."""
    if not parts:
        return [prefix[:-1]]
    if not isinstance(node, dict):
        return []
    part = parts[0]
    options = [part] if part in node else difflib.get_close_matches(part, list(node), n=3, cutoff=0.6)
    found: list[str] = []
    for option in options:
        found.extend(_suggest(node[option], parts[1:], f"{prefix}{option}."))
    return found


def _unknown_key(data: Mapping[str, Any], dotted: str, parent: Mapping[str, Any], parent_key: str) -> ShituError:
    """ShituError for an unknown dotted key, with did-you-mean suggestions.

    Suggestions are keys that differ by a typo in some component (``Train.epoch_iters`` ->
    ``Train.epochs_iters``), then keys with the same last component in another section
    (``batch_size`` -> ``Train.batch_size``, ...).  Without any, the valid keys at the failing
    level are listed (the sections at the top level).
    """
    matches = _suggest(data, dotted.split("."))
    leaf = dotted.rsplit(".", 1)[-1].lower()
    for key in _all_keys(data):
        if key.rsplit(".", 1)[-1].lower() == leaf and key not in matches:
            matches.append(key)
    message = f"unknown config key {dotted!r}"
    if matches:
        return ShituError(f"{message}; did you mean {_or_list(matches[:5])}?")
    if parent_key:
        return ShituError(f"{message}; keys of {parent_key!r} are: {', '.join(parent)}")
    return ShituError(f"{message}; sections are: {', '.join(data)}")


def _locate(data: dict[str, Any], dotted: str, label: str) -> tuple[dict[str, Any], str]:
    """Find the mapping holding leaf ``dotted``; return ``(parent mapping, leaf name)``."""
    parts = dotted.split(".")
    if any(not part for part in parts):
        raise ShituError(f"malformed override {label!r}: empty part in key {dotted!r} (use Section.key=value)")
    node: dict[str, Any] = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        if part not in node:
            raise _unknown_key(data, dotted, node, here)
        if depth == len(parts) - 1:
            break
        child = node[part]
        if not isinstance(child, dict):
            key = ".".join(parts[: depth + 1])
            raise ShituError(
                f"invalid override {label!r}: {key!r} is not a section (its value is {child!r}), "
                f"so it has no key {parts[depth + 1]!r}"
            )
        node = child
    if isinstance(node[parts[-1]], dict):
        some_key = next(iter(node[parts[-1]]), "key")
        raise ShituError(
            f"invalid override {label!r}: {dotted!r} is a section; "
            f"set one of its keys instead, e.g. {dotted}.{some_key}=..."
        )
    return node, parts[-1]


def _bad_value(key: str, label: str, proto: Any, got: str) -> ShituError:
    """ShituError for a value of the wrong type."""
    return ShituError(f"invalid override {label!r}: {key!r} expects {_expected(proto)}, got {got}")


def _scalar_from_text(text: str) -> Any:
    """Read override text as null, bool, int or float where it is written as one, else as str."""
    stripped = text.strip()
    if stripped in _NULL:
        return None
    if stripped in _TRUE:
        return True
    if stripped in _FALSE:
        return False
    if _INT_RE.fullmatch(stripped):
        try:
            return int(stripped)
        except ValueError:  # more digits than Python converts
            return text
    if _FLOAT_RE.fullmatch(stripped):
        return float(stripped)
    return text


def _coerce_text(key: str, label: str, text: str, proto: Any) -> Any:
    """Convert override ``text`` to a value of the type of ``proto`` (the key's default)."""
    stripped = text.strip()
    if isinstance(proto, str):
        return None if key in NULLABLE_TEXT_KEYS and stripped in _NULL else text
    if isinstance(proto, list):
        if not stripped.startswith("["):
            raise _bad_value(key, label, proto, f"{text!r} (write a list as [a, b, ...])")
        try:
            value = _load_yaml(stripped)  # safe loader, bounded size
        except _YAML_ERRORS as exc:
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise _bad_value(key, label, proto, f"{text!r} ({problem})") from None
        return _coerce_value(key, label, value, proto, from_text=True)
    if proto is None and stripped[:1] in ("[", "{"):
        try:
            value = _load_yaml(stripped)  # safe loader, bounded size
        except _YAML_ERRORS:
            return text  # not a YAML collection: plain text such as '[draft] photos'
        if isinstance(value, (list, dict)):
            raise _bad_value(key, label, proto, f"{_type_name_of(value)} {text!r}")
        return _coerce_value(key, label, value, proto, from_text=True)
    value = _scalar_from_text(text)
    return _coerce_value(key, label, value, proto, from_text=True, text=text)


def _coerce_value(
    key: str,
    label: str,
    value: Any,
    proto: Any,
    *,
    from_text: bool = False,
    text: str | None = None,
) -> Any:
    """Check a Python ``value`` against the type of ``proto`` and return it (floats widened)."""
    got = repr(text) if text is not None else f"{value!r} ({_type_name_of(value)})"
    if proto is _ANY:
        _check_plain(key, label, value, proto)
        return copy.deepcopy(value) if isinstance(value, (list, dict)) else value
    if proto is None:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _bad_value(key, label, proto, got)
    if value is None and key in NULLABLE_TEXT_KEYS and isinstance(proto, str):
        return None
    if value is None:
        raise ShituError(f"invalid override {label!r}: {key!r} can't be null (it expects {_expected(proto)})")
    if isinstance(proto, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(proto, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(proto, float):
        if from_text and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value.strip())  # '1e-3' inside a YAML list reads as a str
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                result = float(value)
            except OverflowError:  # an int too large for a float
                result = math.inf
            if math.isfinite(result):
                return result
    elif isinstance(proto, str):
        if isinstance(value, str):
            return value
    elif isinstance(proto, list) and isinstance(value, (list, tuple)):
        element = _element_proto(proto)
        result = []
        for index, item in enumerate(value):
            try:
                result.append(_coerce_value(key, label, item, element, from_text=from_text))
            except ShituError:
                raise _bad_value(key, label, proto, f"{item!r} ({_type_name_of(item)}) at index {index}") from None
        return result
    raise _bad_value(key, label, proto, got)


def _check_plain(key: str, label: str, value: Any, proto: Any) -> None:
    """Refuse values that are not plain YAML data (null, bool, int, float, str, list, mapping)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float) and math.isfinite(value):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(key, label, item, proto)
        return
    if isinstance(value, dict) and all(_bad_key_reason(k) is None for k in value):
        for item in value.values():
            _check_plain(key, label, item, proto)
        return
    raise _bad_value(key, label, proto, f"{value!r} ({_type_name_of(value)})")


def _split_override(text: Any) -> tuple[str, str]:
    """Split ``"Section.key=value"`` into ``(dotted key, value text)``."""
    if not isinstance(text, str):
        raise ShituError(f"malformed override {text!r}: expected a 'Section.key=value' string")
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise ShituError(f"malformed override {text!r}: missing '=' (use Section.key=value)")
    if not key:
        raise ShituError(f"malformed override {text!r}: empty key (use Section.key=value)")
    return key, value


def _normalize_overrides(overrides: Overrides) -> Iterator[tuple[str, str, Any, bool]]:
    """Yield ``(dotted key, label for messages, value, value_is_text)`` for each override."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if not isinstance(key, str) or not key.strip():
                raise ShituError(f"malformed override key {key!r}: expected a 'Section.key' string")
            yield key.strip(), f"{key}={value!r}", value, False
        return
    if not isinstance(overrides, Iterable):
        raise ShituError(f"overrides must be a list of 'Section.key=value' or a mapping, got {overrides!r}")
    for text in overrides:
        key, value = _split_override(text)
        yield key, text, value, True


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """Read-only view of plain data: mappings become mapping proxies, lists become tuples."""
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class Config(Mapping[str, Mapping[str, Any]]):
    """A loaded, validated configuration; a read-only mapping of sections.

    ``cfg["Train"]["batch_size"]`` and ``cfg.get("Train.batch_size")`` read values (sections are
    read-only mappings, lists are tuples); :meth:`to_dict` gives a mutable deep copy.  Build one
    with :func:`load_config`; derive changed copies with :meth:`with_overrides`.
    """

    __slots__ = ("_data", "_overrides", "_source", "_view")

    def __init__(self, data: Mapping[str, Any], *, source: str, overrides: Sequence[str] = ()) -> None:
        """Wrap a deep copy of ``data`` (a mapping of sections), loaded from ``source``."""
        self._data: dict[str, Any] = copy.deepcopy(dict(data))
        self._source = source
        self._overrides = list(overrides)
        self._view: Mapping[str, Mapping[str, Any]] = _freeze(self._data)

    @property
    def source(self) -> str:
        """The model name or YAML path this config was loaded from."""
        return self._source

    @property
    def overrides(self) -> list[str]:
        """The dotted keys that overrides changed, in the order first applied (a copy)."""
        return list(self._overrides)

    def __getitem__(self, section: str) -> Mapping[str, Any]:
        """The read-only section ``section``; KeyError if there is none."""
        return self._view[section]

    def __iter__(self) -> Iterator[str]:
        """Iterate over section names in file order."""
        return iter(self._view)

    def __len__(self) -> int:
        """Number of sections."""
        return len(self._view)

    def __repr__(self) -> str:
        return f"Config(source={self._source!r}, overrides={self._overrides!r})"

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Value at dotted ``key`` (``"Train.batch_size"``); a section gives a read-only mapping.

        An unknown key returns ``default`` when one is given, else raises ShituError with
        did-you-mean suggestions.
        """
        if not isinstance(key, str):
            raise ShituError(f"config keys are dotted strings like 'Train.batch_size', got {key!r}")
        node: Any = self._view
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, Mapping) or part not in node:
                if default is not _MISSING:
                    return default
                if not isinstance(node, Mapping):
                    where = ".".join(parts[:depth])
                    raise ShituError(f"{where!r} is not a section (its value is {node!r}), so it has no key {part!r}")
                raise _unknown_key(self._data, key, node, ".".join(parts[:depth]))
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        """A deep, mutable copy of the configuration as plain dicts and lists."""
        return copy.deepcopy(self._data)

    def to_yaml(self) -> str:
        """The configuration as YAML text (file order kept); loading it gives an equal config."""
        return yaml.safe_dump(self._data, sort_keys=False, allow_unicode=True)

    def with_overrides(self, overrides: Overrides) -> Config:
        """A new Config with ``overrides`` applied in order (rules as in :func:`load_config`).

        This config is left unchanged; the new one's :attr:`overrides` extends this one's.
        """
        data = copy.deepcopy(self._data)
        applied = list(self._overrides)
        for key, label, value, is_text in _normalize_overrides(overrides):
            parent, leaf = _locate(data, key, label)
            proto = parent[leaf]
            try:
                if is_text:
                    parent[leaf] = _coerce_text(key, label, value, proto)
                else:
                    parent[leaf] = _coerce_value(key, label, value, proto)
            except RecursionError:  # e.g. a self-referencing YAML list: &a [*a]
                raise ShituError(f"invalid override {label!r}: value nested too deeply or refers to itself") from None
            if key not in applied:
                applied.append(key)
        return Config(data, source=self._source, overrides=applied)
