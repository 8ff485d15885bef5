"""Where a model's published weights live, and how ``SHITU_MODEL_MIRROR`` rewrites those addresses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from shitu.errors import ShituError

#: PaddleX's object store (its "bos" model source), as linked from PaddleX's model tables and used by
#: ``paddlex/inference/utils/official_models.py``. PaddleX's other sources (Hugging Face, ModelScope,
#: AIStudio) carry only its OCR models, so this is the one place the recognition models are published.
PADDLEX_INFERENCE_BASE = "https://paddle-model-ecology.bj.bcebos.com/paddlex/official_inference_model/paddle3.0.0"
PADDLEX_PRETRAINED_BASE = "https://paddle-model-ecology.bj.bcebos.com/paddlex/official_pretrained_model"

MIRROR_ENV = "SHITU_MODEL_MIRROR"


@dataclass(frozen=True)
class PublishedWeights:
    """The published weights of one model.

    - ``inference_url``: a tar archive holding a Paddle inference model (``<name>_infer.tar`` with
      ``<name>_infer/inference.json`` or ``.pdmodel``, ``inference.pdiparams``, ``inference.yml``);
    - ``pretrained_url``: the training weights (``<name>_pretrained.pdparams``);
    - ``*_sha256``: the expected digest where the publisher states one (PaddleX does not); a download that
      differs is refused. Without one, the digest of the first download is recorded and later ones must match;
    - ``*_size``: the expected size in bytes, when known (checked like the digest);
    - ``approx_mb``: the size PaddleX's table gives, shown before a download (informative only).
    """

    inference_url: str | None = None
    pretrained_url: str | None = None
    inference_sha256: str | None = None
    pretrained_sha256: str | None = None
    inference_size: int | None = None
    pretrained_size: int | None = None
    approx_mb: float | None = None

    @classmethod
    def paddlex(cls, name: str, *, approx_mb: float | None = None) -> PublishedWeights:
        """The addresses PaddleX publishes model ``name`` under."""
        return cls(
            inference_url=f"{PADDLEX_INFERENCE_BASE}/{name}_infer.tar",
            pretrained_url=f"{PADDLEX_PRETRAINED_BASE}/{name}_pretrained.pdparams",
            approx_mb=approx_mb,
        )


def mirrored(url: str) -> str:
    """``url`` with its scheme and host replaced by ``$SHITU_MODEL_MIRROR`` (when set); the path is kept.

    A mirror with a path of its own (``http://host/prefix``) puts that path in front of the URL's path.
    """
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ShituError(
            f"{MIRROR_ENV}={mirror!r} is not an http(s)://host[:port] address",
            hint="set it like http://127.0.0.1:8000, or unset it to use the published addresses",
        )
    original = urlsplit(url)
    path = parts.path.rstrip("/") + original.path
    return urlunsplit((parts.scheme, parts.netloc, path, original.query, ""))
