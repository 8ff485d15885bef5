"""Built-in plugin: the three recognition models of PaddleX's image recognition module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import shitu.hub.sources as published_weights
from shitu import hookimpl
from shitu.models import pplcnetv2_recipe, vit_recipe
from shitu.models.spec import ModelSpec


def pplcnet_arch_for_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A re-parameterized state (exported models: fused ``dw_conv`` kernels, no branches) needs the deploy form."""
    fused = any(key.endswith(".dw_conv.weight") for key in state)
    branches = any(".dw_conv_list." in key for key in state)
    return {"deploy": True} if fused and not branches else {}


PP_SHITUV2_REC = ModelSpec(
    name="PP-ShiTuV2_rec",
    description="PP-LCNetV2_base (ShiTu variant) + BNNeck(512); training head FC; CE(ε 0.1) + triplet angular loss",
    published=published_weights.PublishedWeights.paddlex("PP-ShiTuV2_rec", approx_mb=16.3),
    builder="shitu.models.pplcnetv2:build_pp_shituv2_rec",
    paddle_importer="shitu.models.pplcnetv2:import_paddle_state",
    paddle_arch="shitu.builtin.models:pplcnet_arch_for_state",
    paddle_structure="shitu.weights.structure:pplcnetv2_names",
    config="PP-ShiTuV2_rec",
    recipe=pplcnetv2_recipe.RECIPE,
)

# PaddleClas trains and evaluates the CLIP models with bicubic resizing, but PaddleX's predictor resizes
# bilinearly whatever the config says; we follow the predictor so features match PaddleX's.
CLIP_VIT_BASE = ModelSpec(
    name="PP-ShiTuV2_rec_CLIP_vit_base",
    description="CLIP ViT-B/16 at 224 + FC(512) neck; training head ArcMargin(m 0.2, s 30)",
    published=published_weights.PublishedWeights.paddlex("PP-ShiTuV2_rec_CLIP_vit_base", approx_mb=306.6),
    builder="shitu.models.vit:build_clip_vit_base",
    paddle_importer="shitu.models.vit:import_paddle_state",
    paddle_structure="shitu.weights.structure:clip_vit_names",
    config="PP-ShiTuV2_rec_CLIP_vit_base",
    recipe=vit_recipe.RECIPE,
)

CLIP_VIT_LARGE = ModelSpec(
    name="PP-ShiTuV2_rec_CLIP_vit_large",
    description="CLIP ViT-L/14 at 224 + FC(512) neck; training head ArcMargin(m 0.2, s 30)",
    published=published_weights.PublishedWeights.paddlex("PP-ShiTuV2_rec_CLIP_vit_large", approx_mb=1050),
    builder="shitu.models.vit:build_clip_vit_large",
    paddle_importer="shitu.models.vit:import_paddle_state",
    paddle_structure="shitu.weights.structure:clip_vit_names",
    config="PP-ShiTuV2_rec_CLIP_vit_large",
    recipe=vit_recipe.RECIPE,
)


@hookimpl
def register_models(register):
    for spec in (PP_SHITUV2_REC, CLIP_VIT_BASE, CLIP_VIT_LARGE):
        register(spec)
