"""Training heads shared by the recognition models (PaddleClas ``ppcls/arch/gears``).

A head turns ``features`` [B, E] into training logits [B, C]; it is used by ``model.logits`` and never
at inference (PaddleClas exports with an IdentityHead and serves the ``features``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def standard_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32, *, truncate: float | None = None):
    """N(0, 1) samples of ``shape`` (truncated to ±``truncate`` when given) for parameter initialisation.

    Drawn as a vector of the next power-of-two size and cut to shape: eager initialisation then compiles
    ``jax.random`` once per size bucket instead of once per distinct parameter shape (about a second
    each on a small CPU), which makes building a model several times faster.
    """
    n = math.prod(shape)
    m = max(256, 1 << max(n - 1, 0).bit_length())
    if truncate is None:
        flat = jax.random.normal(key, (m,), dtype)
    else:
        flat = jax.random.truncated_normal(key, -truncate, truncate, (m,), dtype)
    return flat[:n].reshape(shape)


def paddle_xavier_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Paddle ``XavierNormal`` for a 2-D [in, out] weight: N(0, sqrt(2 / (in + out))), not truncated."""
    fan_in, fan_out = shape[0], shape[1]
    return standard_normal(key, shape, dtype) * jnp.asarray(math.sqrt(2.0 / (fan_in + fan_out)), dtype)


class ArcMargin(nnx.Module):
    """PaddleClas ``ArcMargin`` (additive angular margin, ArcFace), weight [embedding_size, class_num].

    The input rows and the weight *columns* are L2-normalised (no epsilon, as upstream), ``cos = x̂ Ŵ``.
    In training with labels: ``sin = sqrt(1 - cos² + 1e-6)``, ``phi = cos·cos m - sin·sin m``; unless
    ``easy_margin``, ``phi = phi where cos > -cos m else cos - m·sin m`` (``easy_margin``: ``phi where
    cos > 0 else cos``); ``logits = scale·(onehot·phi + (1 - onehot)·cos)``. In eval mode
    (``deterministic``, set by ``model.eval()``) or without labels it returns ``cos`` *without* the scale
    (upstream quirk: eval logits are in [-1, 1]).
    """

    def __init__(
        self,
        embedding_size: int,
        class_num: int,
        *,
        margin: float = 0.5,
        scale: float = 80.0,
        easy_margin: bool = False,
        deterministic: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.embedding_size = embedding_size
        self.class_num = class_num
        self.margin = float(margin)
        self.scale = float(scale)
        self.easy_margin = bool(easy_margin)
        # NNX convention: ``model.train()`` sets deterministic=False, ``model.eval()`` sets it True.
        self.deterministic = deterministic
        self.weight = nnx.Param(paddle_xavier_normal(rngs.params(), (embedding_size, class_num)))

    def __call__(self, x: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        # Normalised and compared in float32 at least, also when mixed-precision training casts x and W to bf16.
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        x = x / jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
        w = self.weight[...]
        w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
        w = w / jnp.sqrt(jnp.sum(jnp.square(w), axis=0, keepdims=True))
        cos = x @ w
        if self.deterministic or labels is None:
            return cos
        sin = jnp.sqrt(1.0 - jnp.square(cos) + 1e-6)
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        phi = cos * cos_m - sin * sin_m
        if self.easy_margin:
            phi = jnp.where(cos > 0.0, phi, cos)
        else:
            phi = jnp.where(cos > -cos_m, phi, cos - sin_m * self.margin)
        # Paddle takes labels [B, 1] (one_hot then squeeze axis 1); [B] is accepted too.
        labels = jnp.reshape(jnp.asarray(labels), (cos.shape[0],))
        one_hot = jax.nn.one_hot(labels, self.class_num, dtype=cos.dtype)
        return (one_hot * phi + (1.0 - one_hot) * cos) * self.scale
