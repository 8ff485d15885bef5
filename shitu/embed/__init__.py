"""Images to features: model references resolved to recognizers (:mod:`shitu.embed.resolve`), the
recognizer itself (:mod:`shitu.embed.recognizer`) and the PaddleX-like predict API (:mod:`shitu.embed.predict`).

Importing this package loads neither JAX nor numpy.
"""

from __future__ import annotations

from shitu.embed.resolve import (
    RandomWeightsWarning,
    installed_bundle,
    is_path_reference,
    locate_model,
    model_config,
    resolve_model,
)

__all__ = [
    "RandomWeightsWarning",
    "installed_bundle",
    "is_path_reference",
    "locate_model",
    "model_config",
    "resolve_model",
]
