"""ResNet18_rec: a ResNet-18 backbone (He et al. 2016, BasicBlocks [2, 2, 2, 2]) with a BNNeck embedding and an
ArcMargin training head, in Flax NNX, following shitu's module contract (``shitu.models.spec``):

- ``model(x)``: float32 NHWC images, normalised → ``features`` [B, 512], *not* L2-normalised;
- ``model.logits(features, labels)`` → training logits [B, num_classes] (the margin needs ``labels``);
- ``model.train()`` / ``model.eval()`` switch BatchNorm statistics and the head's margin.

Layout: stem conv 7×7/2 + BN + ReLU, max-pool 3×3/2; four stages of two BasicBlocks (3×3 conv-BN-ReLU,
3×3 conv-BN, plus the input, ReLU; a 1×1 conv-BN shortcut where the shape changes) with widths
``w·(1, 2, 4, 8)`` and strides (1, 2, 2, 2); global average pool; neck Linear(8w → 512) + BatchNorm1D
(BNNeck: the features are the BatchNorm's output); head ArcMargin(margin 0.2, scale 30).
``w = round(width · scale)``: 64 is the published ResNet-18; small values make tiny test networks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shitu.errors import ShituError
from shitu.models.heads import ArcMargin, paddle_xavier_normal
from shitu.models.layers import ConvBN, batch_norm

EMBEDDING_SIZE = 512
STAGE_BLOCKS = (2, 2, 2, 2)
STAGE_STRIDES = (1, 2, 2, 2)
HEAD_MARGIN = 0.2
HEAD_SCALE = 30.0


class BasicBlock(nnx.Module):
    """Two 3×3 conv-BN layers and a shortcut: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs) -> None:
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride, rngs=rngs)
        self.conv2 = ConvBN(out_channels, out_channels, 3, 1, use_act=False, rngs=rngs)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = nnx.data(
            ConvBN(in_channels, out_channels, 1, stride, use_act=False, rngs=rngs) if changes_shape else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(self.conv2(self.conv1(x)) + identity)


class ResNet18(nnx.Module):
    """The backbone: NHWC images → pooled features [B, 8·width]."""

    def __init__(self, width: int, *, rngs: nnx.Rngs) -> None:
        self.stem = ConvBN(3, width, 7, 2, rngs=rngs)
        stages = []
        in_channels = width
        for index, (blocks, stride) in enumerate(zip(STAGE_BLOCKS, STAGE_STRIDES, strict=True)):
            out_channels = width * 2**index
            stage = [BasicBlock(in_channels, out_channels, stride, rngs=rngs)]
            stage += [BasicBlock(out_channels, out_channels, 1, rngs=rngs) for _ in range(blocks - 1)]
            stages.append(nnx.List(stage))
            in_channels = out_channels
        self.stages = nnx.List(stages)
        self.out_channels = in_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem(x)
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return jnp.mean(x, axis=(1, 2))


class BNNeck(nnx.Module):
    """Linear(in → embedding_size) then BatchNorm1D; the BatchNorm's output is the feature.

    The BatchNorm's bias is kept at zero by the recipe (frozen), as in the BNNeck of Luo et al. 2019."""

    def __init__(self, in_features: int, embedding_size: int, *, rngs: nnx.Rngs) -> None:
        self.fc = nnx.Linear(in_features, embedding_size, kernel_init=paddle_xavier_normal, rngs=rngs)
        self.feat_bn = batch_norm(embedding_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.feat_bn(self.fc(x))


class ResNetRec(nnx.Module):
    """ResNet-18 + BNNeck(512) + ArcMargin head (module docstring)."""

    def __init__(self, num_classes: int, *, width: int, embedding_size: int, rngs: nnx.Rngs) -> None:
        self.backbone = ResNet18(width, rngs=rngs)
        self.neck = BNNeck(self.backbone.out_channels, embedding_size, rngs=rngs)
        self.head = ArcMargin(embedding_size, num_classes, margin=HEAD_MARGIN, scale=HEAD_SCALE, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.neck(self.backbone(x))

    def logits(self, features: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        return self.head(features, labels)


def build_resnet18_rec(
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    width: int = 64,
    scale: float = 1.0,
    embedding_size: int = EMBEDDING_SIZE,
) -> ResNetRec:
    """``ModelSpec.builder``: ResNet18_rec for ``num_classes`` classes, randomly initialised from ``rngs``.

    ``width`` is the stem's channel count (64 = ResNet-18); ``scale`` multiplies it (shitu passes
    ``Train.model_scale`` as ``scale``). Raises ShituError for a width that rounds below 1 or no classes.
    """
    channels = round(width * scale)
    if channels < 1:
        raise ShituError(f"ResNet18_rec: width {width} × scale {scale} leaves no channels")
    if num_classes < 1:
        raise ShituError(f"ResNet18_rec: num_classes must be at least 1, got {num_classes}")
    return ResNetRec(num_classes, width=channels, embedding_size=embedding_size, rngs=rngs)
