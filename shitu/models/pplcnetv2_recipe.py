"""PP-ShiTuV2_rec's training recipe, as PaddleClas' ``GeneralRecognitionV2_PPLCNetV2_base.yaml`` trains it
(reference/ppshitu_spec.md §3, §4, §7).

- Loss: ``features = model(images)``, ``logits = model.logits(features)`` (plain FC head); in training
  ``CELoss(ε 0.1)`` on the logits + ``TripletAngularMarginLoss`` on the features (terms ``"CELoss"``,
  ``"TripletAngularMarginLoss"``); in evaluation PaddleClas' ``Loss.Eval``, CE without smoothing.
- Augmentation: ResizeImage S×S (cv2 INTER_LINEAR, aspect ignored) → RandFlipImage (horizontal, p 0.5) →
  Pad 10 px constant 0 (cv2) → RandCropImageV2 S, whose offsets are drawn from ``randint(0, H - S + 1)``
  *inclusive*, so one crop in about 11 is S-1 px high or wide (PaddleClas' quirk, kept) → RandomRotation
  (p 0.5, angle U(-90°, 90°), bilinear, about the centre, same size, fill 0: ``paddle.vision``'s
  RandomRotation, which calls Pillow's ``Image.rotate``; computed with ``cv2.warpAffine``, see
  :func:`shitu.train.augment.rotate`) → ResizeImage S×S (cv2 INTER_LINEAR) → NormalizeImage. The padding
  stays 10 px whatever S is (PaddleX's fixed value, not scaled with the input size).
- Optimizer: Momentum 0.9 with coupled L2 1e-5. **No L2** on the BatchNorm ``scale``/``bias`` of every
  ``ConvBN`` layer of the backbone (Paddle's ``ConvBNLayer`` gives them ``L2Decay(0.0)``): the paths
  ``<ConvBN path>.bn.scale`` and ``<ConvBN path>.bn.bias`` (stem, every block's dw/pw convs and the rep
  branches). L2 still applies to the convolution kernels, SE convs, ``last_conv``, the BNNeck
  ``feat_bn.scale``/``feat_bn.bias`` and the FC head. The BNNeck bias ``neck.feat_bn.bias`` is **frozen**
  (upstream ``learning_rate: 1e-20``).
- Sampler: PK (``Train.sample_per_id`` images per identity).

Imports stay cheap (the built-in plugin imports this module to register the spec); JAX, OpenCV and the
augmentation ops are imported where used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shitu.models.spec import AugmentThenNormalize, TrainingRecipe

#: ``CELoss`` label smoothing.
CE_EPSILON = 0.1
#: ``TripletAngularMarginLoss`` settings.
TRIPLET = {
    "margin": 0.5,
    "ap_value": 0.8,
    "an_value": 0.4,
    "absolute_loss_weight": 0.1,
    "normalize_feature": True,
}
#: Pad before RandCropImageV2, in pixels (kept at 10 px for every input size).
PAD = 10
#: Coupled L2 coefficient.
WEIGHT_DECAY = 1e-5

RECIPE = TrainingRecipe(
    loss="shitu.models.pplcnetv2_recipe:loss",
    train_transform="shitu.models.pplcnetv2_recipe:train_transform",
    parameter_groups="shitu.models.pplcnetv2_recipe:parameter_groups",
    weight_decay=WEIGHT_DECAY,
    sampler="pk",
)


def loss(model: Any, images: Any, labels: Any, *, train: bool = True) -> tuple[Any, dict[str, Any]]:
    """CE(ε 0.1) + TripletAngularMarginLoss in training, plain CE in evaluation (module docstring)."""
    from shitu.train.losses import cross_entropy, features_and_logits, triplet_angular_margin_loss

    features, logits, labels = features_and_logits(model, images, labels)
    if not train:
        ce = cross_entropy(logits, labels, 0.0)
        return ce, {"loss": ce, "CELoss": ce}
    ce = cross_entropy(logits, labels, CE_EPSILON)
    triplet = triplet_angular_margin_loss(features, labels, **TRIPLET)
    total = ce + triplet
    return total, {"loss": total, "CELoss": ce, "TripletAngularMarginLoss": triplet}


def augment(image: Any, rng: Any, *, size: int, pad: int = PAD) -> Any:
    """The train augmentation up to (not including) NormalizeImage; uint8 [size, size, 3]."""
    from shitu.data.transforms import resize
    from shitu.train.augment import pad_constant, rand_crop_v2, random_hflip, random_rotation

    image = resize(image, size, "bilinear")
    image = random_hflip(image, rng)
    image = pad_constant(image, pad)
    image = rand_crop_v2(image, size, rng)
    image = random_rotation(image, rng, prob=0.5, degrees=90.0, interpolation="bilinear")
    return resize(image, size, "bilinear")


@dataclass(frozen=True)
class TrainTransform(AugmentThenNormalize):
    """:func:`augment` then normalisation: ``transform(image, rng)`` → float32 [size, size, 3]. Picklable."""

    pad: int = PAD

    def augment(self, image: Any, rng: Any) -> Any:
        return augment(image, rng, size=self.size, pad=self.pad)


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> TrainTransform:
    """The recipe's ``train_transform`` at input size ``size``."""
    return TrainTransform.at(size, mean, std)


def parameter_groups(model: Any) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """``(no_decay, frozen)``: every ``ConvBN``'s ``bn`` parameters; a ``BNNeck``'s ``feat_bn.bias``.
    Found by walking the model graph; paths are those of ``nnx.state(model, nnx.Param)``."""
    from flax import nnx

    from shitu.models.layers import ConvBN
    from shitu.models.pplcnetv2 import BNNeck

    params = {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    no_decay: set[tuple[Any, ...]] = set()
    frozen: set[tuple[Any, ...]] = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, ConvBN) and node.bn is not None:
            no_decay.update(p for p in params if p[: len(path) + 1] == (*path, "bn"))
        elif isinstance(node, BNNeck):
            frozen.update(p for p in params if p == (*path, "feat_bn", "bias"))
    return no_decay, frozen
