"""Official weights by name: the published archives and checkpoints of each model, fetched, verified and cached.

This package is the only part of shitu that downloads. See :mod:`shitu.hub.store` for the cache layout.
"""

from __future__ import annotations

from shitu.hub.sources import PublishedWeights, mirrored
from shitu.hub.store import (
    CachedFile,
    bundle_path,
    cached_files,
    downloads_path,
    ensure_inference_bundle,
    published_training_weights,
)

__all__ = [
    "CachedFile",
    "PublishedWeights",
    "bundle_path",
    "cached_files",
    "downloads_path",
    "ensure_inference_bundle",
    "mirrored",
    "published_training_weights",
]
