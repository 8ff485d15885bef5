"""PP-ShiTuV2_rec (PPLCNetV2_base_ShiTu + BNNeck + FC) against reference/ppshitu_spec.md §1–§2.

Fast: a scale-0.25 model at 32 px (the real model only through ``nnx.eval_shape``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shitu import ShituError
from shitu.models.layers import (
    PATCH_MATMUL_MAX_CHANNELS,
    Conv2d,
    ConvBN,
    DownscaleInInferDropout,
    bn_fold_factors,
    conv2d,
    depthwise_conv2d,
    depthwise_conv2d_grouped,
    global_avg_pool,
    use_export_ops,
)
from shitu.models.pplcnetv2 import (
    RepDepthwiseSeparable,
    build_pp_shituv2_rec,
    export_paddle_state,
    fold_batchnorm,
    fuse,
    import_paddle_state,
    make_divisible,
    paddle_state_keys,
    paddle_state_shapes,
)

SCALE = 0.25
SIZE = 32
CLASSES = 10


@nnx.jit
def _apply(model, x):
    """Jitted forward; one compilation per model structure (graphdef), shared by the tests."""
    return model(x)


def _randomize(model, seed: int = 1):
    """Random BatchNorm statistics and affine parameters (and non-zero biases) so that folding and
    fusing are actually exercised."""
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            c = node.mean.shape
            node.mean[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(0, 0.2, c), jnp.float32)
        elif isinstance(node, Conv2d) and node.bias is not None:
            node.bias[...] = jnp.asarray(rng.normal(0, 0.1, node.bias.shape), jnp.float32)
    return model


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    # numpy, not jax.random: eager jax.random compiles once per shape (~0.5 s each here)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def images():
    return _normal(42, (3, SIZE, SIZE, 3))


@pytest.fixture(scope="module")
def trained_like():
    """A scale-0.25 model with random BN statistics, in eval mode."""
    model = _randomize(build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0), scale=SCALE))
    model.eval()
    return model


# ------------------------------------------------------------------------------------------- architecture


def test_make_divisible_like_paddle():
    assert [make_divisible(v) for v in (32, 64, 8, 16 * 0.25, 1024)] == [32, 64, 8, 8, 1024]
    assert make_divisible(32 * 0.25) == 8 and make_divisible(256 * 0.25) == 64
    assert make_divisible(20) == 24 and make_divisible(11) == 16  # 8 < 0.9·11 → +8


def test_output_shapes_and_modes(trained_like, images):
    features = _apply(trained_like, images)
    assert features.shape == (3, 512) and features.dtype == jnp.float32
    assert trained_like.logits(features).shape == (3, CLASSES)
    fresh = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(3), scale=SCALE)
    assert fresh.neck.feat_bn.use_running_average is False  # built in training mode, like Paddle
    fresh.eval()
    assert fresh.neck.feat_bn.use_running_average is True and fresh.backbone.dropout.deterministic is True


def test_architecture_follows_the_spec():
    model = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0), scale=SCALE)
    stages = model.backbone.stages
    # stage 3 (index 2): block 0 at stride 2 has branches 5, 3; later blocks 5, 3, 1; SE and split_pw
    assert [b.conv.kernel_size for b in stages[2][0].dw_conv_list] == [5, 3]
    assert [b.conv.kernel_size for b in stages[2][1].dw_conv_list] == [5, 3, 1]
    assert stages[2][0].se is not None and stages[2][0].split_pw and not stages[2][1].use_shortcut
    # ShiTu: the last stage runs at stride 1, so its block 0 has 3 branches; shortcut only in block 1
    assert [b.stride for b in stages[3]] == [1, 1]
    assert [b.conv.kernel_size for b in stages[3][0].dw_conv_list] == [5, 3, 1]
    assert [b.use_shortcut for b in stages[3]] == [False, True]
    assert stages[3][0].se is None and stages[0][0].stride == 2 and not stages[0][0].use_rep
    assert model.backbone.last_conv.bias is not None and model.head.fc.bias is None

    # feature map sizes: /2 stem, /2 ×3 stages, last stage keeps 1/16
    def feature_maps(backbone, x):
        x = backbone.stem[1](backbone.stem[0](x))
        maps = [x]
        for stage in backbone.stages:
            for block in stage:
                x = block(x)
            maps.append(x)
        return maps

    maps = nnx.eval_shape(feature_maps, model.backbone, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert [m.shape[1:] for m in maps] == [(32, 32, 16), (16, 16, 32), (8, 8, 64), (4, 4, 128), (4, 4, 256)]


def test_real_model_parameter_counts():
    """Counted on the abstract model (``nnx.eval_shape``, no compute), both forms."""

    def count(tree, kind=nnx.Param):
        return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(tree, kind)))

    train = nnx.eval_shape(lambda: build_pp_shituv2_rec(192_612, rngs=nnx.Rngs(0)))
    deploy = nnx.eval_shape(lambda: build_pp_shituv2_rec(192_612, rngs=nnx.Rngs(0), deploy=True))
    stale_dw_conv = 113_152  # Paddle's unused pre-rep dw_conv of stages 2/3, not held by this port
    assert count(train.backbone) == 4_734_976 - stale_dw_conv == 4_621_824
    assert count(deploy.backbone) == 4_557_312
    assert count(train.neck) == count(deploy.neck) == 1_024
    assert count(train.head) == 512 * 192_612 == 98_617_344
    assert count(train, nnx.BatchStat) == 42_880
    # Paddle's training-form state has 287 keys: ours plus dw_conv.weight/bias of the 8 rep blocks
    keys = paddle_state_keys(train)
    assert len(keys) == 287 - 2 * 8 and len(set(keys)) == len(keys)
    shapes = paddle_state_shapes(train)
    assert shapes["backbone.stem.0.conv.weight"] == (32, 3, 3, 3)
    assert shapes["backbone.stem.1.dw_conv.conv.weight"] == (32, 1, 3, 3)
    assert shapes["backbone.stem.1.pw_conv.conv.weight"] == (64, 32, 1, 1)
    assert shapes["backbone.stages.2.0.pw_conv_1.conv.weight"] == (256, 256, 1, 1)
    assert shapes["backbone.stages.2.1.pw_conv_2.conv.weight"] == (512, 256, 1, 1)
    assert shapes["backbone.stages.2.1.dw_conv_list.2.conv.weight"] == (512, 1, 1, 1)
    assert shapes["backbone.stages.2.1.se.conv1.weight"] == (128, 512, 1, 1)
    assert shapes["backbone.stages.3.0.dw_conv_list.2.bn._variance"] == (512,)
    assert shapes["backbone.stages.3.1.pw_conv.conv.weight"] == (1024, 1024, 1, 1)
    assert shapes["backbone.last_conv.weight"] == (512, 1024, 1, 1) and shapes["backbone.last_conv.bias"] == (512,)
    assert shapes["neck.feat_bn._mean"] == (512,) and shapes["head.fc.weight"] == (512, 192_612)
    assert "backbone.stages.2.0.dw_conv.weight" not in shapes
    deploy_shapes = paddle_state_shapes(deploy)
    assert deploy_shapes["backbone.stages.3.0.dw_conv.weight"] == (512, 1, 5, 5)
    assert deploy_shapes["backbone.stages.3.0.dw_conv.bias"] == (512,)
    assert not any("dw_conv_list" in k for k in deploy_shapes)


# ------------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("shape", "k", "stride"),
    [((3, 7, 6, 4), 5, 1), ((4, 9, 8, 6), 5, 2), ((2, 6, 6, 3), 1, 1), ((4, 5, 4, 512), 3, 2)],
)
def test_depthwise_slices_equal_grouped_conv(shape, k, stride):
    x = _normal(0, shape)
    w = _normal(1, (k, k, shape[-1]))

    @jax.jit
    def outputs_and_grads(x, w):
        results = []
        for fn in (depthwise_conv2d, depthwise_conv2d_grouped):
            y, vjp = jax.vjp(lambda x, w, fn=fn: fn(x, w, stride), x, w)
            results.append((y, *vjp(jnp.sin(y))))  # gradient of sum(-cos(y))
        return results

    (y, gx, gw), (ref, rx, rw) = outputs_and_grads(x, w)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "k", "stride", "pad", "cout"),
    [((2, 9, 8, 3), 3, 2, 1, 5), ((3, 7, 7, 1), 5, 1, 2, 4), ((2, 8, 6, 4), 3, 1, 0, 6), ((1, 10, 10, 2), 2, 2, 0, 3)],
)
def test_few_channel_convolution_as_patch_matmul_equals_xla_convolution(shape, k, stride, pad, cout):
    """The JAX form runs convolutions of few input channels (the RGB stem) as one matmul over gathered
    patches; its values and gradients equal XLA's convolution, which the export form keeps."""
    assert shape[-1] <= PATCH_MATMUL_MAX_CHANNELS
    x = _normal(0, shape)
    w = _normal(1, (k, k, shape[-1], cout))

    @jax.jit
    def outputs_and_grads(x, w):
        results = []
        for as_matmul in (True, False):
            y, vjp = jax.vjp(lambda x, w, m=as_matmul: conv2d(x, w, stride, pad, as_matmul=m), x, w)
            results.append((y, *vjp(jnp.sin(y))))
        return results

    (y, gx, gw), (ref, rx, rw) = outputs_and_grads(x, w)
    assert (
        y.shape
        == ref.shape
        == (shape[0], (shape[1] + 2 * pad - k) // stride + 1, (shape[2] + 2 * pad - k) // stride + 1, cout)
    )
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)
    # The export form's graph keeps the convolution; the JAX form has none.
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x: conv2d(x, w, stride, pad))(x))
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x: conv2d(x, w, stride, pad, as_matmul=False))(x))


def test_global_average_pool_as_matmul_equals_the_mean_and_export_form_keeps_the_mean(trained_like, images):
    x = _normal(2, (3, 5, 7, 6))
    pooled = global_avg_pool(x)
    assert pooled.shape == (3, 1, 1, 6)
    np.testing.assert_allclose(pooled, np.asarray(x, np.float64).mean(axis=(1, 2), keepdims=True), rtol=1e-6, atol=1e-7)
    assert "dot_general" in str(jax.make_jaxpr(global_avg_pool)(x))
    assert "dot_general" not in str(jax.make_jaxpr(lambda x: global_avg_pool(x, as_matmul=False))(x))
    # The model's pool switches with the export form, and both forms give the same features.
    model = nnx.clone(trained_like)
    model.eval()
    assert model.backbone.pool.as_matmul
    exported = use_export_ops(nnx.clone(model))
    assert not exported.backbone.pool.as_matmul
    np.testing.assert_allclose(exported(images), model(images), rtol=1e-5, atol=1e-5)


def _numpy_conv_nchw(x, w_oihw, stride, pad, groups=1):
    """Reference convolution with explicit symmetric zero padding (Paddle's padding=(k-1)//2)."""
    n, _, h, wd = x.shape
    o, i_per_g, kh, kw = w_oihw.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    per_group_out = o // groups
    for oc in range(o):
        g = oc // per_group_out
        for a in range(oh):
            for b in range(ow):
                rows, cols = slice(a * stride, a * stride + kh), slice(b * stride, b * stride + kw)
                patch = xp[:, g * i_per_g : (g + 1) * i_per_g, rows, cols]
                out[:, oc, a, b] = np.sum(patch * w_oihw[oc], axis=(1, 2, 3))
    return out


def test_stride2_padding_is_symmetric_and_paddle_layouts_map(trained_like):
    """The stem conv (k3 s2) and the stride-2 depthwise conv of stages.0.0 on an even-sized input with
    an asymmetric pattern equal a numpy reference with ((1,1),(1,1)) padding applied to the Paddle-layout
    weights (OIHW, [C,1,k,k]) that export_paddle_state produces. "SAME" (pads (0,1)) would not."""
    rng = np.random.default_rng(0)
    x = np.zeros((2, 3, 8, 8))
    x[:, :, 0, :] = 5.0  # first row and column light up only with symmetric padding's first window
    x[:, :, :, 0] = -3.0
    x += rng.normal(0, 0.1, x.shape)
    state = export_paddle_state(trained_like)
    stem = trained_like.backbone.stem[0].conv
    got = np.asarray(stem(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))).transpose(0, 3, 1, 2)
    ref = _numpy_conv_nchw(x, state["backbone.stem.0.conv.weight"], 2, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    same = jax.lax.conv_general_dilated(
        jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), stem.kernel[...], (2, 2), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    assert not np.allclose(np.asarray(same).transpose(0, 3, 1, 2), ref, atol=1e-3)

    dw = trained_like.backbone.stages[0][0].dw_conv.conv
    c = dw.channels
    xd = rng.normal(0, 1, (2, c, 8, 8))
    xd[:, :, 0, :] += 4.0
    got = np.asarray(dw(jnp.asarray(xd.transpose(0, 2, 3, 1), jnp.float32))).transpose(0, 3, 1, 2)
    ref = _numpy_conv_nchw(xd, state["backbone.stages.0.0.dw_conv.conv.weight"], 2, 1, groups=c)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_dropout_downscale_in_infer(trained_like, images):
    """Eval multiplies by 1-p = 0.8 (compare a dropout_prob=0 twin); training masks with no rescale."""
    twin = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0), scale=SCALE, dropout_prob=0.0)
    nnx.update(twin, nnx.state(trained_like, nnx.Param), nnx.state(trained_like, nnx.BatchStat))
    twin.eval()
    # undo the (eval, affine) BNNeck to get the backbone outputs back
    scale, shift = bn_fold_factors(trained_like.neck.feat_bn)
    with_dropout = (np.asarray(_apply(trained_like, images), np.float64) - shift) / scale
    without = (np.asarray(_apply(twin, images), np.float64) - shift) / scale
    np.testing.assert_allclose(with_dropout, 0.8 * without, rtol=1e-4, atol=1e-4)

    drop = DownscaleInInferDropout(0.2, rngs=nnx.Rngs(0))
    x = jnp.arange(1.0, 20001.0)
    y = np.asarray(drop(x))
    kept = y != 0
    np.testing.assert_array_equal(y[kept], np.asarray(x)[kept])  # no 1/(1-p) rescale
    assert 0.78 < kept.mean() < 0.82
    drop.eval()
    np.testing.assert_allclose(drop(x), 0.8 * x)


def test_batchnorm_momentum_like_paddle():
    """Paddle: running = 0.9·running + 0.1·batch, with the biased batch variance."""
    model = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0), scale=SCALE)
    bn = model.neck.feat_bn
    x = np.random.default_rng(0).normal(2.0, 3.0, (6, 512))
    out = bn(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(bn.mean[...], 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x.var(0), rtol=1e-5)
    np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- fuse / fold


def test_fuse_and_fold_equal_training_form_in_eval(trained_like, images):
    reference = _apply(trained_like, images)
    fused = fuse(trained_like)
    block = fused.backbone.stages[3][0]
    assert block.dw_conv_list is None and block.dw_conv.kernel.shape == (5, 5, block.in_channels)
    assert trained_like.backbone.stages[3][0].dw_conv_list is not None  # the original is untouched
    assert _rel_err(_apply(fused, images), reference) < 2e-5

    folded = fold_batchnorm(trained_like)
    assert folded.neck is None and folded.backbone.dropout is None
    assert not any(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(folded))
    assert all(n.bn is None for _, n in nnx.iter_graph(folded) if isinstance(n, ConvBN))
    assert _rel_err(_apply(folded, images), reference) < 2e-5
    with pytest.raises(ShituError, match="folded"):
        paddle_state_keys(folded)


def test_rep_block_trains():
    """Train mode through one stage-3 style block (rep branches 5/3/1, SE, split_pw): finite gradients
    (through the custom depthwise VJP) that match the grouped-convolution reference, and BN stats move."""
    block = RepDepthwiseSeparable(16, 16, 1, dw_size=5, split_pw=True, use_rep=True, use_se=True, rngs=nnx.Rngs(0))
    x = _normal(0, (4, 6, 6, 16))

    @nnx.jit
    def grads(block, x):
        return nnx.grad(lambda b: jnp.sum(jnp.sin(b(x))))(block)

    before = np.asarray(block.dw_conv_list[0].bn.mean[...])
    g = grads(block, x)
    assert not np.allclose(block.dw_conv_list[0].bn.mean[...], before)
    leaves = jax.tree.leaves(g)
    assert leaves and all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
    kernel_grad = g["dw_conv_list"][0]["conv"]["kernel"][...]
    assert float(jnp.abs(kernel_grad).sum()) > 0


@pytest.mark.slow
def test_full_training_step_runs(images):
    """The whole network in train mode (the backward takes ~25 s to compile on 2 cores)."""
    model = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0), scale=SCALE)
    labels = jnp.array([0, 1, 2])

    @nnx.jit
    def step(model, x):
        def loss_fn(model):
            logits = model.logits(model(x), labels)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = step(model, images)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------------------ Paddle weights


def test_import_round_trip_training_form(trained_like, images):
    state = export_paddle_state(trained_like)
    assert len(state) == len(paddle_state_keys(trained_like)) + 2 * 8  # + Paddle's dw_conv of 8 rep blocks
    assert state["backbone.stem.0.conv.weight"].shape == (8, 3, 3, 3)
    assert state["head.fc.weight"].shape == (512, CLASSES)
    fresh = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(7), scale=SCALE)
    report = import_paddle_state(fresh, {**state, "StructuredToParameterName@@": {}})
    assert report.skipped == []
    assert sorted(report.unused) == sorted(k for k in state if k.endswith(("dw_conv.weight", "dw_conv.bias")))
    assert all(".stages.2." in k or ".stages.3." in k for k in report.unused)
    assert report.loaded == paddle_state_keys(fresh)
    fresh.eval()
    np.testing.assert_array_equal(_apply(fresh, images), _apply(trained_like, images))
    np.testing.assert_array_equal(fresh.logits(jnp.ones((1, 512))), trained_like.logits(jnp.ones((1, 512))))


def test_import_into_deploy_form(trained_like, images):
    reference = _apply(trained_like, images)
    # a re-parameterised state (dw_conv.weight/bias, no dw_conv_list) into a deploy-form model
    rep_state = export_paddle_state(fuse(trained_like))
    assert not any("dw_conv_list" in k for k in rep_state)
    deploy = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(5), scale=SCALE, deploy=True)
    report = import_paddle_state(deploy, rep_state)
    assert report.skipped == [] and report.unused == []
    deploy.eval()
    assert _rel_err(_apply(deploy, images), reference) < 2e-5
    # a training state into a deploy-form model: re-parameterised from dw_conv_list, dw_conv.* not trusted
    train_state = export_paddle_state(trained_like)
    stale = {k: np.zeros_like(v) if ".dw_conv." in k and "stages.2" in k else v for k, v in train_state.items()}
    deploy2 = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(6), scale=SCALE, deploy=True)
    report = import_paddle_state(deploy2, stale)
    assert report.skipped == []
    assert sorted(report.unused) == sorted(k for k in stale if k.endswith(("dw_conv.weight", "dw_conv.bias")))
    deploy2.eval()
    assert _rel_err(_apply(deploy2, images), reference) < 2e-5
    # and a re-parameterised state cannot feed a training-form model
    with pytest.raises(ShituError, match="deploy=True"):
        import_paddle_state(build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0), scale=SCALE), rep_state)


def test_import_skips_mismatched_head_and_reports_it(trained_like):
    state = export_paddle_state(trained_like)
    other = build_pp_shituv2_rec(7, rngs=nnx.Rngs(3), scale=SCALE)
    head_before = np.asarray(other.head.fc.kernel[...])
    report = import_paddle_state(other, state)
    assert report.skipped == [("head.fc.weight", (512, CLASSES), (512, 7))]
    assert "head.fc.weight" not in report.loaded
    np.testing.assert_array_equal(other.head.fc.kernel[...], head_before)
    np.testing.assert_array_equal(other.backbone.last_conv.bias[...], trained_like.backbone.last_conv.bias[...])
    assert report.to_json()["skipped"] == [{"key": "head.fc.weight", "file_shape": [512, 10], "model_shape": [512, 7]}]


def test_import_missing_key_raises_naming_it(trained_like):
    state = export_paddle_state(trained_like)
    del state["backbone.stages.2.1.se.conv1.bias"]
    model = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0), scale=SCALE)
    with pytest.raises(ShituError, match=r"backbone\.stages\.2\.1\.se\.conv1\.bias"):
        import_paddle_state(model, state)


@pytest.mark.slow
def test_parity_with_paddleclas():
    """Against PaddleClas itself (only where paddle and paddleclas are installed): the same random
    weights and BN statistics give the same features, in training, fused, BN-folded and deploy forms."""
    paddle = pytest.importorskip("paddle")
    arch = pytest.importorskip("paddleclas.ppcls.arch")
    config = {
        "Arch": {
            "name": "RecModel",
            "infer_output_key": "features",
            "infer_add_softmax": False,
            "Backbone": {"name": "PPLCNetV2_base_ShiTu", "pretrained": False, "use_ssld": False, "class_expand": 512},
            "BackboneStopLayer": {"name": "flatten"},
            "Neck": {"name": "BNNeck", "num_features": 512},
            "Head": {"name": "FC", "embedding_size": 512, "class_num": CLASSES, "bias_attr": False},
        }
    }
    paddle.seed(0)
    reference = arch.build_model(config)
    rng = np.random.default_rng(0)
    state = {}
    for key, value in reference.state_dict().items():
        array = value.numpy()
        if key.endswith("_mean"):
            array = rng.normal(0, 0.5, array.shape)
        elif key.endswith("_variance"):
            array = rng.uniform(0.5, 2.0, array.shape)
        elif key.endswith("bn.weight"):
            array = rng.uniform(0.5, 1.5, array.shape)
        elif key.endswith(".bias"):
            array = rng.normal(0, 0.2, array.shape)
        state[key] = np.array(array, np.float32)
    reference.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    reference.eval()
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    with paddle.no_grad():
        expected = reference(paddle.to_tensor(x))["features"].numpy()
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))

    model = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(0))
    report = import_paddle_state(model, state)
    assert len(report.loaded) == 271 and not report.skipped and len(report.unused) == 16
    model.eval()
    for form in (model, fuse(model), fold_batchnorm(model)):
        assert _rel_err(_apply(form, x_nhwc), expected) < 1e-5

    for layer in reference.sublayers():  # Paddle's export-time re-parameterisation
        if hasattr(layer, "re_parameterize"):
            layer.re_parameterize()
    rep_state = {k: v.numpy() for k, v in reference.state_dict().items() if "dw_conv_list" not in k}
    deploy = build_pp_shituv2_rec(CLASSES, rngs=nnx.Rngs(1), deploy=True)
    report = import_paddle_state(deploy, rep_state)
    assert not report.skipped and not report.unused
    deploy.eval()
    assert _rel_err(_apply(deploy, x_nhwc), expected) < 1e-5
