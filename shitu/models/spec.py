"""What a model plugin registers: a :class:`ModelSpec` bundles the network, its default config,
preprocessing, its :class:`TrainingRecipe` and its Paddle weight hooks: a model is more than a module.

The module contract (Flax NNX) that every built model follows:

- input: float32 NHWC images, already resized and normalised with ``spec.mean``/``spec.std``;
- ``model(x)`` → ``features`` float32 [B, embedding_size], *not* L2-normalised (PaddleClas' ``features``);
- ``model.logits(features, labels)`` → training-head logits [B, num_classes] (``labels`` may be None at
  eval; margin heads need them in training);
- ``model.train()`` / ``model.eval()`` switch BatchNorm/dropout mode (NNX's own methods);
- mixed precision (``Train.precision=bf16``, :mod:`shitu.train.precision`): the training step hands the model
  bf16 parameters and images and sets Flax layers' ``dtype``; a model computes in the dtype of its inputs and
  parameters (upcasting where it needs float32, as the built-in softmax and ArcMargin do) and needs no other
  change. Its recipe's loss receives the model as usual and should upcast what it reduces (see
  :mod:`shitu.train.losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from shitu.hub.sources import PublishedWeights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve(reference: str) -> Any:
    """Import ``"package.module:attribute"``."""
    module, _, attribute = reference.partition(":")
    return getattr(import_module(module), attribute)


@dataclass
class ImportReport:
    """What a weight import did: keys loaded, skipped for a shape mismatch (as Paddle's set_dict), unused."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "loaded": len(self.loaded),
            "skipped": [{"key": k, "file_shape": list(a), "model_shape": list(b)} for k, a, b in self.skipped],
            "unused": self.unused,
        }


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything training needs from a model plugin; each callable is a "module:function" reference.

    - ``loss(model, images, labels, *, train: bool) -> (total, terms)``: ``terms`` is a dict of scalars
      whose ``"loss"`` entry is ``total``; every term is logged and averaged per epoch. ``train=False`` is
      the evaluation loss. The model is already in the right mode (``model.train()`` while training).
    - ``train_transform(size: int, mean: tuple, std: tuple) -> transform``: ``transform(image, rng)`` maps
      an RGB uint8 array [H, W, 3] and a :class:`numpy.random.Generator` (its only source of randomness)
      to a normalised float32 array [size, size, 3]; it must be picklable (loader worker processes).
    - ``parameter_groups(model) -> (no_decay, frozen)``: two sets of parameter paths (tuples of the keys
      of ``nnx.state(model, nnx.Param)``) that get no L2 and no update; None: all decayed, none frozen.
    - ``weight_decay``: the coupled L2 coefficient (``Train.weight_decay`` in the config overrides it).
    - ``sampler``: the default batch sampler, ``"pk"`` (P identities × K images) or ``"shuffle"``
      (``Train.sampler`` overrides it).
    """

    loss: str
    train_transform: str
    parameter_groups: str | None = None
    weight_decay: float = 0.0
    sampler: str = "shuffle"


@dataclass(frozen=True)
class AugmentThenNormalize:
    """A base for what ``TrainingRecipe.train_transform`` returns: ``transform(image, rng)`` is
    ``augment(image, rng)`` (RGB uint8 [size, size, 3]) normalised with ``mean``/``std`` to float32 HWC.

    Subclass it as a frozen dataclass at module level (so it pickles for loader worker processes), add
    fields for the augmentation's options and implement :meth:`augment`; ``Subclass.at(size, mean, std)``
    is then a ``train_transform``.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def at(cls, size: int, mean: tuple[float, ...], std: tuple[float, ...], **options: Any) -> Any:
        """The transform for ``size``×``size`` inputs (numbers made plain ints and floats)."""
        return cls(int(size), tuple(float(x) for x in mean), tuple(float(x) for x in std), **options)  # type: ignore[arg-type]

    def augment(self, image: Any, rng: Any) -> Any:
        """The augmented uint8 image [size, size, 3], before normalisation."""
        raise NotImplementedError

    def __call__(self, image: Any, rng: Any) -> Any:
        from shitu.train.augment import normalize_hwc

        return normalize_hwc(self.augment(image, rng), self.mean, self.std)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model. ``builder`` and the Paddle hooks are ``"module:function"`` strings.

    - ``builder(num_classes: int, *, rngs: nnx.Rngs, **arch) -> nnx.Module`` (the module contract above)
    - ``config``: the default config, a built-in name (``shitu/configs/NAME.yaml``) or
      ``"package.module:relative/path.yaml"``, a YAML file shipped in the plugin's package
    - ``recipe``: the :class:`TrainingRecipe`; None: the model can be built and used, not trained
    - ``paddle_importer(model, state: dict[str, np.ndarray]) -> ImportReport`` (PaddleClas structured names)
    - ``paddle_arch(state) -> dict``: architecture options a Paddle state needs (e.g. the fused form)
    - ``paddle_structure(program, layers) -> {structured name: static name}``: names the parameters of an
      exported Paddle inference program from its layers (:func:`shitu.weights.structure.extract_layers`);
      raises ShituError when the program is not this model's
    """

    name: str
    description: str
    builder: str
    config: str
    recipe: TrainingRecipe | None = None
    paddle_importer: str | None = None
    paddle_arch: str | None = None
    paddle_structure: str | None = None
    embedding_size: int = 512
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_interpolation: str = "bilinear"
    arch: dict[str, Any] = field(default_factory=dict)
    published: PublishedWeights | None = None

    def build(self, num_classes: int, *, seed: int = 0, **overrides: Any) -> Any:
        """Build the NNX module with random initialisation (``seed``) and the spec's arch kwargs."""
        from flax import nnx

        build: Callable[..., Any] = resolve(self.builder)
        return build(num_classes, rngs=nnx.Rngs(seed), **{**self.arch, **overrides})
