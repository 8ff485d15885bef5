"""bf16 mixed-precision training (``Train.precision``): the policy, one step of each built-in recipe against
fp32, a bf16 run stopped and resumed, and the refusals. Tiny: 32 px, width 0.25 or a 2-block ViT, batches of 8.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from shitu.errors import ShituError
from shitu.train.compiled import CompiledSteps

COMPILED = CompiledSteps()
TINY = {
    "Train.model_scale": 0.25,
    "Train.input_size": 32,
    "Train.batch_size": 8,
    "Train.epochs_iters": 2,
    "Train.warmup_steps": 1,
    "Train.learning_rate": 0.01,
    "Train.eval_interval": 2,
    "Evaluate.batch_size": 32,
    "Global.device": "cpu",
    "Train.pretrain_weight_path": None,
    "Train.precision": "bf16",
}
TINY_CLI = [arg for key, value in TINY.items() for arg in ("-o", f"{key}={'null' if value is None else value}")]


def _tiny_rec():
    from flax import nnx

    from shitu.models.pplcnetv2 import build_pp_shituv2_rec

    return build_pp_shituv2_rec(4, rngs=nnx.Rngs(0), scale=0.25)


def _tiny_vit():
    from flax import nnx

    from shitu.models.vit import build_clip_vit

    return build_clip_vit(
        4, rngs=nnx.Rngs(0), embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, remove_cls_token=True
    )


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 32, 32, 3)).astype(np.float32), np.repeat(np.arange(2), 4).astype(np.int32)


# ------------------------------------------------------------------------------------------------- the policy


def test_unknown_precision_is_refused_in_one_line():
    from shitu.train.precision import PrecisionPolicy

    with pytest.raises(ShituError) as info:
        PrecisionPolicy("fp16")
    assert str(info.value).count("\n") == 0
    assert "Train.precision" in str(info.value) and "fp32, bf16" in str(info.value) and "'fp16'" in str(info.value)


def test_policy_casts_floats_and_keeps_flax_normalisation_in_float32():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from shitu.train.precision import PrecisionPolicy

    policy = PrecisionPolicy("bf16")
    tree = {"w": jnp.ones((2, 2), jnp.float32), "step": jnp.zeros((), jnp.int32)}
    cast = policy.cast_to_compute(tree)
    assert (cast["w"].dtype, cast["step"].dtype) == (jnp.bfloat16, jnp.int32)
    assert PrecisionPolicy("fp32").cast_to_compute(tree) is tree
    assert policy.cast_like(cast, tree)["w"].dtype == jnp.float32

    class Block(nnx.Module):
        def __init__(self) -> None:
            self.linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.bn(self.linear(x))

    block, twin = Block(), Block()
    block.train()
    twin.train()
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (16, 4)), jnp.float32)
    reference = twin(x)
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    mixed = policy.apply_to_layers(nnx.merge(graphdef, policy.cast_to_compute(params), rest, copy=True))
    assert mixed.linear.dtype == jnp.bfloat16 and mixed.bn.dtype == jnp.bfloat16
    y = mixed(policy.cast_to_compute(x))
    assert y.dtype == jnp.bfloat16  # handed on in bf16 ...
    stats = nnx.state(mixed, nnx.BatchStat)
    assert {leaf.dtype for leaf in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}  # ... statistics float32
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(reference), atol=0.05)
    np.testing.assert_allclose(np.asarray(mixed.bn.mean[...]), np.asarray(twin.bn.mean[...]), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("build", [_tiny_rec, _tiny_vit], ids=["pplcnetv2", "vit"])
def test_bf16_eval_features_match_fp32(build):
    """With fixed statistics (eval mode) the bf16 forward gives the fp32 features to bf16 rounding."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from shitu.train.precision import PrecisionPolicy

    model = build()
    model.eval()
    images, _ = _batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def features_in(precision: str) -> np.ndarray:
        policy = PrecisionPolicy(precision)

        @jax.jit
        def forward(params, rest, images):
            mixed = policy.apply_to_layers(nnx.merge(graphdef, policy.cast_to_compute(params), rest, copy=True))
            return mixed(policy.cast_to_compute(images)).astype(jnp.float32)

        return np.asarray(forward(params, rest, jnp.asarray(images)))

    features, reference = features_in("bf16"), features_in("fp32")
    cosine = np.sum(features * reference, 1) / np.linalg.norm(features, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.999


# ------------------------------------------------------------------------------------------------ one step


@pytest.mark.parametrize("recipe", ["pplcnetv2", "vit"])
def test_one_bf16_step_against_fp32(recipe):
    """Same model, batch and dropout keys: the bf16 step computes in bf16, its loss is finite and close to fp32's,
    and the whole state (weights, optimizer, BatchNorm statistics) stays float32.

    PP-LCNetV2's training-mode BatchNorm over 8 images at 1-4 px in the last stages amplifies any perturbation
    of a randomly initialised network (a 0.3% change of the fp32 inputs moves its features as much as bf16
    does), so there the CE term is compared closely and the triplet term, a min/max over those features, loosely.
    """
    import jax
    import jax.numpy as jnp

    from shitu.models import pplcnetv2_recipe, vit_recipe
    from shitu.train.optim import make_optimizer
    from shitu.train.step import TrainStep

    build, loss = (_tiny_rec, pplcnetv2_recipe.loss) if recipe == "pplcnetv2" else (_tiny_vit, vit_recipe.loss)
    images, labels = _batch()
    results = {}
    for precision in ("fp32", "bf16"):
        model = build()
        tx, schedule = make_optimizer(model, learning_rate=0.01, epochs=2, warmup_epochs=0, steps_per_epoch=2)
        owner = TrainStep(
            model,
            loss_fn=partial(loss, train=True),
            tx=tx,
            schedule=schedule,
            devices=jax.devices()[:1],
            seed=0,
            precision=precision,
        )
        state = owner.initial_state(model)
        before = jax.device_get(state["params"])
        sharded = owner.shard_batch(images, labels)
        hlo = owner._jitted.lower(state, *sharded, jnp.int32(0)).as_text()
        state, metrics = owner(state, *sharded, 0)
        results[precision] = (jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()})
        assert ("bf16" in hlo) == (precision == "bf16")
        after = jax.device_get(state["params"])
        assert any(
            not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )

    state16, metrics16 = results["bf16"]
    _, metrics32 = results["fp32"]
    assert {leaf.dtype for leaf in jax.tree.leaves(state16) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
        np.dtype(np.float32)
    }
    assert all(np.isfinite(v) for v in metrics16.values())
    if recipe == "vit":
        assert metrics16["loss"] == pytest.approx(metrics32["loss"], rel=5e-3)
    else:
        assert metrics16["CELoss"] == pytest.approx(metrics32["CELoss"], rel=2e-2)
        assert metrics16["loss"] == pytest.approx(metrics32["loss"], rel=0.25)


def test_a_third_party_model_and_loss_train_in_bf16_unchanged():
    """A plugin's own Flax model and loss, written with no thought of precision, train under the bf16 policy."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from shitu.train.optim import make_optimizer
    from shitu.train.step import TrainStep

    class Plain(nnx.Module):
        def __init__(self) -> None:
            rngs = nnx.Rngs(0)
            self.conv = nnx.Conv(3, 8, (3, 3), strides=(2, 2), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.fc = nnx.Linear(8, 16, rngs=rngs)
            self.head = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc(jnp.mean(jax.nn.relu(self.bn(self.conv(x))), axis=(1, 2)))

        def logits(self, features, labels=None):
            return self.head(features)

    def plain_loss(model, images, labels):
        logits = model.logits(model(images))
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return ce, {"loss": ce}

    images, labels = _batch()
    losses = {}
    for precision in ("fp32", "bf16"):
        model = Plain()
        tx, schedule = make_optimizer(model, learning_rate=0.1, epochs=1, warmup_epochs=0, steps_per_epoch=3)
        owner = TrainStep(
            model, loss_fn=plain_loss, tx=tx, schedule=schedule, devices=jax.devices()[:1], seed=0, precision=precision
        )
        state = owner.initial_state(model)
        losses[precision] = []
        for step in range(3):
            state, metrics = owner(state, *owner.shard_batch(images, labels), step)
            losses[precision].append(float(metrics["loss"]))
        dtypes = {
            leaf.dtype for leaf in jax.tree.leaves(jax.device_get(state)) if jnp.issubdtype(leaf.dtype, jnp.floating)
        }
        assert dtypes == {np.dtype(np.float32)}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["bf16"][-1] < losses["bf16"][0]  # it learns


# ------------------------------------------------------------------------------------------ a bf16 training run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The demo set cut to 4 classes, 4 training images each (2 iterations of 8 per epoch)."""
    from shitu.data.demo import demo_dataset_path
    from shitu.runtime import configure_jax

    configure_jax()
    root = tmp_path_factory.mktemp("precision") / "grocery4"
    shutil.copytree(demo_dataset_path(), root)
    for split in ("train", "gallery", "query"):
        kept, seen = [], {}
        for line in (root / f"{split}.txt").read_text().splitlines():
            label = int(line.rsplit(" ", 1)[1])
            seen[label] = seen.get(label, 0) + 1
            if label < 4 and not (split == "train" and seen[label] > 4):
                kept.append(line)
        (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in kept))
    return root


def _params(bundle: Path) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    from shitu.models.bundle import load_bundle

    state = nnx.state(load_bundle(bundle).model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_bf16_run_records_its_precision_and_resumes_exactly(dataset, tmp_path, cli):
    from shitu.config import load_config
    from shitu.train.trainer import TrainingInterrupted, train

    config = load_config("PP-ShiTuV2_rec", TINY)
    straight = train(config, dataset_dir=dataset, output=tmp_path / "straight", compiled=COMPILED)
    assert all(np.isfinite(row["loss"]) for row in straight.history)
    doc = json.loads((tmp_path / "straight" / "train_result.json").read_text())
    assert doc["precision"] == "bf16"
    assert "precision: bf16" in (tmp_path / "straight" / "config.yaml").read_text()
    assert "precision bf16" in (tmp_path / "straight" / "train.log").read_text()
    weights = _params(straight.latest_model)
    assert {a.dtype for a in weights.values()} == {np.dtype(np.float32)}  # saved weights are float32

    output = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        train(config, dataset_dir=dataset, output=output, max_steps=3, compiled=COMPILED)
    with pytest.raises(ShituError, match=r"Train\.precision is 'bf16' in the run, 'fp32' now"):
        train(None, output=output, resume=True, overrides={"Train.precision": "fp32"}, compiled=COMPILED)
    resumed = train(None, output=output, resume=True, compiled=COMPILED)
    resumed_weights = _params(resumed.latest_model)
    assert max(float(np.max(np.abs(resumed_weights[k] - weights[k]))) for k in weights) <= 1e-6
    assert [row["loss"] for row in resumed.history] == pytest.approx([row["loss"] for row in straight.history])

    done = cli("train", "--dataset", dataset, "--output", tmp_path / "bad", *TINY_CLI, "-o", "Train.precision=fp16")
    assert done.code == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "Train.precision" in done.stderr and "fp16" in done.stderr
    assert not (tmp_path / "bad").exists()
