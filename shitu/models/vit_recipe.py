"""The CLIP ViT recognizers' training recipe, as PaddleClas' ``GeneralRecognitionV2_CLIP_vit_*.yaml`` trains
them (reference/ppshitu_spec.md §3, §4, §7).

- Loss: ``logits = model.logits(features, labels)`` is the ArcMargin head (margin 0.2, scale 30; in
  training mode the margin is applied to the label column); total = ``CELoss`` without smoothing (term
  ``"CELoss"``), in training and evaluation alike.
- Augmentation: RandCropImage S (scale [0.08, 1], ratio [3/4, 4/3], cv2 INTER_LINEAR) → RandFlipImage →
  TimmAutoAugment ``rand-m7-mstd0.5-inc1`` (bicubic, fill = ImageNet mean in bytes (124, 116, 104)) →
  RandomRotation (p 0.3, ±90°, bicubic, fill 0) → NormalizeImage.
- Optimizer: Momentum 0.9 with coupled L2 2e-5 on every parameter (LayerNorms, cls token and position
  embedding included, as upstream's config sets no exclusions); nothing frozen.
- Sampler: shuffled batches.

Imports stay cheap (the built-in plugin imports this module); the heavy ones are made where used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shitu.models.spec import AugmentThenNormalize, TrainingRecipe

#: The TimmAutoAugment policy.
AUTO_AUGMENT = "rand-m7-mstd0.5-inc1"
#: Coupled L2 coefficient.
WEIGHT_DECAY = 2e-5

RECIPE = TrainingRecipe(
    loss="shitu.models.vit_recipe:loss",
    train_transform="shitu.models.vit_recipe:train_transform",
    parameter_groups=None,
    weight_decay=WEIGHT_DECAY,
    sampler="shuffle",
)


def loss(model: Any, images: Any, labels: Any, *, train: bool = True) -> tuple[Any, dict[str, Any]]:
    """CE without smoothing on the ArcMargin logits (module docstring); ``train`` changes nothing here."""
    from shitu.train.losses import cross_entropy, features_and_logits

    _, logits, labels = features_and_logits(model, images, labels)
    ce = cross_entropy(logits, labels, 0.0)
    return ce, {"loss": ce, "CELoss": ce}


def augment(image: Any, rng: Any, *, size: int, policy: str = AUTO_AUGMENT) -> Any:
    """The train augmentation up to (not including) NormalizeImage; uint8 [size, size, 3]."""
    from shitu.train.augment import parse_rand_augment, rand_augment, rand_resized_crop, random_hflip, random_rotation

    image = rand_resized_crop(image, size, rng)
    image = random_hflip(image, rng)
    image = rand_augment(image, rng, parse_rand_augment(policy), interpolation="bicubic")
    return random_rotation(image, rng, prob=0.3, degrees=90.0, interpolation="bicubic")


@dataclass(frozen=True)
class TrainTransform(AugmentThenNormalize):
    """:func:`augment` then normalisation: ``transform(image, rng)`` → float32 [size, size, 3]. Picklable."""

    auto_augment: str = AUTO_AUGMENT

    def __post_init__(self) -> None:
        from shitu.train.augment import parse_rand_augment

        parse_rand_augment(self.auto_augment)  # fail early on a bad policy string

    def augment(self, image: Any, rng: Any) -> Any:
        return augment(image, rng, size=self.size, policy=self.auto_augment)


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> TrainTransform:
    """The recipe's ``train_transform`` at input size ``size``."""
    return TrainTransform.at(size, mean, std)
