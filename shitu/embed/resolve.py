"""Turning a model reference into a recognizer (and its config), in one place for every command and the API.

A model reference is one of:

- a bundle folder (``shitu train`` / ``shitu import-weights`` make one): any path that exists, or that
  contains a path separator or starts with '.';
- a registered model name (``PP-ShiTuV2_rec``...): the bundle installed for it at
  ``shitu.runtime.cache_dir()/models/NAME`` (:func:`installed_bundle`); else, when its spec names published
  weights, those weights fetched, imported and installed there first (:func:`shitu.hub.ensure_inference_bundle`:
  a clear error offline or when unreachable); else, or with ``pretrained=False``, the network with random
  weights and a :class:`RandomWeightsWarning` (see :func:`_without_installed_weights`).

This module imports neither JAX nor numpy; the loaders are imported when a model is loaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shitu.config import Config
    from shitu.embed.recognizer import Recognizer


class RandomWeightsWarning(UserWarning):
    """A model was built with random weights: its features are not meaningful for recognition."""


def is_path_reference(reference: str | os.PathLike[str]) -> bool:
    """Whether ``reference`` names a bundle folder rather than a registered model: a path object, a path
    that exists, or text with a path separator or starting with '.'."""
    if isinstance(reference, os.PathLike):
        return True
    return Path(reference).exists() or "/" in reference or os.sep in reference or reference.startswith(".")


def installed_bundle(name: str) -> Path | None:
    """The bundle installed for model ``name`` at ``shitu.runtime.cache_dir()/models/NAME``, if any: the one
    place the cache of installed models is looked up."""
    from shitu.errors import ShituError
    from shitu.hub import bundle_path
    from shitu.models.bundle import INFO_FILE

    try:
        folder = bundle_path(name)  # where the hub installs a model's published weights
    except ShituError:  # a name that cannot be a cache folder has nothing installed
        return None
    return folder if (folder / INFO_FILE).is_file() else None


def locate_model(reference: str | os.PathLike[str], *, pretrained: bool = True) -> Path | str:
    """The bundle folder ``reference`` stands for (given; installed for a registered name; or the name's
    published weights, fetched and installed now), or the registered name itself for random weights: with
    ``pretrained=False``, or when the model publishes no weights and none are installed."""
    if is_path_reference(reference):
        return Path(reference)
    name = os.fspath(reference)
    if not pretrained:
        return name
    installed = installed_bundle(name)
    if installed is not None:
        return installed
    from shitu.plugins import get_host

    spec = get_host().model(name)  # an unknown name is a ShituError listing the registered ones
    if spec.published is None or not spec.published.inference_url:
        return name
    from shitu.hub import ensure_inference_bundle

    return ensure_inference_bundle(spec)


def resolve_model(
    reference: str | os.PathLike[str],
    *,
    input_size: int | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    host: Any | None = None,
    pretrained: bool = True,
    backend: str | None = None,
    precision: str | None = None,
    calibration: Any = None,
) -> Recognizer:
    """The :class:`~shitu.embed.recognizer.Recognizer` of ``reference`` (a bundle folder or a registered
    model name, see the module's docstring). ``input_size`` overrides the size images are resized to
    (default: the bundle's, else the model's); ``seed`` and ``num_classes`` only matter for a name without
    an installed bundle. ``pretrained=False`` builds a name with random weights on purpose. A ShituError for a
    missing or damaged bundle, an unknown name, and published weights that cannot be fetched.

    ``backend``/``precision``: where the forward pass runs (see :mod:`shitu.export.backends`); by default
    the selection of :func:`shitu.export.backends.inference_backend`, else JAX in fp32; ``calibration``: the
    images ``int8`` is calibrated on (see :func:`shitu.export.quantize.calibration_set`)."""
    from shitu.embed import recognizer
    from shitu.export.backends import apply_backend

    located = locate_model(reference, pretrained=pretrained)
    if isinstance(located, Path):
        loaded = recognizer.load_recognizer(located, input_size=input_size, host=host)
    else:
        loaded = _without_installed_weights(
            located, input_size=input_size, seed=seed, num_classes=num_classes, host=host
        )
    apply_backend(loaded, backend, precision, calibration)
    return loaded


def _without_installed_weights(
    name: str, *, input_size: int | None, seed: int, num_classes: int | None, host: Any | None
) -> Recognizer:
    """A registered model that has no bundle installed: THE one place this case is handled.

    The network with random weights (``seed``) and a :class:`RandomWeightsWarning`.
    """
    from shitu.embed import recognizer

    loaded = recognizer.load_recognizer(name, input_size=input_size, seed=seed, num_classes=num_classes, host=host)
    warnings.warn(
        RandomWeightsWarning(
            f"{name} has RANDOM weights: its features are meaningless for recognition; pass a bundle folder "
            "(shitu train / shitu import-weights make one) or, for a model that publishes weights, leave out "
            "--random-weights (pretrained=False)"
        ),
        stacklevel=3,
    )
    return loaded


def model_config(
    reference: str | os.PathLike[str], overrides: Sequence[str] = (), *, pretrained: bool = True
) -> Config:
    """The config of ``reference`` with ``-o`` style ``overrides`` applied: the bundle's own config file
    (or its model's config when it has none), or the registered model's config."""
    from shitu.config import load_config
    from shitu.models.bundle import CONFIG_FILE, read_bundle_info

    located = locate_model(reference, pretrained=pretrained)
    if not isinstance(located, Path):
        return load_config(located, list(overrides))
    if (located / CONFIG_FILE).is_file():
        return load_config(located / CONFIG_FILE, list(overrides))
    return load_config(read_bundle_info(located).model, list(overrides))
