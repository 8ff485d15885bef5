"""Options shared by several commands, defined once."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON on stdout (and nothing else there).")
]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option(
        "-o",
        "--override",
        metavar="SECTION.KEY=VALUE",
        help="Override a config value, PaddleX style (repeatable), e.g. -o CheckDataset.sample_num=5.",
    ),
]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model whose config supplies the defaults.")]
OutputDirOption = Annotated[
    Path | None, typer.Option("--output", help="Folder for results (default: Global.output, 'output').")
]
ModelNameOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="A registered model name: its installed bundle (shitu's cache, models/NAME), else its published "
        "weights, downloaded and installed on first use (see 'shitu models').",
    ),
]
RandomWeightsOption = Annotated[
    bool,
    typer.Option(
        "--random-weights", help="With --model NAME: build the network with random weights instead (no download)."
    ),
]


class Backend(StrEnum):
    jax = "jax"
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    auto = "auto"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"


BackendOption = Annotated[
    Backend,
    typer.Option(
        "--backend",
        help="Where the model runs: jax, onnxruntime or openvino (the exported model, cached), or auto (the "
        "fastest measured here).",
    ),
]
PrecisionOption = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="fp32; bf16 where the backend and CPU have a bf16 path; int8 (onnxruntime, openvino) quantized on "
        "the --calibration images.",
    ),
]
CalibrationOption = Annotated[
    list[str] | None,
    typer.Option(
        "--calibration",
        metavar="PATH",
        help="With --precision int8: images the int8 ranges are measured on (files, folders, list files; "
        "repeatable; e.g. the gallery; at most 300, a seeded sample).",
    ),
]
