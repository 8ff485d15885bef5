"""CLIP ViT recognizers (PP-ShiTuV2_rec_CLIP_vit_base / _large): numerics against a plain numpy forward
written from PaddleClas' foundation_vit.py on Paddle-layout weights, the ArcMargin head, sizes, and the
PaddleClas weight import."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shitu import ShituError
from shitu.models.heads import ArcMargin
from shitu.models.vit import (
    bicubic_resize_matrix,
    build_clip_vit,
    build_clip_vit_base,
    build_clip_vit_large,
    export_paddle_state,
    import_paddle_state,
    paddle_state_keys,
)

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 8, "img_size": 32, "output_dim": 48}
EMBED = 40  # neck output, different from output_dim so that a swapped shape would show
NUM_CLASSES = 7

_erf = np.vectorize(math.erf)


def tiny_arch(remove_cls_token: bool) -> dict:
    return {**TINY, "remove_cls_token": remove_cls_token, "embedding_size": EMBED}


def tiny(remove_cls_token: bool, seed: int = 0, num_classes: int = NUM_CLASSES):
    """A tiny model holding a random Paddle state (``seed``): built abstractly (nnx.eval_shape), then
    filled by the importer, so no eager random initialisation (it compiles per shape: seconds)."""
    model = nnx.eval_shape(lambda: build_clip_vit(num_classes, rngs=nnx.Rngs(0), **tiny_arch(remove_cls_token)))
    state = random_paddle_state(model, seed)
    report = import_paddle_state(model, state)
    assert len(report.loaded) == len(state)
    return model, state


@nnx.jit
def forward(model, x):
    return model(x)


def random_paddle_state(model, seed: int) -> dict[str, np.ndarray]:
    """Random values for every key in Paddle's layout (LayerNorm scales around 1, the rest small)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in paddle_state_keys(model).items():
        a = rng.normal(0.0, 0.2, shape)
        if key.endswith(".weight") and len(shape) == 1:  # LayerNorm gamma
            a = 1.0 + a
        state[key] = a.astype(np.float32)
    return state


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------------
# Plain numpy forward (float64) on a Paddle state dict, following PaddleClas line by line.


def np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_cubic(x, a=-0.75):
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def np_bicubic_1d(v, n_out, axis):
    """Direct (loop) bicubic, align_corners=False, taps clamped at the edges, along ``axis``."""
    v = np.moveaxis(v, axis, 0)
    n_in = v.shape[0]
    out = np.zeros((n_out, *v.shape[1:]))
    for k in range(n_out):
        src = (k + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for i in range(base - 1, base + 3):
            out[k] += np_cubic(src - i) * v[min(max(i, 0), n_in - 1)]
    return np.moveaxis(out, 0, axis)


def np_forward(state, x, *, patch, heads, img_size, remove_cls_token):
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    x = np.asarray(x, np.float64)  # NHWC
    b, h, w, _ = x.shape
    if h % patch or w % patch:  # pading_for_not_divisible, quirk included
        x = np.pad(x, ((0, 0), (0, patch - h % patch), (0, patch - w % patch), (0, 0)))
        h, w = x.shape[1:3]
    gh, gw = h // patch, w // patch
    patches = x.reshape(b, gh, patch, gw, patch, 3)
    t = np.einsum("byixjc,ocij->byxo", patches, s["backbone.patch_embed.proj.weight"]).reshape(b, gh * gw, -1)
    d = t.shape[-1]
    t = np.concatenate([np.broadcast_to(s["backbone.cls_token"], (b, 1, d)), t], axis=1)
    pos = s["backbone.pos_embed"]
    g0 = img_size // patch
    if (gh, gw) != (g0, g0):
        grid = pos[0, 1:].reshape(g0, g0, d)
        grid = np_bicubic_1d(np_bicubic_1d(grid, gh, 0), gw, 1).reshape(1, gh * gw, d)
        pos = np.concatenate([pos[:, :1], grid], axis=1)
    t = t + pos
    t = np_layer_norm(t, s["backbone.ln_pre.weight"], s["backbone.ln_pre.bias"])
    depth = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("backbone.blocks."))
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        n = t.shape[1]
        y = np_layer_norm(t, s[p + "norm1.weight"], s[p + "norm1.bias"])
        qkv = (y @ s[p + "attn.qkv.weight"] + s[p + "attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # Paddle's transpose((2, 0, 3, 1, 4))
        att = q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        t = t + y @ s[p + "attn.proj.weight"] + s[p + "attn.proj.bias"]
        y = np_layer_norm(t, s[p + "norm2.weight"], s[p + "norm2.bias"])
        y = y @ s[p + "mlp.fc1.weight"] + s[p + "mlp.fc1.bias"]
        y = 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))  # nn.GELU(): exact erf
        t = t + y @ s[p + "mlp.fc2.weight"] + s[p + "mlp.fc2.bias"]
    if remove_cls_token:
        t = t[:, 1:]
    t = np_layer_norm(t, s["backbone.norm.weight"], s["backbone.norm.bias"])
    emb = (t @ s["backbone.proj"]).mean(1)
    return emb @ s["neck.fc.weight"] + s["neck.fc.bias"]


def np_arcmargin(x, w, labels, margin, scale, training):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    if not training or labels is None:
        return cos
    sin = np.sqrt(1.0 - cos**2 + 1e-6)
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    phi = np.where(cos > -math.cos(margin), phi, cos - math.sin(margin) * margin)
    onehot = np.eye(w.shape[1])[np.asarray(labels).reshape(-1)]
    return scale * (onehot * phi + (1 - onehot) * cos)


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


def test_random_init_shapes_and_contract(images):
    """The real builder (eager random init, PaddleClas initialisers) and the module contract."""
    model = build_clip_vit(NUM_CLASSES, rngs=nnx.Rngs(0), **tiny_arch(remove_cls_token=True))
    bb = model.backbone
    np.testing.assert_array_equal(np.asarray(bb.ln_pre.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(bb.blocks[0].attn.qkv.bias[...]), 0.0)
    assert np.abs(np.asarray(bb.pos_embed[...])).max() <= 0.04 + 1e-6  # TruncatedNormal(.02), cut at 2 std
    assert bb.patch_embed.proj.bias is None
    features = forward(model, jnp.asarray(images))
    assert np.isfinite(np.asarray(features)).all()
    assert features.shape == (2, EMBED) and features.dtype == jnp.float32
    assert model.logits(features).shape == (2, NUM_CLASSES)
    assert model.logits(features, jnp.array([0, 3])).shape == (2, NUM_CLASSES)
    # features are not L2-normalised (PaddleClas' `features`)
    assert not np.allclose(np.linalg.norm(np.asarray(features), axis=1), 1.0)


@pytest.mark.parametrize("remove_cls_token", [True, False], ids=["base-style", "large-style"])
def test_forward_matches_numpy_reference(images, remove_cls_token):
    model, state = tiny(remove_cls_token, seed=1)
    got = forward(model, jnp.asarray(images))
    kw = {"patch": 8, "heads": 4, "img_size": 32}
    want = np_forward(state, images, remove_cls_token=remove_cls_token, **kw)
    assert rel_err(got, want) <= 1e-5
    # and the other cls-token policy is clearly a different function (mean over n vs n + 1 tokens)
    other = np_forward(state, images, remove_cls_token=not remove_cls_token, **kw)
    assert rel_err(got, other) > 1e-2


def test_other_input_size_interpolates_pos_embed():
    """48 px on a 32-px model: 6×6 grid, pos_embed resized bicubically (Paddle's resize_pos_embed)."""
    model, state = tiny(remove_cls_token=False, seed=2)
    x = np.random.default_rng(3).normal(size=(2, 48, 40, 3)).astype(np.float32)
    want = np_forward(state, x, patch=8, heads=4, img_size=32, remove_cls_token=False)
    assert rel_err(forward(model, jnp.asarray(x)), want) <= 1e-5


def test_non_divisible_input_is_padded_like_paddleclas():
    """32×36 with P=8: both sides padded (by a whole patch on the divisible one), i.e. zero-padded 40×40."""
    model, state = tiny(remove_cls_token=True, seed=4)
    x = np.random.default_rng(4).normal(size=(1, 32, 36, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 8), (0, 4), (0, 0)))
    want = np_forward(state, padded, patch=8, heads=4, img_size=32, remove_cls_token=True)
    assert rel_err(forward(model, jnp.asarray(x)), want) <= 1e-5


def test_bicubic_matrix_is_paddles_cubic_convolution():
    m = bicubic_resize_matrix(4, 7)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # partition of unity
    v = np.random.default_rng(5).normal(size=(4, 3))
    np.testing.assert_allclose(m @ v, np_bicubic_1d(v, 7, 0), atol=1e-12)
    np.testing.assert_allclose(
        bicubic_resize_matrix(5, 3) @ v[:3].repeat(2, 0)[:5], np_bicubic_1d(v[:3].repeat(2, 0)[:5], 3, 0)
    )
    np.testing.assert_array_equal(bicubic_resize_matrix(4, 4), np.eye(4))


def test_mlp_uses_exact_gelu():
    model, _ = tiny(remove_cls_token=True)
    mlp = model.backbone.blocks[0].mlp
    d = mlp.fc1.kernel.shape[0]
    h = mlp.fc1.kernel.shape[1]
    # fc1 = identity on the first d units (rest zero), fc2 = its transpose: mlp(x) = gelu(x)
    mlp.fc1.kernel.set_value(jnp.eye(d, h))
    mlp.fc1.bias.set_value(jnp.zeros(h))
    mlp.fc2.kernel.set_value(jnp.eye(h, d))
    mlp.fc2.bias.set_value(jnp.zeros(d))
    x = np.linspace(-4, 4, d, dtype=np.float32)[None]
    got = np.asarray(mlp(jnp.asarray(x)), np.float64)
    exact = 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    tanh = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True))
    quick = x / (1 + np.exp(-1.702 * x))
    np.testing.assert_allclose(got, exact, atol=2e-6)
    assert np.abs(got - tanh).max() > 1e-4
    assert np.abs(got - quick).max() > 1e-2


def test_arcmargin_matches_numpy():
    rng = np.random.default_rng(6)
    head = ArcMargin(EMBED, NUM_CLASSES, margin=0.2, scale=30.0, rngs=nnx.Rngs(0))
    w = rng.normal(size=(EMBED, NUM_CLASSES)).astype(np.float32)
    head.weight.set_value(jnp.asarray(w))
    x = rng.normal(size=(12, EMBED)).astype(np.float32)
    # make some target cosines fall below -cos m (the cos - m·sin m branch)
    x[:3] = -w[:, :3].T / np.linalg.norm(w[:, :3], axis=0)[:, None]
    labels = np.array([0, 1, 2, *rng.integers(0, NUM_CLASSES, 9)])
    cos = np_arcmargin(x, w, labels, 0.2, 30.0, training=False)
    assert (cos[np.arange(12), labels] < -math.cos(0.2)).sum() >= 3

    head.train()
    got = head(jnp.asarray(x), jnp.asarray(labels))
    want = np_arcmargin(x, w, labels, 0.2, 30.0, training=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=3e-5)
    # [B, 1] labels (Paddle's layout) give the same
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(x), jnp.asarray(labels)[:, None])), np.asarray(got))
    # training without labels: plain cosine, no scale
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))), cos, rtol=1e-5, atol=1e-6)

    head.eval()
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(x), jnp.asarray(labels))), cos, rtol=1e-5, atol=1e-6)


def test_model_train_eval_switches_the_head(images):
    model, _ = tiny(remove_cls_token=True)
    feats = forward(model, jnp.asarray(images))
    labels = jnp.array([1, 2])
    model.train()
    train_logits = np.asarray(model.logits(feats, labels))
    model.eval()
    eval_logits = np.asarray(model.logits(feats, labels))
    assert np.abs(eval_logits).max() <= 1.0 + 1e-6
    assert np.abs(train_logits).max() > 1.5


def _param_count(build, num_classes):
    abstract = nnx.eval_shape(lambda: build(num_classes, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    total = sum(math.prod(leaf.shape) for leaf in leaves)
    return total, abstract


@pytest.mark.parametrize(
    ("build", "expected", "tokens"),
    [(build_clip_vit_base, 86_455_296, 197), (build_clip_vit_large, 303_966_720, 257)],
    ids=["base", "large"],
)
def test_full_size_parameter_counts(build, expected, tokens):
    """Spec §7: ≈86.46M (base) / 303.97M (large) incl. the neck; the ArcMargin head adds 512·C."""
    total, abstract = _param_count(build, 1000)
    assert total - 512 * 1000 == expected
    assert abstract.backbone.pos_embed.shape[1] == tokens
    assert abstract.backbone.proj.shape[1] == 512


def test_import_round_trip(images):
    """Random Paddle-layout state → model a → export → fresh model b: identical outputs and state."""
    a, state = tiny(remove_cls_token=False, seed=7)
    b = build_clip_vit(NUM_CLASSES, rngs=nnx.Rngs(1), **tiny_arch(remove_cls_token=False))
    assert not np.array_equal(np.asarray(forward(a, jnp.asarray(images))), np.asarray(forward(b, jnp.asarray(images))))
    report = import_paddle_state(b, export_paddle_state(a))
    assert len(report.loaded) == len(state) and not report.skipped and not report.unused
    np.testing.assert_array_equal(
        np.asarray(forward(a, jnp.asarray(images))), np.asarray(forward(b, jnp.asarray(images)))
    )
    exported = export_paddle_state(b)
    assert exported.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value)


def test_import_keys_and_layouts():
    keys = paddle_state_keys(tiny(remove_cls_token=True)[0])
    assert keys["backbone.patch_embed.proj.weight"] == (64, 3, 8, 8)  # OIHW
    assert keys["backbone.blocks.1.attn.qkv.weight"] == (64, 192)  # [in, out]
    assert keys["backbone.blocks.1.mlp.fc1.weight"] == (64, 256)
    assert keys["backbone.ln_pre.weight"] == (64,)
    assert keys["backbone.proj"] == (64, 48)
    assert keys["neck.fc.weight"] == (48, EMBED)
    assert keys["head.weight"] == (EMBED, NUM_CLASSES)
    assert "backbone.patch_embed.proj.bias" not in keys
    assert len(keys) == 4 + 2 + 2 * 12 + 2 + 2 + 1  # cls/pos/patch/proj, ln_pre, blocks, norm, neck, head


def test_import_skips_head_mismatch_and_reports_unused(images):
    src, _ = tiny(remove_cls_token=True, seed=0, num_classes=11)
    state = {**export_paddle_state(src), "backbone.extra": np.zeros(3, np.float32)}
    dst, _ = tiny(remove_cls_token=True, seed=1)
    head_before = np.asarray(dst.head.weight[...])
    report = import_paddle_state(dst, state)
    assert report.skipped == [("head.weight", (EMBED, 11), (EMBED, NUM_CLASSES))]
    assert report.unused == ["backbone.extra"]
    np.testing.assert_array_equal(np.asarray(dst.head.weight[...]), head_before)
    np.testing.assert_array_equal(
        np.asarray(forward(dst, jnp.asarray(images))), np.asarray(forward(src, jnp.asarray(images)))
    )
    assert report.to_json()["skipped"][0]["key"] == "head.weight"
    # the head is optional altogether
    state.pop("head.weight")
    assert "head.weight" not in import_paddle_state(dst, state).loaded


def test_import_missing_key_raises_and_changes_nothing():
    model, state = tiny(remove_cls_token=True, seed=8)
    del state["backbone.blocks.1.norm2.bias"]
    before = np.asarray(model.backbone.cls_token[...])
    with pytest.raises(ShituError, match=r"backbone\.blocks\.1\.norm2\.bias"):
        import_paddle_state(model, state)
    np.testing.assert_array_equal(np.asarray(model.backbone.cls_token[...]), before)
