"""Optimizer of the training recipes: schedule, parameter masks, Momentum + coupled L2 update (and, slow,
PaddleClas' own LR classes and Momentum wrapper on the same inputs)."""

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

from shitu.errors import ShituError
from shitu.models.pplcnetv2_recipe import RECIPE as PPLCNET
from shitu.models.spec import TrainingRecipe
from shitu.models.vit_recipe import RECIPE as VIT
from shitu.train.optim import lr_schedule, make_optimizer, parameter_groups, warmup_and_decay_steps


def pplcnet_optimizer(model, weight_decay=PPLCNET.weight_decay, **schedule):
    """The optimizer the trainer makes for PP-ShiTuV2_rec: its recipe's groups and coefficient."""
    return make_optimizer(model, groups=parameter_groups(model, PPLCNET), weight_decay=weight_decay, **schedule)


@pytest.fixture(scope="module")
def small_model():
    """PP-ShiTuV2_rec at scale 0.25, abstract (nnx.eval_shape): the masks only need the structure."""
    from shitu.models.pplcnetv2 import build_pp_shituv2_rec

    return nnx.eval_shape(lambda: build_pp_shituv2_rec(5, rngs=nnx.Rngs(0), scale=0.25))


class Mini(nnx.Module):
    """A few real layers with the recipe's special cases: a ConvBN (BN without L2), a BNNeck (frozen bias), an FC
    head. Updates are checked on it (the full model's 173 tensors make eager JAX slow); masks on the real model."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        from shitu.models.layers import ConvBN
        from shitu.models.pplcnetv2 import BNNeck, FCHead

        self.backbone = nnx.Dict(stem=nnx.List([ConvBN(3, 6, 3, 2, rngs=rngs)]))
        self.neck = BNNeck(6, rngs=rngs)
        self.head = FCHead(6, 3, rngs=rngs)


def reference_lr(i: int, base: float, epochs: int, warmup_epochs: float, steps: int) -> float:
    """PaddleClas Cosine (by_epoch False) = LinearWarmup(0 → base, W) then CosineAnnealingDecay(T), by hand."""
    warmup_epochs = min(warmup_epochs, epochs)
    w = round(warmup_epochs * steps)
    t = (epochs - warmup_epochs) * steps
    if i < w:
        return base * i / w
    if t == 0:
        return base
    return base * (1 + math.cos(math.pi * (i - w) / t)) / 2


# ----------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("base", "epochs", "warmup", "steps"),
    [(0.01, 20, 5, 7), (0.06, 4, 1, 5), (0.02, 3, 0, 4), (0.001, 3, 5, 4), (0.1, 5, 0.5, 3)],
)
def test_schedule_matches_hand_reference(base, epochs, warmup, steps):
    schedule = lr_schedule(base, epochs=epochs, warmup_epochs=warmup, steps_per_epoch=steps)
    iterations = np.arange(epochs * steps)
    ours = np.asarray(jax.jit(jax.vmap(schedule))(iterations))
    expected = np.array([reference_lr(int(i), base, epochs, warmup, steps) for i in iterations])
    np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=base * 1e-7)


def test_schedule_landmarks():
    schedule = lr_schedule(0.01, epochs=4, warmup_epochs=1, steps_per_epoch=5)
    assert float(schedule(0)) == 0.0  # Paddle's first step uses LinearWarmup's start_lr
    assert float(schedule(1)) == pytest.approx(0.002, rel=1e-6)
    assert float(schedule(5)) == pytest.approx(0.01, rel=1e-6)  # end of warmup = cosine start
    assert float(schedule(12)) == pytest.approx(0.005 * (1 + math.cos(math.pi * 7 / 15)), rel=1e-6)
    assert float(schedule(19)) == pytest.approx(0.005 * (1 + math.cos(math.pi * 14 / 15)), rel=1e-5)
    # Warmup clamped to the epochs: linear to the base LR over everything, then constant.
    assert warmup_and_decay_steps(3, 5, 4) == (12, 0.0)
    clamped = lr_schedule(0.06, epochs=3, warmup_epochs=5, steps_per_epoch=4)
    assert float(clamped(11)) == pytest.approx(0.055, rel=1e-6) and float(clamped(12)) == pytest.approx(0.06)
    # No warmup: the cosine starts at the base LR on iteration 0. Half epochs round half to even (Python's round).
    assert float(lr_schedule(0.02, epochs=3, warmup_epochs=0, steps_per_epoch=4)(0)) == pytest.approx(0.02)
    assert warmup_and_decay_steps(5, 0.5, 3) == (2, 13.5)
    assert warmup_and_decay_steps(5, 0.5, 5) == (2, 22.5)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ShituError):
        lr_schedule(0.01, epochs=0, warmup_epochs=0, steps_per_epoch=3)
    with pytest.raises(ShituError):
        lr_schedule(0.01, epochs=2, warmup_epochs=-1, steps_per_epoch=3)
    with pytest.raises(ShituError):
        lr_schedule(-0.1, epochs=2, warmup_epochs=0, steps_per_epoch=3)


# -------------------------------------------------------------------------------------------------------- masks


def test_pplcnet_masks_name_the_convbn_batchnorms_and_the_bnneck_bias(small_model):
    from shitu.models.layers import ConvBN

    groups = parameter_groups(small_model, PPLCNET)
    params = set(groups.all_params)
    no_decay_expected = {
        ("backbone", "stem", 0, "bn", "scale"),
        ("backbone", "stem", 0, "bn", "bias"),
        ("backbone", "stem", 1, "dw_conv", "bn", "scale"),
        ("backbone", "stem", 1, "pw_conv", "bn", "bias"),
        ("backbone", "stages", 2, 0, "dw_conv_list", 0, "bn", "scale"),
        ("backbone", "stages", 2, 0, "pw_conv_1", "bn", "bias"),
        ("backbone", "stages", 3, 1, "dw_conv_list", 2, "bn", "bias"),
    }
    assert no_decay_expected <= groups.no_decay
    decayed = {
        ("backbone", "stem", 0, "conv", "kernel"),
        ("backbone", "stages", 2, 0, "dw_conv_list", 0, "conv", "kernel"),
        ("backbone", "stages", 2, 0, "se", "conv1", "kernel"),
        ("backbone", "stages", 2, 0, "se", "conv1", "bias"),
        ("backbone", "stages", 2, 0, "se", "conv2", "bias"),
        ("backbone", "last_conv", "kernel"),
        ("backbone", "last_conv", "bias"),
        ("neck", "feat_bn", "scale"),
        ("neck", "feat_bn", "bias"),
        ("head", "fc", "kernel"),
    }
    assert decayed <= params and not decayed & groups.no_decay
    assert groups.frozen == {("neck", "feat_bn", "bias")}
    # The rule: exactly the scale/bias of every ConvBN's BatchNorm, i.e. 2 per ConvBN.
    conv_bns = [node for _, node in nnx.iter_graph(small_model) if isinstance(node, ConvBN)]
    assert len(groups.no_decay) == 2 * len(conv_bns) == 96
    assert all(p[0] == "backbone" and p[-2] == "bn" and p[-1] in ("scale", "bias") for p in groups.no_decay)
    assert {p for p in params if p[0] == "backbone" and p[-2:] in (("bn", "scale"), ("bn", "bias"))} == groups.no_decay
    listing = groups.to_json()
    assert listing["frozen"] == ["neck.feat_bn.bias"] and "backbone.stem.0.bn.scale" in listing["no_decay"]
    assert listing["params"] == len(params) == 173


def test_deploy_form_decays_the_fused_depthwise_conv():
    from shitu.models.pplcnetv2 import build_pp_shituv2_rec

    deploy = nnx.eval_shape(lambda: build_pp_shituv2_rec(5, rngs=nnx.Rngs(0), scale=0.25, deploy=True))
    groups = parameter_groups(deploy, PPLCNET)
    fused = ("backbone", "stages", 2, 0, "dw_conv", "bias")
    assert fused in groups.all_params and fused not in groups.no_decay
    assert not any("dw_conv_list" in map(str, p) for p in groups.all_params)
    assert groups.frozen == {("neck", "feat_bn", "bias")}


def test_vit_recipe_decays_everything_and_freezes_nothing():
    from shitu.models.vit import build_clip_vit

    model = nnx.eval_shape(
        lambda: build_clip_vit(
            3, rngs=nnx.Rngs(0), embed_dim=8, depth=1, num_heads=2, patch_size=8, img_size=16, remove_cls_token=True
        )
    )
    groups = parameter_groups(model, VIT)
    assert not groups.no_decay and not groups.frozen
    assert ("backbone", "pos_embed") in groups.all_params and ("head", "weight") in groups.all_params
    assert parameter_groups(model) == groups


def name_a_missing_parameter(model):
    return {("head", "fc", "kernel")}, set()


def name_paths_as_text(model):
    return {("backbone", "stem", "0", "bn", "scale")}, {("neck", "feat_bn", "bias")}


def test_recipe_groups_are_checked_and_matched_whatever_the_index_type(small_model):
    from shitu.models.vit import build_clip_vit

    vit_model = nnx.eval_shape(
        lambda: build_clip_vit(
            3, rngs=nnx.Rngs(0), embed_dim=8, depth=1, num_heads=2, patch_size=8, img_size=16, remove_cls_token=True
        )
    )
    missing = TrainingRecipe(loss="x:y", train_transform="x:y", parameter_groups=f"{__name__}:name_a_missing_parameter")
    with pytest.raises(ShituError, match=r"name_a_missing_parameter names a no-decay parameter 'head\.fc\.kernel'"):
        parameter_groups(vit_model, missing)
    textual = TrainingRecipe(loss="x:y", train_transform="x:y", parameter_groups=f"{__name__}:name_paths_as_text")
    groups = parameter_groups(small_model, textual)
    assert groups.no_decay == {("backbone", "stem", 0, "bn", "scale")}  # the model's own path, int index
    assert groups.frozen == {("neck", "feat_bn", "bias")}


# ------------------------------------------------------------------------------------------------------ updates


def numpy_momentum_l2(params, grads_per_step, lrs, coeff, no_decay, frozen, momentum=0.9):
    """Paddle Momentum with a fused L2Decay, per parameter path: v = μv + g + c·w; w -= lr·v (frozen: lr 0)."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for k in params:
            c = 0.0 if k in no_decay else coeff
            velocity[k] = momentum * velocity[k] + grads[k] + c * params[k]
            if k not in frozen:
                params[k] = params[k] - lr * velocity[k]
    return params


def flat(state) -> dict:
    return {tuple(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def test_functional_updates_equal_numpy_momentum_with_l2():
    model = Mini(nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    # Non-trivial values for the BNNeck bias (init 0), so a wrong decay or update would show.
    params["neck"]["feat_bn"]["bias"][...] = jnp.linspace(-1, 1, 6)
    tx, schedule = pplcnet_optimizer(
        model, learning_rate=0.1, epochs=2, warmup_epochs=1, steps_per_epoch=2, weight_decay=0.01
    )
    rng = np.random.default_rng(0)
    start = flat(params)
    grads_per_step = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(3)]
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(params)
    for step, grads in enumerate(grads_per_step):
        grad_tree = jax.tree_util.tree_map_with_path(
            lambda path, _, g=grads: g[tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path[:-1])],
            params,
        )
        updates, state = update(grad_tree, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        assert float(schedule(step)) == pytest.approx([0.0, 0.05, 0.1][step], rel=1e-6)
    groups = parameter_groups(model, PPLCNET)
    assert groups.no_decay == {("backbone", "stem", 0, "bn", "scale"), ("backbone", "stem", 0, "bn", "bias")}
    assert groups.frozen == {("neck", "feat_bn", "bias")} and len(groups.all_params) == 6
    expected = numpy_momentum_l2(start, grads_per_step, [0.0, 0.05, 0.1], 0.01, groups.no_decay, groups.frozen)
    ours = flat(params)
    for path in expected:
        np.testing.assert_allclose(ours[path], expected[path], rtol=1e-5, atol=1e-6, err_msg=str(path))
    frozen = ("neck", "feat_bn", "bias")
    np.testing.assert_array_equal(ours[frozen], start[frozen])  # exactly unchanged after 3 steps
    bn = ("backbone", "stem", 0, "bn", "scale")
    assert not np.allclose(ours[bn], start[bn])  # ...while the other parameters moved
    # The no-decay rule matters at this coefficient: with decay the BN scale would differ.
    decayed = numpy_momentum_l2(start, grads_per_step, [0.0, 0.05, 0.1], 0.01, set(), groups.frozen)
    assert np.abs(decayed[bn] - expected[bn]).max() > 1e-5


def test_nnx_optimizer_form_freezes_the_bnneck_bias():
    model = Mini(nnx.Rngs(1))
    model.neck.feat_bn.bias[...] = jnp.full((6,), 0.25)
    tx, _ = pplcnet_optimizer(model, learning_rate=0.5, epochs=1, warmup_epochs=0, steps_per_epoch=4)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    scale_before = np.asarray(model.neck.feat_bn.scale[...]).copy()
    head_before = np.asarray(model.head.fc.kernel[...]).copy()
    step = nnx.jit(lambda opt, m, g: opt.update(m, g))
    for _ in range(3):
        step(optimizer, model, grads)
    np.testing.assert_array_equal(np.asarray(model.neck.feat_bn.bias[...]), np.full(6, 0.25, np.float32))
    # lr(i) = 0.25·(1 + cos(π i / 4)), v accumulates g + 1e-5·w: the BNNeck scale (decayed) moves accordingly.
    lrs = [0.25 * (1 + math.cos(math.pi * i / 4)) for i in range(3)]
    expected = numpy_momentum_l2({"s": scale_before}, [{"s": np.ones(6)}] * 3, lrs, 1e-5, set(), set())["s"]
    np.testing.assert_allclose(np.asarray(model.neck.feat_bn.scale[...]), expected, rtol=1e-6)
    assert not np.allclose(np.asarray(model.head.fc.kernel[...]), head_before)


def test_masks_refuse_a_tree_without_the_models_paths(small_model):
    tx, _ = pplcnet_optimizer(small_model, learning_rate=0.1, epochs=1, warmup_epochs=0, steps_per_epoch=1)
    with pytest.raises(ShituError, match="not in the parameter tree"):
        tx.init({"x": jnp.zeros(3)})


def test_zero_weight_decay_is_plain_momentum(small_model):
    tx, _ = make_optimizer(
        small_model, learning_rate=1.0, epochs=1, warmup_epochs=0, steps_per_epoch=10, weight_decay=0.0
    )
    params = {"w": jnp.asarray([1.0, -2.0])}  # no groups, no masks: any tree works
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.asarray([0.5, 0.5])}, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.5, -0.5])  # lr(0) = 1.0, no decay term
    updates, _ = tx.update({"w": jnp.asarray([0.5, 0.5])}, state, params)
    lr1 = 0.5 * (1 + math.cos(math.pi / 10))
    np.testing.assert_allclose(np.asarray(updates["w"]), [-lr1 * 0.95] * 2, rtol=1e-6)


# ------------------------------------------------------------------------------------------ PaddleClas itself

PADDLECLAS_OPTIM_FILES = ("ppcls/optimizer/learning_rate.py", "ppcls/optimizer/optimizer.py")

# Runs inside the Paddle environment: PaddleClas' own Cosine LR (LinearWarmup + CosineAnnealingDecay) and its
# Momentum wrapper (paddle.optimizer.Momentum, L2Decay) on three parameters like ours: decayed, L2Decay(0)
# (ConvBNLayer's BN) and learning_rate 1e-20 (BNNeck bias). No ppcls/optimizer/__init__.py: namespace portion.
_PADDLE_RUNNER = r"""
import json, os, sys
import numpy as np
src, data, out = sys.argv[1:4]
import paddleclas
sys.path[:0] = [src, os.path.dirname(paddleclas.__file__)]
import paddle
from paddle import ParamAttr
from paddle.regularizer import L2Decay
from ppcls.utils import logger
logger.init_logger(log_level=40)
from ppcls.optimizer.learning_rate import Cosine
from ppcls.optimizer.optimizer import Momentum
a = np.load(data)
res = {"schedules": []}
for base, epochs, warmup, steps in json.loads(str(a["configs"])):
    sched = Cosine(epochs=epochs, step_each_epoch=steps, learning_rate=base, warmup_epoch=warmup)()
    values = []
    for _ in range(epochs * steps):
        values.append(float(sched.last_lr))
        sched.step()
    res["schedules"].append(values)

class Three(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        init = lambda k: paddle.nn.initializer.Assign(a[k])
        self.decayed = self.create_parameter(a["decayed"].shape, attr=ParamAttr(initializer=init("decayed")))
        self.bn = self.create_parameter(a["bn"].shape, attr=ParamAttr(initializer=init("bn"), regularizer=L2Decay(0.0)))
        frozen = ParamAttr(initializer=init("frozen"), learning_rate=1e-20)
        self.frozen = self.create_parameter(a["frozen"].shape, attr=frozen)

layer = Three()
base, epochs, warmup, steps = json.loads(str(a["train_config"]))
sched = Cosine(epochs=epochs, step_each_epoch=steps, learning_rate=base, warmup_epoch=warmup)()
opt = Momentum(learning_rate=sched, momentum=0.9, weight_decay=L2Decay(float(a["coeff"])))([layer])
for step in range(a["grads_decayed"].shape[0]):
    loss = sum((getattr(layer, k) * paddle.to_tensor(a["grads_" + k][step])).sum() for k in ("decayed", "bn", "frozen"))
    loss.backward()
    opt.step()
    opt.clear_grad()
    sched.step()
res.update({k: getattr(layer, k).numpy().tolist() for k in ("decayed", "bn", "frozen")})
json.dump(res, open(out, "w"))
"""


@pytest.mark.slow
def test_schedule_and_update_match_paddleclas_itself(tmp_path):
    from shitu.models.pplcnetv2 import build_pp_shituv2_rec

    source = require_paddleclas(PADDLECLAS_OPTIM_FILES, tmp_path)
    # Paddle needs an integer T_max, so whole warmup epochs here.
    configs = [[0.01, 20, 5, 7], [0.06, 4, 1, 5], [0.02, 3, 0, 4], [0.001, 3, 5, 4], [0.1, 2, 2, 3]]
    train_config = [0.1, 2, 1, 3]
    coeff = 1e-2  # large, so a misplaced decay would show
    model = build_pp_shituv2_rec(5, rngs=nnx.Rngs(0), scale=0.25)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(1)
    params["neck"]["feat_bn"]["bias"][...] = jnp.asarray(rng.standard_normal(512), jnp.float32)
    roles = {
        "decayed": ("backbone", "last_conv", "bias"),
        "bn": ("backbone", "stem", 0, "bn", "scale"),
        "frozen": ("neck", "feat_bn", "bias"),
    }
    start = flat(params)
    steps = train_config[1] * train_config[3]
    grads_per_step = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(steps)
    ]
    arrays = {role: start[path] for role, path in roles.items()}
    arrays.update({f"grads_{role}": np.stack([g[path] for g in grads_per_step]) for role, path in roles.items()})
    data = tmp_path / "inputs.npz"
    np.savez(data, configs=json.dumps(configs), train_config=json.dumps(train_config), coeff=coeff, **arrays)
    runner = tmp_path / "run_paddleclas_optim.py"
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
    for (base, epochs, warmup, steps_per_epoch), theirs in zip(configs, paddle["schedules"], strict=True):
        schedule = lr_schedule(base, epochs=epochs, warmup_epochs=warmup, steps_per_epoch=steps_per_epoch)
        ours = np.asarray(jax.vmap(schedule)(np.arange(epochs * steps_per_epoch)))
        np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=base * 1e-7)

    base, epochs, warmup, steps_per_epoch = train_config
    tx, _ = pplcnet_optimizer(
        model,
        learning_rate=base,
        epochs=epochs,
        warmup_epochs=warmup,
        steps_per_epoch=steps_per_epoch,
        weight_decay=coeff,
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for grads in grads_per_step:
        grad_tree = jax.tree_util.tree_map_with_path(
            lambda path, _, g=grads: g[tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path[:-1])],
            params,
        )
        updates, state = update(grad_tree, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    ours = flat(params)
    for role, path in roles.items():
        np.testing.assert_allclose(ours[path], paddle[role], rtol=1e-5, atol=1e-6, err_msg=role)
