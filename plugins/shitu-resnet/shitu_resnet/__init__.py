"""shitu plugin: ResNet18_rec, a ResNet-18 embedding network (BNNeck 512, ArcMargin head) with its own
training recipe and default config."""

from __future__ import annotations

import shitu
from shitu.models.spec import ModelSpec, TrainingRecipe

__version__ = "0.1.0"

RECIPE = TrainingRecipe(
    loss="shitu_resnet.recipe:loss",
    train_transform="shitu_resnet.recipe:train_transform",
    parameter_groups="shitu_resnet.recipe:parameter_groups",
    weight_decay=5e-4,
    sampler="shuffle",
)

RESNET18_REC = ModelSpec(
    name="ResNet18_rec",
    description="ResNet-18 (BasicBlocks [2,2,2,2]) + BNNeck(512); training head ArcMargin(m 0.2, s 30); CE(ε 0.1)",
    builder="shitu_resnet.model:build_resnet18_rec",
    config="shitu_resnet:configs/ResNet18_rec.yaml",
    embedding_size=512,
    input_size=224,
    recipe=RECIPE,
)


@shitu.hookimpl
def register_models(register):
    register(RESNET18_REC)
