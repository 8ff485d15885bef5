"""Loss building blocks, as PaddleClas computes them (reference/ppshitu_spec.md §3, §7).

Pure JAX, float32 (float64 when given float64), jit-able. A model's own loss (its
:class:`shitu.models.spec.TrainingRecipe`'s ``loss``) combines these: :func:`features_and_logits` runs the
module contract's forward, :func:`cross_entropy` is PaddleClas' ``CELoss`` (on plain FC logits, or on margin
logits: an ArcMargin head applies its margin in ``model.logits`` when given the labels),
:func:`triplet_angular_margin_loss` its ``TripletAngularMarginLoss``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "features_and_logits", "triplet_angular_margin_loss"]


def _at_least_float32(x: Any) -> jax.Array:
    """``x`` in float32, or in float64 when it already is (x64 runs keep their precision)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array, epsilon: float | None = 0.0) -> jax.Array:
    """PaddleClas ``CELoss``: mean over the batch of ``Σ_c −log_softmax(logits)_c · target_c``.

    ``target = (1 − ε)·onehot(labels) + ε / C`` (Paddle's ``label_smooth``) when ``0 < ε < 1``; any other
    ``epsilon`` (0, None, ≥ 1) means no smoothing, as upstream. ``logits`` [B, C], ``labels`` int [B]
    (or [B, 1]); returns a float32 scalar.
    """
    logits = _at_least_float32(logits)
    labels = jnp.reshape(jnp.asarray(labels), (logits.shape[0],))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
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
    f = _at_least_float32(features)
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


def features_and_logits(model: Any, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(features, logits, labels)`` of one batch by the module contract: ``features = model(images)``
    (float32 [B, D]), ``logits = model.logits(features, labels)`` [B, C] (margin heads use the labels in
    training mode), ``labels`` flattened to [B]. The caller sets the model's mode."""
    labels = jnp.reshape(jnp.asarray(labels), (-1,))
    features = _at_least_float32(model(images))
    return features, model.logits(features, labels), labels
