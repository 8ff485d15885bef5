"""ResNet18_rec's training recipe (the ``TrainingRecipe`` the plugin registers):

- loss: cross-entropy with label smoothing ε 0.1 on the ArcMargin logits (margin applied to the label
  column in training); evaluation (``train=False``) is plain cross-entropy, as shitu's built-in recipes;
- augmentation: random resized crop (25–100 % of the area, aspect 3/4–4/3) to S×S, horizontal flip
  (p 0.5), normalisation with the model's mean/std;
- optimizer groups: no weight decay on BatchNorm scales and biases nor on any bias; the BNNeck's
  BatchNorm bias is frozen at zero; weight decay 5e-4 on the rest (convolution and linear kernels, the
  ArcMargin weight);
- sampler: plain shuffled batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shitu.models import AugmentThenNormalize
from shitu.train.augment import rand_resized_crop, random_hflip
from shitu.train.losses import cross_entropy

LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 5e-4
CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

ParameterPath = tuple[str | int, ...]


def loss(model: Any, images: Any, labels: Any, *, train: bool = True) -> tuple[Any, dict[str, Any]]:
    """``(total, terms)`` on one batch: ``terms == {"loss": total, "CELoss": total}``.

    The caller sets the model's mode (``model.train()``: BatchNorm batch statistics and the margin)."""
    import jax.numpy as jnp

    labels = jnp.reshape(jnp.asarray(labels), (-1,))
    features = jnp.asarray(model(images), jnp.float32)
    logits = model.logits(features, labels)
    ce = cross_entropy(logits, labels, LABEL_SMOOTHING if train else 0.0)
    return ce, {"loss": ce, "CELoss": ce}


@dataclass(frozen=True)
class ResNetTrainTransform(AugmentThenNormalize):
    """``transform(image, rng)``: RGB uint8 [H, W, 3] → float32 [size, size, 3], normalised. Picklable;
    every random draw comes from ``rng``."""

    def augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The augmented uint8 image [size, size, 3], before normalisation."""
        image = rand_resized_crop(image, self.size, rng, scale=CROP_SCALE, ratio=CROP_RATIO)
        return random_hflip(image, rng)


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[..., np.ndarray]:
    """``TrainingRecipe.train_transform``: the transform for ``size``×``size`` inputs."""
    return ResNetTrainTransform.at(size, mean, std)


def parameter_groups(model: Any) -> tuple[set[ParameterPath], set[ParameterPath]]:
    """``(no_decay, frozen)``: paths of ``nnx.state(model, nnx.Param)``. No decay: every BatchNorm
    parameter and every bias; frozen: the BNNeck BatchNorm's bias."""
    from flax import nnx

    from shitu_resnet.model import BNNeck

    params = {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    no_decay: set[ParameterPath] = {path for path in params if path[-1] == "bias"}
    frozen: set[ParameterPath] = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            no_decay.update(p for p in params if p[: len(path)] == tuple(path))
        elif isinstance(node, BNNeck):
            frozen.add((*path, "feat_bn", "bias"))
    return no_decay, frozen & params
