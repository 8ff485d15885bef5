"""Losses of the training recipes against plain numpy references (and, slow, PaddleClas' own loss classes)."""

from __future__ import annotations

import json
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from paddle_support import PADDLE_PYTHON, require_paddleclas

from shitu.models import pplcnetv2_recipe, vit_recipe
from shitu.models.heads import ArcMargin
from shitu.train.losses import cross_entropy, triplet_angular_margin_loss

pplcnet_loss = pplcnetv2_recipe.loss
clip_loss = vit_recipe.loss

# Jitted once per shape: cheaper here than eager mode, which compiles every primitive separately.
jit_cross_entropy = jax.jit(cross_entropy, static_argnames=("epsilon",))
jit_triplet = jax.jit(triplet_angular_margin_loss, static_argnames=("normalize_feature",))
triplet_value_and_grad = jax.jit(jax.value_and_grad(triplet_angular_margin_loss))
jit_clip_loss = nnx.jit(clip_loss, static_argnames=("train",))


# ------------------------------------------------------------------------------------------- numpy references


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray, epsilon: float | None) -> float:
    logits = np.asarray(logits, np.float64)
    num_classes = logits.shape[1]
    target = np.eye(num_classes)[labels]
    if epsilon is not None and 0 < epsilon < 1:
        target = (1 - epsilon) * target + epsilon / num_classes
    return float(np.mean(-(np_log_softmax(logits) * target).sum(axis=1)))


def np_triplet(features, labels, margin=0.5, ap_value=0.8, an_value=0.4, weight=0.1, *, paddle_style=False):
    """TripletAngularMarginLoss in float64; ``paddle_style`` uses upstream's masked_select + reshape (PK only)."""
    f = np.asarray(features, np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    dist = f @ f.T
    labels = np.asarray(labels)
    is_pos = labels[None, :] == labels[:, None]
    bs = len(labels)
    if paddle_style:
        d_ap = dist[is_pos].reshape(bs, -1).min(axis=1)
        d_an = dist[~is_pos].reshape(bs, -1).max(axis=1)
    else:
        d_ap = np.array([dist[i, is_pos[i]].min() for i in range(bs)])
        d_an = np.array([dist[i, ~is_pos[i]].max() for i in range(bs)])
    rank = np.maximum(d_an - d_ap + margin, 0.0).mean()
    abs_ap = np.maximum(ap_value - d_ap, 0.0)
    abs_an = np.where(d_an - an_value > 0, d_an - an_value, 1.0)
    return float(rank + weight * (abs_an.mean() + abs_ap.mean()))


def np_arcmargin_logits(features, weight, labels, margin, scale):
    x = np.asarray(features, np.float64)
    w = np.asarray(weight, np.float64)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    sin = np.sqrt(1 - cos**2 + 1e-6)
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    phi = np.where(cos > -math.cos(margin), phi, cos - margin * math.sin(margin))
    one_hot = np.eye(w.shape[1])[labels]
    return scale * (one_hot * phi + (1 - one_hot) * cos)


def pk_labels(rng: np.random.Generator, p: int, k: int, num_classes: int = 50) -> np.ndarray:
    ids = rng.choice(num_classes, size=p, replace=False)
    return np.repeat(ids, k)[rng.permutation(p * k)]


# ------------------------------------------------------------------------------------------------ cross entropy


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 0.0, None, 1.0, -0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_matches_numpy(epsilon, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((9, 7)) * 3).astype(np.float32)
    labels = rng.integers(0, 7, 9)
    ours = float(jit_cross_entropy(logits, labels, epsilon))
    assert ours == pytest.approx(np_cross_entropy(logits, labels, epsilon), rel=1e-6)
    # [B, 1] labels (PaddleClas' loader shape) give the same value.
    assert float(jit_cross_entropy(logits, labels[:, None], epsilon)) == pytest.approx(ours, rel=1e-7)


def test_cross_entropy_smoothing_values():
    logits = np.zeros((2, 4), np.float32)  # uniform softmax: the loss is log C whatever the target
    assert float(jit_cross_entropy(logits, np.array([0, 3]), 0.1)) == pytest.approx(math.log(4), rel=1e-6)
    # Smoothing keeps (1 - ε) + ε/C on the label and ε/C elsewhere.
    logits = np.array([[2.0, 0.0, -1.0]], np.float32)
    log_p = np_log_softmax(logits.astype(np.float64))[0]
    expected = -(0.9 + 0.1 / 3) * log_p[0] - (0.1 / 3) * (log_p[1] + log_p[2])
    assert float(jit_cross_entropy(logits, np.array([0]), 0.1)) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_gradient_is_softmax_minus_target():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 6)).astype(np.float32)
    labels = rng.integers(0, 6, 5)
    grad = np.asarray(jax.grad(lambda x: cross_entropy(x, labels, 0.1))(jnp.asarray(logits)))
    target = 0.9 * np.eye(6)[labels] + 0.1 / 6
    expected = (np.exp(np_log_softmax(logits.astype(np.float64))) - target) / 5
    np.testing.assert_allclose(grad, expected, atol=1e-7)


# ---------------------------------------------------------------------------------------------- triplet loss


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("p", "k"), [(4, 4), (8, 2), (3, 5)])
def test_triplet_matches_paddle_style_numpy_on_pk_batches(seed, p, k):
    rng = np.random.default_rng(seed)
    labels = pk_labels(rng, p, k)
    features = rng.standard_normal((p * k, 16)).astype(np.float32)
    features[labels == labels[0]] += 2.0 * rng.standard_normal(16).astype(np.float32)  # one tighter class
    expected = np_triplet(features, labels, paddle_style=True)
    assert expected == pytest.approx(np_triplet(features, labels), rel=1e-12)
    assert float(jit_triplet(features, labels)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_any_batch_matches_masked_numpy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 13)  # unequal class sizes, singletons possible
    features = rng.standard_normal((13, 8)).astype(np.float32)
    kwargs = {"margin": 0.3, "ap_value": 0.7, "an_value": 0.1, "absolute_loss_weight": 0.5}
    expected = np_triplet(features, labels, 0.3, 0.7, 0.1, 0.5)
    assert float(jit_triplet(features, labels, **kwargs)) == pytest.approx(expected, rel=1e-5)
    jitted = jax.jit(triplet_angular_margin_loss)(features, labels)
    assert float(jitted) == pytest.approx(np_triplet(features, labels), rel=1e-5)


def test_triplet_without_normalisation_uses_raw_dot_products():
    rng = np.random.default_rng(5)
    labels = np.array([0, 0, 1, 1])
    features = (0.3 * rng.standard_normal((4, 3))).astype(np.float32)
    f = features.astype(np.float64)
    dist = f @ f.T
    d_ap = np.array([dist[i, labels == labels[i]].min() for i in range(4)])
    d_an = np.array([dist[i, labels != labels[i]].max() for i in range(4)])
    expected = np.maximum(d_an - d_ap + 0.5, 0).mean() + 0.1 * (
        np.where(d_an > 0.4, d_an - 0.4, 1.0).mean() + np.maximum(0.8 - d_ap, 0).mean()
    )
    ours = float(jit_triplet(features, labels, normalize_feature=False))
    assert ours == pytest.approx(expected, rel=1e-5)


def _finite_difference(fn, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_gradient_matches_finite_differences(seed):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])  # not PK: classes of 3, 3 and 2
    features = rng.standard_normal((8, 5))
    features[:3] += 1.5  # a tight class: some d_an above an_value, some abs terms active
    expected = _finite_difference(lambda f: np_triplet(f, labels), features)
    ours = np.asarray(jax.jit(jax.grad(triplet_angular_margin_loss))(jnp.asarray(features, jnp.float32), labels))
    np.testing.assert_allclose(ours, expected, atol=2e-6, rtol=1e-3)
    assert np.abs(expected).max() > 1e-3  # the gradient is not trivially zero


def test_triplet_ones_like_quirk_is_a_constant_without_gradient():
    # Two orthogonal classes: every hardest negative has similarity ≈ 0 ≤ an_value = 0.4, so abs_an is
    # the constant 1.0 for every anchor; positives are close (d_ap ≈ 1): rank and abs_ap are 0.
    features = np.array([[1, 0.01, 0, 0], [1, -0.01, 0, 0], [0, 0, 1, 0.01], [0, 0, 1, -0.01]], np.float32)
    labels = np.array([3, 3, 7, 7])
    value, grad = triplet_value_and_grad(jnp.asarray(features), labels)
    assert float(value) == pytest.approx(0.1 * 1.0, rel=1e-6)
    assert np.all(np.asarray(grad) == 0.0)
    # An easy negative costs more than a slightly hard one (the quirk): d_an = 0.5 → abs_an = 0.1.
    tilted = features.copy()
    tilted[2] = [0.5, 0, math.sqrt(0.75), 0]
    assert float(jit_triplet(tilted, labels)) < float(value) + 0.1


def test_triplet_mixed_quirk_gradient_matches_finite_differences():
    # Anchor 0 has a hard negative (d_an > 0.4), the others do not: the gradient only flows through row 0's
    # (and its negative's) similarity.
    features = np.array([[1.0, 0.1, 0.0], [0.9, -0.2, 0.1], [0.8, 0.0, 0.7], [0.0, 1.0, 0.2]])
    labels = np.array([0, 0, 1, 2])
    expected = _finite_difference(lambda f: np_triplet(f, labels), features)
    ours = np.asarray(jax.jit(jax.grad(triplet_angular_margin_loss))(jnp.asarray(features, jnp.float32), labels))
    np.testing.assert_allclose(ours, expected, atol=2e-6, rtol=1e-3)


def test_triplet_single_label_batch_is_finite():
    # Upstream fails (no negatives); here rank is 0 and abs_an the constant 1.0.
    rng = np.random.default_rng(0)
    features = rng.standard_normal((4, 6)).astype(np.float32)
    labels = np.zeros(4, np.int32)
    value, grad = triplet_value_and_grad(jnp.asarray(features), labels)
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    d_ap = (f @ f.T).min(axis=1)
    assert float(value) == pytest.approx(0.1 * (1.0 + np.maximum(0.8 - d_ap, 0).mean()), rel=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))


# ------------------------------------------------------------------------------------------- ArcMargin + CE


@pytest.mark.parametrize("seed", [0, 1])
def test_arcmargin_plus_cross_entropy_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    head = ArcMargin(8, 6, margin=0.2, scale=30.0, rngs=nnx.Rngs(seed))
    weight = np.asarray(head.weight[...])
    labels = rng.integers(0, 6, 10)
    features = rng.standard_normal((10, 8)).astype(np.float32)
    features[0] = -weight[:, labels[0]] * 2.0  # cos = -1 ≤ -cos m: the "cos - m·sin m" branch
    logits = np_arcmargin_logits(features, weight, labels, 0.2, 30.0)
    ours = float(nnx.jit(lambda h, f, y: cross_entropy(h(f, y), y))(head, jnp.asarray(features), labels))
    assert ours == pytest.approx(np_cross_entropy(logits, labels, None), rel=1e-5)
    head.eval()  # eval: plain cosine, no scale
    cos = np_arcmargin_logits(features, weight, labels, 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda h, f, y: h(f, y))(head, features, labels)), cos, atol=1e-6)


# -------------------------------------------------------------------------------------- recipes on tiny models


class LinearRec(nnx.Module):
    """A stand-in recognition model (the model contract, no network): features = flatten(x) @ W."""

    def __init__(self, in_features: int, head: nnx.Module, *, rngs: nnx.Rngs) -> None:
        self.proj = nnx.Linear(in_features, 8, use_bias=False, rngs=rngs)
        self.head = head

    def __call__(self, x):
        return self.proj(x.reshape(x.shape[0], -1))

    def logits(self, features, labels=None):
        return self.head(features, labels) if isinstance(self.head, ArcMargin) else self.head(features)


class Captured(nnx.Variable):
    pass


class Recording(nnx.Module):
    """Wraps a model and keeps its last features, so one compiled call gives both the loss and its inputs."""

    def __init__(self, inner: nnx.Module, batch: int) -> None:
        self.inner = inner
        self.features = Captured(jnp.zeros((batch, inner.embedding_size), jnp.float32))

    def __call__(self, x):
        features = self.inner(x)
        self.features[...] = features
        return features

    def logits(self, features, labels=None):
        return self.inner.logits(features, labels)


def test_recipe_losses_on_a_stand_in_model():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 4, 4, 3)).astype(np.float32)
    labels = pk_labels(rng, 2, 4, num_classes=6)
    fc = LinearRec(48, nnx.Linear(8, 6, use_bias=False, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    arc = LinearRec(48, ArcMargin(8, 6, margin=0.2, scale=30.0, rngs=nnx.Rngs(1)), rngs=nnx.Rngs(1))

    @nnx.jit
    def run(fc, arc, images, labels):  # one compile for every call
        return {
            "pplcnet": pplcnet_loss(fc, images, labels, train=True),
            "pplcnet_default": pplcnet_loss(fc, images, labels),
            "pplcnet_eval": pplcnet_loss(fc, images, labels, train=False),
            "clip": clip_loss(arc, images, labels, train=True),
            "clip_default": clip_loss(arc, images, labels),
            "clip_grads": nnx.grad(lambda m: clip_loss(m, images, labels, train=True)[0])(arc),
        }

    out = run(fc, arc, images, labels)
    features = images.reshape(8, -1).astype(np.float64) @ np.asarray(fc.proj.kernel[...], np.float64)
    logits = features @ np.asarray(fc.head.kernel[...], np.float64)
    total, terms = out["pplcnet"]
    assert set(terms) == {"loss", "CELoss", "TripletAngularMarginLoss"}
    assert float(terms["CELoss"]) == pytest.approx(np_cross_entropy(logits, labels, 0.1), rel=1e-5)
    assert float(terms["TripletAngularMarginLoss"]) == pytest.approx(np_triplet(features, labels), rel=1e-5)
    assert float(total) == float(terms["loss"])
    assert float(total) == pytest.approx(float(terms["CELoss"]) + float(terms["TripletAngularMarginLoss"]), rel=1e-7)
    assert float(out["pplcnet_default"][0]) == float(total)
    # train=False: PaddleClas' Eval loss, CE without smoothing.
    eval_total, eval_terms = out["pplcnet_eval"]
    assert set(eval_terms) == {"loss", "CELoss"}
    assert float(eval_total) == pytest.approx(np_cross_entropy(logits, labels, None), rel=1e-5)

    features = images.reshape(8, -1).astype(np.float64) @ np.asarray(arc.proj.kernel[...], np.float64)
    weight = np.asarray(arc.head.weight[...])
    total, terms = out["clip"]
    assert set(terms) == {"loss", "CELoss"} and float(total) == float(terms["CELoss"])
    expected = np_cross_entropy(np_arcmargin_logits(features, weight, labels, 0.2, 30.0), labels, None)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(out["clip_default"][0]) == float(total)
    # Gradients flow to every parameter through the loss.
    assert float(np.abs(np.asarray(out["clip_grads"].proj.kernel[...])).max()) > 0
    assert float(np.abs(np.asarray(out["clip_grads"].head.weight[...])).max()) > 0
    # In eval mode the head gives unscaled cosines, and the Eval loss is CE on them.
    arc.eval()
    expected = np_cross_entropy(np_arcmargin_logits(features, weight, labels, 0.0, 1.0), labels, None)
    assert float(jit_clip_loss(arc, images, labels, train=False)[0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # the stand-in test covers the wiring; the trainer's tests run the real models
def test_pplcnetv2_recipe_loss_on_the_model():
    from shitu.models.pplcnetv2 import build_pp_shituv2_rec

    model = build_pp_shituv2_rec(5, rngs=nnx.Rngs(0), scale=0.25, dropout_prob=0.0)
    model.train()
    recording = Recording(model, 8)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((8, 16, 16, 3)), jnp.float32)
    labels = np.array([0, 0, 0, 0, 3, 3, 3, 3])
    # One compile (eager dispatch of the whole network is slow on a small CPU).
    total, terms = nnx.jit(lambda m, x, y: pplcnet_loss(m, x, y))(recording, images, labels)
    features = np.asarray(recording.features[...])
    logits = features.astype(np.float64) @ np.asarray(model.head.fc.kernel[...], np.float64)
    assert float(terms["CELoss"]) == pytest.approx(np_cross_entropy(logits, labels, 0.1), rel=1e-5)
    assert float(terms["TripletAngularMarginLoss"]) == pytest.approx(np_triplet(features, labels), rel=1e-5)
    assert float(total) == pytest.approx(float(terms["CELoss"]) + float(terms["TripletAngularMarginLoss"]), rel=1e-7)


@pytest.mark.slow  # the stand-in test covers the clip recipe with the real ArcMargin head
def test_vit_recipe_loss_on_the_model():
    from shitu.models.vit import build_clip_vit

    model = build_clip_vit(
        5,
        rngs=nnx.Rngs(0),
        embed_dim=16,
        depth=1,
        num_heads=2,
        patch_size=8,
        img_size=16,
        remove_cls_token=True,
        output_dim=8,
        embedding_size=8,
    )
    model.train()
    recording = Recording(model, 6)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((6, 16, 16, 3)), jnp.float32)
    labels = np.array([4, 1, 1, 0, 2, 4])

    total, terms = nnx.jit(lambda m, x, y: clip_loss(m, x, y))(recording, images, labels)
    features = recording.features[...]
    assert set(terms) == {"loss", "CELoss"}
    logits = np_arcmargin_logits(np.asarray(features), np.asarray(model.head.weight[...]), labels, 0.2, 30.0)
    assert float(total) == pytest.approx(np_cross_entropy(logits, labels, None), rel=1e-5)


def test_builtin_specs_carry_their_recipes():
    from shitu.builtin.models import CLIP_VIT_BASE, CLIP_VIT_LARGE, PP_SHITUV2_REC
    from shitu.models.spec import resolve

    assert PP_SHITUV2_REC.recipe is pplcnetv2_recipe.RECIPE
    assert CLIP_VIT_BASE.recipe is CLIP_VIT_LARGE.recipe is vit_recipe.RECIPE
    assert resolve(PP_SHITUV2_REC.recipe.loss) is pplcnet_loss
    assert resolve(CLIP_VIT_LARGE.recipe.loss) is clip_loss
    assert (PP_SHITUV2_REC.recipe.sampler, PP_SHITUV2_REC.recipe.weight_decay) == ("pk", 1e-5)
    assert (CLIP_VIT_BASE.recipe.sampler, CLIP_VIT_BASE.recipe.weight_decay) == ("shuffle", 2e-5)
    assert CLIP_VIT_BASE.recipe.parameter_groups is None


# ------------------------------------------------------------------------------------------ PaddleClas itself

# xbm.py: imported by the current tripletangularmarginloss.py (for its XBM variant only).
PADDLECLAS_LOSS_FILES = ("ppcls/loss/celoss.py", "ppcls/loss/tripletangularmarginloss.py", "ppcls/loss/xbm.py")

# Runs inside the Paddle environment: PaddleClas' own CELoss, TripletAngularMarginLoss and ArcMargin on saved
# inputs; values and input gradients. The loss files come without ppcls/loss/__init__.py (which imports every
# loss), so ppcls.loss is a namespace portion next to the installed wheel's ppcls.arch and ppcls.utils.
_PADDLE_RUNNER = r"""
import json, os, sys
import numpy as np
src, data, out = sys.argv[1:4]
import paddleclas
sys.path[:0] = [src, os.path.dirname(paddleclas.__file__)]
import paddle
from ppcls.utils import logger
logger.init_logger(log_level=40)
from ppcls.arch.gears.arcmargin import ArcMargin
from ppcls.loss.celoss import CELoss
from ppcls.loss.tripletangularmarginloss import TripletAngularMarginLoss as Triplet
a = np.load(data)
res = {}
labels = paddle.to_tensor(a["labels"].astype("int64"))
labels2d = labels.reshape([-1, 1])
for eps in (0.1, None):
    x = paddle.to_tensor(a["logits"], stop_gradient=False)
    loss = CELoss(epsilon=eps)({"logits": x}, labels2d)["CELoss"]
    loss.backward()
    res[f"ce_{eps}"] = float(loss)
    res[f"ce_{eps}_grad"] = x.grad.numpy().tolist()
f = paddle.to_tensor(a["features"], stop_gradient=False)
triplet = Triplet(margin=0.5, normalize_feature=True, reduction="mean", add_absolute=True,
                  absolute_loss_weight=0.1, ap_value=0.8, an_value=0.4, feature_from="features")
loss = triplet({"features": f}, labels)["TripletAngularMarginLoss"]
loss.backward()
res["triplet"] = float(loss)
res["triplet_grad"] = f.grad.numpy().tolist()
head = ArcMargin(embedding_size=a["features"].shape[1], class_num=a["logits"].shape[1], margin=0.2, scale=30)
head.weight.set_value(a["arc_weight"])
head.train()
f = paddle.to_tensor(a["features"], stop_gradient=False)
loss = CELoss()({"logits": head(f, labels2d)}, labels2d)["CELoss"]
loss.backward()
res["arc"] = float(loss)
res["arc_grad"] = f.grad.numpy().tolist()
json.dump(res, open(out, "w"))
"""


@pytest.mark.slow
def test_losses_match_paddleclas_itself(tmp_path):
    source = require_paddleclas(PADDLECLAS_LOSS_FILES, tmp_path)
    rng = np.random.default_rng(11)
    labels = pk_labels(rng, 6, 4, num_classes=9)
    features = rng.standard_normal((24, 16)).astype(np.float32)
    features += 1.5 * rng.standard_normal((9, 16)).astype(np.float32)[labels]  # class structure: mixed terms
    logits = (3 * rng.standard_normal((24, 9))).astype(np.float32)
    head = ArcMargin(16, 9, margin=0.2, scale=30.0, rngs=nnx.Rngs(3))
    arc_weight = np.asarray(head.weight[...])
    data = tmp_path / "inputs.npz"
    np.savez(data, labels=labels, features=features, logits=logits, arc_weight=arc_weight)
    runner = tmp_path / "run_paddleclas_losses.py"
    runner.write_text(_PADDLE_RUNNER)
    out = tmp_path / "paddle.json"
    done = subprocess.run(
        [str(PADDLE_PYTHON), str(runner), str(source), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    paddle = json.loads(out.read_text())

    def close(ours, theirs):
        np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=1e-6, atol=1e-7)

    for eps in (0.1, None):
        value, grad = jax.value_and_grad(lambda x, e=eps: cross_entropy(x, labels, e))(jnp.asarray(logits))
        close(value, paddle[f"ce_{eps}"])
        close(grad, paddle[f"ce_{eps}_grad"])
    value, grad = triplet_value_and_grad(jnp.asarray(features), labels)
    close(value, paddle["triplet"])
    close(grad, paddle["triplet_grad"])
    value, grad = jax.value_and_grad(lambda f: cross_entropy(head(f, labels), labels))(jnp.asarray(features))
    close(value, paddle["arc"])
    close(grad, paddle["arc_grad"])
