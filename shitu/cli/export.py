"""``shitu export``: a model as ONNX or serialized StableHLO, with its preprocessing described."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._options import CalibrationOption, JsonOption
from shitu.cli._output import Output
from shitu.errors import ShituError


class ExportFormat(StrEnum):
    onnx = "onnx"
    stablehlo = "stablehlo"


class ExportPrecision(StrEnum):
    fp32 = "fp32"
    int8 = "int8"


def _parse_batch(text: str) -> int | None:
    if text.strip().lower() == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ShituError(f"--batch expects a number or 'dynamic', got {text!r}") from None
    if value < 1:
        raise ShituError(f"--batch must be at least 1, got {value}")
    return value


def export(
    output: Annotated[Path, typer.Option("--output", help="The folder to write (replaced as a whole).")],
    model_dir: Annotated[Path | None, typer.Option("--model-dir", help="A model bundle folder.")] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="A model name: its installed bundle, else RANDOM weights."),
    ] = None,
    format: Annotated[ExportFormat, typer.Option("--format", help="onnx or stablehlo (jax.export).")] = (
        ExportFormat.onnx
    ),
    batch: Annotated[
        str, typer.Option("--batch", metavar="N|dynamic", help="A fixed batch size, or dynamic (any).")
    ] = "dynamic",
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=8, help="Image size the model takes (default: the model's).")
    ] = None,
    precision: Annotated[
        ExportPrecision,
        typer.Option("--precision", help="fp32, or int8 (ONNX; quantized on the --calibration images)."),
    ] = ExportPrecision.fp32,
    calibration: CalibrationOption = None,
    json: JsonOption = False,
) -> int:
    """Export a model's forward pass: preprocessed float32 NHWC images in, unit-length features out.

    OUTPUT holds model.onnx or model.stablehlo, preprocess.json (size, mean/std, interpolation, channel
    order, layout) and model.json (model, embedding size, source bundle and checksum, format). The export is
    run once on a random batch and compared with shitu's own features before the folder is written.

    --precision int8 quantizes the checked graph (int8 QDQ: ONNX Runtime and OpenVINO run it), its ranges
    measured on the --calibration images; model.json records their number and hash, and the int8 features'
    lowest cosine to shitu's on them.
    """
    from rich.markup import escape

    from shitu.cli._shared import shown_warnings
    from shitu.export import export_model
    from shitu.runtime import configure_jax

    out = Output(json)
    if (model is None) == (model_dir is None):
        raise ShituError("give either --model NAME or --model-dir BUNDLE")
    fixed = _parse_batch(batch)
    configure_jax()
    with shown_warnings(out):
        result = export_model(
            model_dir if model_dir is not None else str(model),
            output,
            format=format.value,
            batch=fixed,
            input_size=input_size,
            precision=precision.value,
            calibration=calibration or None,
        )
    out.emit(result.to_json())
    verified = result.info.get("verified", {})
    out.info(
        f"[green]Exported[/] {escape(result.info['model'])} ({result.format}, batch {result.info['export']['batch']}, "
        f"{result.info['input_size']} px) to {escape(str(result.model_file))} in {result.seconds:.1f} s; "
        f"max difference to shitu's features {verified.get('max_abs_diff', float('nan')):.2g}"
    )
    quantization = result.info["export"].get("quantization")
    if quantization is not None:
        out.info(
            f"int8: calibrated on {quantization['calibration']['images']} images "
            f"(sha256 {quantization['calibration']['sha256'][:16]}); lowest cosine to shitu's fp32 features "
            f"{quantization['min_cosine_to_fp32']:.4f} on {quantization['cosine_images']} of them"
        )
    return 0


def register(app: typer.Typer) -> None:
    app.command("export")(export)
