"""``shitu serve``: the recognition service (PaddleX's PP-ShiTuV2 serving routes and a native /v1 API)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._options import Backend, BackendOption, CalibrationOption, Precision, PrecisionOption
from shitu.errors import ShituError


def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="A model name: its installed bundle, else RANDOM weights."),
    ] = None,
    model_dir: Annotated[Path | None, typer.Option("--model-dir", help="A model bundle folder.")] = None,
    index: Annotated[
        Path | None,
        typer.Option("--index", help="An index folder (shitu index build) that seeds the default gallery once."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (not loopback: an API key is needed).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to bind.")] = 8000,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Where galleries persist (default: shitu's cache folder, serve/)."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=1024, help="Images per model call.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", min=0.0, max=1000.0, help="Wait for more images this long.")
    ] = 5.0,
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=8, help="Resize to this size (default: the model's).")
    ] = None,
    backend: BackendOption = Backend.jax,
    precision: PrecisionOption = Precision.fp32,
    calibration: CalibrationOption = None,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Images per request.")] = 64,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Request body limit.")] = 32.0,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", min=1, help="Refuse larger images (decompression bombs).")
    ] = 40_000_000,
    api_key_file: Annotated[
        Path | None,
        typer.Option("--api-key-file", help="A file holding the API key (else $SHITU_API_KEY; none: no key)."),
    ] = None,
    allow_url_host: Annotated[
        list[str] | None,
        typer.Option("--allow-url-host", help="Accept http(s) URL inputs from this host (repeatable; default none)."),
    ] = None,
    compact_every: Annotated[
        int, typer.Option("--compact-every", min=1, help="Fold the journal into the index after this many writes.")
    ] = 256,
) -> None:
    """Serve recognition over HTTP until interrupted: PaddleX's /shitu-* routes, /v1, /docs, /metrics.

    Binds 127.0.0.1 by default. Every write is on disk before it is acknowledged.
    """
    try:
        from shitu.serve.app import ServeSettings, run
    except ImportError as exc:
        raise ShituError(
            f"the service needs its extra packages ({exc.name} is missing)", hint="pip install 'shitu[serve]'"
        ) from None

    if (model is None) == (model_dir is None):
        raise ShituError("give either --model NAME or --model-dir BUNDLE")
    calibration_images = None
    if precision == Precision.int8:  # resolved (and refused when missing) before the server binds its port
        from shitu.export.quantize import calibration_set

        calibration_images = calibration_set(calibration)
    elif calibration:
        raise ShituError("calibration images are used with --precision int8 only")
    settings = ServeSettings(
        model=model_dir.absolute() if model_dir is not None else str(model),
        index=index.absolute() if index is not None else None,
        state_dir=state_dir.absolute() if state_dir is not None else None,
        host=host,
        port=port,
        input_size=input_size,
        backend=str(backend.value),
        precision=str(precision.value),
        calibration=calibration_images,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_images=max_images,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        api_key=_api_key(api_key_file),
        url_hosts=tuple(h.lower() for h in allow_url_host or ()),
        compact_every=compact_every,
    )
    from shitu.runtime import configure_jax

    configure_jax()
    run(settings)


def _api_key(path: Path | None) -> str | None:
    """The API key: the first line of ``path``, else ``$SHITU_API_KEY``; never a command-line value."""
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ShituError(f"cannot read the API key: {exc}", path=path) from None
        if not key:
            raise ShituError("the API key file is empty", path=path)
        return key
    return os.environ.get("SHITU_API_KEY") or None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
