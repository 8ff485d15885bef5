"""Paddle weight files read without PaddlePaddle: ``.pdparams`` checkpoints (restricted unpickling) and
inference models (``inference.json``/``inference.pdmodel`` + ``inference.pdiparams``).

Only numpy and the standard library are used; nothing from a file is ever executed.
"""

from __future__ import annotations

from shitu.weights.paddle_inference import InferenceModel, Op, VarInfo, load_inference_model, read_pdiparams
from shitu.weights.pdparams import load_pdparams, load_pdparams_name_table

__all__ = [
    "InferenceModel",
    "Op",
    "VarInfo",
    "load_inference_model",
    "load_pdparams",
    "load_pdparams_name_table",
    "read_pdiparams",
]
