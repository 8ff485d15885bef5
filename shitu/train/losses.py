"""Training losses of the recognition recipes, as PaddleClas computes them (reference/ppshitu_spec.md §3, §7).

Pure JAX, float32, jit-able. Two recipes:

- ``"pplcnet"`` (PP-ShiTuV2_rec): ``features = model(images)``; ``logits = model.logits(features, labels)``
  (plain FC); total = ``CELoss(ε 0.1)`` on the logits + ``TripletAngularMarginLoss`` on the features.
- ``"clip"`` (the CLIP ViT models): ``logits = model.logits(features, labels)`` is the ArcMargin head in
  training mode (margin applied to the label column, scaled); total = ``CELoss`` without smoothing.

:func:`recognition_loss` returns ``(total, terms)`` with the terms named like PaddleClas' loss dict
(``"loss"`` is the total). The ``ModelSpec.loss`` references of the built-in models point at
:func:`pplcnet_loss` and :func:`clip_loss`, thin wrappers of :func:`recognition_loss`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "RECIPES",
    "clip_loss",
    "cross_entropy",
    "pplcnet_loss",
    "recipe_for",
    "recognition_loss",
    "triplet_angular_margin_loss",
]

RECIPES = ("pplcnet", "clip")

#: PP-ShiTuV2_rec's loss settings (GeneralRecognitionV2_PPLCNetV2_base.yaml).
PPLCNET_CE_EPSILON = 0.1
PPLCNET_TRIPLET = {
    "margin": 0.5,
    "ap_value": 0.8,
    "an_value": 0.4,
    "absolute_loss_weight": 0.1,
    "normalize_feature": True,
}


def cross_entropy(logits: jax.Array, labels: jax.Array, epsilon: float | None = 0.0) -> jax.Array:
    """PaddleClas ``CELoss``: mean over the batch of ``Σ_c −log_softmax(logits)_c · target_c``.

    ``target = (1 − ε)·onehot(labels) + ε / C`` (Paddle's ``label_smooth``) when ``0 < ε < 1``; any other
    ``epsilon`` (0, None, ≥ 1) means no smoothing, as upstream. ``logits`` [B, C], ``labels`` int [B]
    (or [B, 1]); returns a float32 scalar.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.reshape(jnp.asarray(labels), (logits.shape[0],))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if epsilon is not None and 0.0 < float(epsilon) < 1.0:
        target = (1.0 - float(epsilon)) * one_hot + float(epsilon) / num_classes
    else:
        target = one_hot
    return jnp.mean(-jnp.sum(log_probs * target, axis=-1))


def triplet_angular_margin_loss(
    features: jax.Array,
    labels: jax.Array,
    margin: float = 0.5,
    ap_value: float = 0.8,
    an_value: float = 0.4,
    absolute_loss_weight: float = 0.1,
    normalize_feature: bool = True,
) -> jax.Array:
    """PaddleClas ``TripletAngularMarginLoss`` (``add_absolute=True``, reduction mean), quirks included.

    With ``f`` the L2-normalised rows of ``features`` (no epsilon, as upstream) and ``S = f fᵀ``:

    - ``d_ap[i] = min_j S[i, j]`` over positives ``labels[j] == labels[i]``, the **diagonal included**
      (self-similarity ≈ 1, so an anchor alone in its class gets ``d_ap ≈ 1``);
    - ``d_an[i] = max_j S[i, j]`` over negatives ``labels[j] != labels[i]``;
    - ``rank = mean(relu(d_an − d_ap + margin))``;
    - ``abs_ap = relu(ap_value − d_ap)``; ``abs_an = d_an − an_value`` where that is > 0, **else the
      constant 1.0** (upstream ``ones_like``: no gradient, and an easy negative costs more than a hard one);
    - loss = ``rank + absolute_loss_weight · (mean(abs_an) + mean(abs_ap))``.

    Upstream selects with ``masked_select(...).reshape(bs, -1)`` and so needs the same number of positives
    per anchor (the PK sampler guarantees it). Here the min/max are masked, so any batch works and PK
    batches give upstream's values. An anchor without any negative (only possible when the whole batch has
    one label; upstream fails there) contributes 0 to ``rank`` and the constant 1.0 to ``abs_an``.
    Ties in the min/max share the gradient (JAX) where Paddle gives each tied entry the full gradient;
    only exact duplicate features tie.
    """
    f = jnp.asarray(features, jnp.float32)
    labels = jnp.reshape(jnp.asarray(labels), (f.shape[0],))
    if normalize_feature:
        f = f / jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
    sim = f @ f.T
    is_pos = labels[:, None] == labels[None, :]
    # Masked reductions (hand-written: upstream's masked_select+reshape needs equal counts per row).
    d_ap = jnp.min(jnp.where(is_pos, sim, jnp.inf), axis=1)
    d_an = jnp.max(jnp.where(is_pos, -jnp.inf, sim), axis=1)
    has_neg = jnp.any(~is_pos, axis=1)
    rank = jnp.where(has_neg, jax.nn.relu(jnp.where(has_neg, d_an, 0.0) - d_ap + margin), 0.0)
    abs_ap = jax.nn.relu(ap_value - d_ap)
    excess_an = jnp.where(has_neg, d_an, -jnp.inf) - an_value
    abs_an = jnp.where(excess_an > 0, excess_an, 1.0)
    return jnp.mean(rank) + absolute_loss_weight * (jnp.mean(abs_an) + jnp.mean(abs_ap))


def recognition_loss(
    recipe: str, model: Any, images: jax.Array, labels: jax.Array, *, train: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss of ``recipe`` ("pplcnet" | "clip", or a model name / ModelSpec, see :func:`recipe_for`)
    on one batch, and its terms.

    Calls ``model(images)`` then ``model.logits(features, labels)``; the caller sets the model's mode
    (``model.train()`` for training: BatchNorm batch statistics, dropout, the ArcMargin margin).

    ``train=True``: the recipe's training loss — "pplcnet": ``{"loss", "CELoss", "TripletAngularMarginLoss"}``
    (CE with ε 0.1 + triplet); "clip": ``{"loss", "CELoss"}`` (CE without smoothing on the ArcMargin logits).
    ``train=False``: PaddleClas' ``Loss.Eval`` (both recipes): ``{"loss", "CELoss"}``, CE without smoothing.
    """
    recipe = recipe_for(recipe)
    labels = jnp.reshape(jnp.asarray(labels), (-1,))
    features = jnp.asarray(model(images), jnp.float32)
    logits = model.logits(features, labels)
    if recipe == "pplcnet" and train:
        ce = cross_entropy(logits, labels, PPLCNET_CE_EPSILON)
        triplet = triplet_angular_margin_loss(features, labels, **PPLCNET_TRIPLET)
        total = ce + triplet
        return total, {"loss": total, "CELoss": ce, "TripletAngularMarginLoss": triplet}
    ce = cross_entropy(logits, labels, 0.0)
    return ce, {"loss": ce, "CELoss": ce}


def pplcnet_loss(
    model: Any, images: jax.Array, labels: jax.Array, *, train: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PP-ShiTuV2_rec's loss (``ModelSpec.loss``): :func:`recognition_loss` with recipe "pplcnet"."""
    return recognition_loss("pplcnet", model, images, labels, train=train)


def clip_loss(
    model: Any, images: jax.Array, labels: jax.Array, *, train: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CLIP models' loss (``ModelSpec.loss``): :func:`recognition_loss` with recipe "clip"."""
    return recognition_loss("clip", model, images, labels, train=train)


_LOSS_RECIPES = {
    "shitu.train.losses:pplcnet_loss": "pplcnet",
    "shitu.train.losses:clip_loss": "clip",
}


def recipe_for(spec: Any) -> str:
    """The training recipe, "pplcnet" or "clip", of a recipe name, a ``ModelSpec`` or a model name.

    A spec whose ``loss`` is one of this module's wrappers gets that wrapper's recipe; otherwise a name
    containing "clip" means "clip" and anything else "pplcnet".
    """
    if isinstance(spec, str):
        if spec in RECIPES:
            return spec
        return "clip" if "clip" in spec.lower() else "pplcnet"
    declared = getattr(spec, "loss", None)
    if declared in RECIPES:
        return str(declared)
    if declared in _LOSS_RECIPES:
        return _LOSS_RECIPES[declared]
    return "clip" if "clip" in str(getattr(spec, "name", "")).lower() else "pplcnet"
