"""Model bundles: a folder that ``eval``, ``predict`` and ``train --pretrained`` accept.

Layout::

    BUNDLE/
      shitu_model.json   which model, class count, architecture options, form, versions
      config.yaml        the config the model was made with
      params/            an Orbax checkpoint of the model's parameters and BatchNorm statistics

This is the only module that imports Orbax for bundles. RNG state is never saved. A bundle is written in
a hidden staging sibling and swapped into place whole (:func:`shitu.fileio.atomic_directory`), so a crash
never leaves half a bundle; a full disk or a read-only folder is one StorageError naming the bundle.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shitu.errors import ShituError
from shitu.fileio import atomic_directory, atomic_write_json, atomic_write_text

INFO_FILE = "shitu_model.json"
CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
FORMAT = "shitu-model-bundle"
FORMAT_VERSION = 1


@dataclass
class BundleInfo:
    """The contents of ``shitu_model.json``."""

    model: str
    num_classes: int
    arch: dict[str, Any] = field(default_factory=dict)
    embedding_size: int = 512
    input_size: int = 224
    shitu_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: CRC-32 of every parameter (see :func:`params_checksum`); empty in bundles written before it existed.
    params_crc32: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}


@dataclass
class LoadedBundle:
    """A bundle read back: its spec, the model (in eval mode), the info and the config."""

    path: Path
    spec: Any
    model: Any
    info: BundleInfo
    config: Any


def params_checksum(state: Any) -> str:
    """CRC-32 (hex) over every leaf of ``state``: its tree path, dtype, shape and bytes, in tree order.

    Written into ``shitu_model.json`` and checked on load, so a bundle whose array files were damaged on disk
    (Orbax stores them without checksums: a flipped bit loads as a different weight) is refused instead of
    used. A CRC detects damage, not tampering (whoever can edit the arrays can edit the JSON too).
    """
    import zlib

    import jax
    import numpy as np

    crc = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}".encode(), crc)
        crc = zlib.crc32(memoryview(array).cast("B"), crc)
    return f"{crc:08x}"


def _int_field(doc: dict[str, Any], key: str, default: int | None = None) -> int:
    """A whole-number field of ``shitu_model.json`` (a JSON integer, not 3.7 or "3" or true)."""
    value = doc.get(key, default) if default is not None else doc[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    return value


def _nnx_filters() -> tuple[Any, Any]:
    from flax import nnx

    return nnx.Not(nnx.RngState), nnx.RngState


def save_bundle(
    path: str | os.PathLike[str],
    *,
    spec: Any,
    model: Any,
    num_classes: int,
    config: Any | None = None,
    arch: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    single_process: bool = False,
) -> Path:
    """Write ``model`` (built from ``spec`` with ``num_classes`` and ``arch``) as a bundle at ``path``.

    An existing bundle at ``path`` is replaced only once the new one is complete. ``single_process``: this
    process writes alone, with no barrier waiting for the others of a multi-process run (the state is copied
    to the host and Orbax told this process is the only one taking part); call it from one process only. In a
    lone process it changes nothing.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from shitu import __version__
    from shitu.runtime.distributed import process_count, process_index

    target = Path(path).absolute()
    if target.exists() and not (target / INFO_FILE).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise ShituError("exists and is not a shitu model bundle; refusing to replace it", path=target)
    info = BundleInfo(
        model=spec.name,
        num_classes=int(num_classes),
        arch=dict(arch or {}),
        embedding_size=spec.embedding_size,
        input_size=spec.input_size,
        shitu_version=__version__,
        extra=dict(extra or {}),
    )
    keep, _ = _nnx_filters()
    state = nnx.state(model, keep)
    options: dict[str, Any] = {}
    if single_process and process_count() > 1:
        here = process_index()
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=here, active_processes={here}
        )
        state = jax.device_get(state)  # Orbax refuses a process-local jax.Array when others do not take part
    info.params_crc32 = params_checksum(state)
    with atomic_directory(target) as staging:
        checkpointer = ocp.StandardCheckpointer(**options)
        try:
            checkpointer.save(staging.absolute() / PARAMS_DIR, state)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        if config is not None:
            atomic_write_text(staging / CONFIG_FILE, config.to_yaml())
        atomic_write_json(staging / INFO_FILE, info.to_json())
    return target


def read_bundle_info(path: str | os.PathLike[str]) -> BundleInfo:
    """Read and validate ``shitu_model.json``; a clear ShituError for anything that is not a bundle."""
    from shitu.fileio import recover_directory

    folder = Path(path)
    file = folder / INFO_FILE
    if not folder.exists():
        recover_directory(folder)  # an interrupted two-rename save left the previous bundle aside: put it back
    if not folder.is_dir():
        raise ShituError("model bundle folder does not exist", path=folder)
    if not file.is_file():
        raise ShituError(f"not a shitu model bundle (no {INFO_FILE})", path=folder)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShituError(f"unreadable bundle description: {exc}", path=file) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ShituError("not a shitu model bundle description", path=file)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ShituError(f"bundle format version {doc.get('format_version')!r} is not supported", path=file)
    try:
        model, arch, extra = doc["model"], doc.get("arch") or {}, doc.get("extra") or {}
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a model name, got {model!r}")
        if not isinstance(arch, dict) or not all(isinstance(k, str) and k.isidentifier() for k in arch):
            raise ValueError(f"arch must map option names to values, got {arch!r}")
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be a mapping, got {extra!r}")
        info = BundleInfo(
            model=model,
            num_classes=_int_field(doc, "num_classes"),
            arch=arch,
            embedding_size=_int_field(doc, "embedding_size", 512),
            input_size=_int_field(doc, "input_size", 224),
            shitu_version=str(doc.get("shitu_version", "")),
            extra=extra,
            params_crc32=str(doc.get("params_crc32") or ""),
        )
    except KeyError as exc:
        raise ShituError(f"invalid bundle description: {exc.args[0]!r} is missing", path=file) from None
    except (TypeError, ValueError) as exc:
        raise ShituError(f"invalid bundle description: {exc}", path=file) from None
    if info.num_classes < 1:
        raise ShituError("invalid bundle description: num_classes must be at least 1", path=file)
    return info


def load_bundle(path: str | os.PathLike[str], *, host: Any | None = None) -> LoadedBundle:
    """Rebuild the model of the bundle at ``path`` and restore its parameters; the model is in eval mode."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from shitu.config import load_config
    from shitu.plugins import get_host

    folder = Path(path).absolute()
    info = read_bundle_info(folder)
    spec = (host or get_host()).model(info.model)
    config_file = folder / CONFIG_FILE
    config = load_config(config_file) if config_file.is_file() else load_config(spec.config)
    params_dir = folder / PARAMS_DIR
    if not params_dir.is_dir():
        raise ShituError(f"bundle has no {PARAMS_DIR}/ checkpoint", path=folder)
    keep, rng_filter = _nnx_filters()
    try:
        abstract = nnx.eval_shape(lambda: spec.build(info.num_classes, **info.arch))
    except Exception as exc:  # options the model's builder does not take, or values it cannot use
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ShituError(
            f"the bundle's options (num_classes {info.num_classes}, arch {info.arch}) do not build {spec.name}: "
            f"{reason}",
            path=folder / INFO_FILE,
        ) from None
    graphdef, abstract_state, _ = nnx.split(abstract, keep, ...)
    try:
        checkpointer = ocp.StandardCheckpointer()
        restored = checkpointer.restore(params_dir, abstract_state)
        checkpointer.close()
    except Exception as exc:  # Orbax raises many types for truncated or foreign files
        message = " ".join(str(exc).split())[:300]
        raise ShituError(
            f"cannot restore the checkpoint (corrupt, truncated or another model): {message}", path=params_dir
        ) from None
    if info.params_crc32 and params_checksum(restored) != info.params_crc32:
        raise ShituError(
            "the checkpoint's parameters do not match the checksum in the bundle description (damaged on disk)",
            path=params_dir,
        )
    rng_state = nnx.state(spec.build(info.num_classes, **info.arch), rng_filter)
    model = nnx.merge(graphdef, restored, rng_state)
    model.eval()
    return LoadedBundle(path=folder, spec=spec, model=model, info=info, config=config)
