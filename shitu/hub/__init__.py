"""Official weights by name: the published archives and checkpoints of each model, fetched, verified and cached.

This package is the only part of shitu that downloads. See :mod:`shitu.hub.store` for the cache layout. The
package root stays light (model specs import :class:`PublishedWeights` from it); the rest loads on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from shitu.hub.sources import PublishedWeights, mirrored

_LAZY = {
    "CachedFile": "shitu.hub.store",
    "bundle_path": "shitu.hub.store",
    "cached_files": "shitu.hub.store",
    "downloads_path": "shitu.hub.store",
    "ensure_inference_bundle": "shitu.hub.store",
    "published_training_weights": "shitu.hub.store",
    "training_weights_from_url": "shitu.hub.store",
}

__all__ = ["PublishedWeights", "mirrored", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shitu.hub' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
