"""shitu: image recognition by feature extraction, on JAX.

The package root stays light (no JAX, no image libraries) so that the command line starts fast; the
public functions below are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pluggy

from shitu.errors import ShituError

try:
    __version__ = version("shitu")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Decorator for plugin hook implementations: ``@shitu.hookimpl def register_dataset_formats(register): ...``
hookimpl = pluggy.HookimplMarker("shitu")

_LAZY = {
    "check_dataset": "shitu.data.check",
    "convert_dataset": "shitu.data.convert",
    "split_dataset": "shitu.data.split",
    "split_samples": "shitu.data.split",
    "demo_dataset_path": "shitu.data.demo",
    "load_config": "shitu.config",
    "Config": "shitu.config",
    "DatasetFormat": "shitu.data.formats",
    "ConversionPlan": "shitu.data.formats",
    "Issue": "shitu.data.formats",
    "Sample": "shitu.data.formats",
    "SplitOptions": "shitu.data.formats",
    "get_host": "shitu.plugins",
    "create_model": "shitu.embed.predict",
    "resolve_inputs": "shitu.data.inputs",
    "resolve_model": "shitu.embed.resolve",
    "Predictor": "shitu.embed.predict",
    "FeatureResult": "shitu.embed.predict",
    "RandomWeightsWarning": "shitu.embed.resolve",
    "SkippedFileWarning": "shitu.data.inputs",
    "load_recognizer": "shitu.embed.recognizer",
    "Recognizer": "shitu.embed.recognizer",
}

__all__ = ["ShituError", "__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shitu' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
