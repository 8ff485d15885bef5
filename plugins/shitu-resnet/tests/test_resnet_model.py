"""ResNet18_rec in-process: the network's shapes and modes, the recipe's pieces, and its registration."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]
WIDTH = 8
SIZE = 32
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def plugin():
    """The plugin package, imported from this source tree."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PLUGIN_DIR))
        yield importlib.import_module("shitu_resnet")


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    """8 normalised-looking images of 4 classes: each class a distinct colour plus noise."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), 2)
    colours = rng.normal(size=(NUM_CLASSES, 1, 1, 3))
    images = colours[labels] + 0.3 * rng.normal(size=(len(labels), SIZE, SIZE, 3))
    return images.astype(np.float32), labels.astype(np.int32)


def build(plugin, **arch):
    return plugin.RESNET18_REC.build(NUM_CLASSES, seed=0, **{"width": WIDTH, **arch})


def test_shapes_widths_and_finite_features(plugin, batch):
    from flax import nnx

    model = build(plugin)
    model.eval()
    images, labels = batch
    features = np.asarray(model(images))
    assert features.shape == (8, 512) and features.dtype == np.float32
    assert np.isfinite(features).all() and np.linalg.norm(features, axis=1).min() > 0
    logits = np.asarray(model.logits(features, labels))
    assert logits.shape == (8, NUM_CLASSES)
    assert model.backbone.stem.conv.kernel.shape == (7, 7, 3, WIDTH)
    assert [stage[0].conv1.conv.out_channels for stage in model.backbone.stages] == [8, 16, 32, 64]
    assert [len(stage) for stage in model.backbone.stages] == [2, 2, 2, 2]
    assert model.neck.fc.kernel.shape == (64, 512)
    assert model.head.weight.shape == (512, NUM_CLASSES)
    # `scale` (shitu passes Train.model_scale) multiplies the width: 16 × 0.5 builds the same shapes.
    halved = plugin.RESNET18_REC.build(NUM_CLASSES, seed=0, width=16, scale=0.5)
    shapes = jax_shapes(nnx.state(model, nnx.Param))
    assert jax_shapes(nnx.state(halved, nnx.Param)) == shapes


def jax_shapes(state) -> dict[str, tuple[int, ...]]:
    import jax

    return {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def test_the_published_size_has_resnet18s_parameter_count(plugin):
    from flax import nnx

    model = plugin.RESNET18_REC.build(1000, seed=0)
    counts = {
        part: sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(getattr(model, part), nnx.Param)))
        for part in ("backbone", "neck", "head")
    }
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its 512 → 1000 classifier.
    assert counts["backbone"] == 11_689_512 - 513_000
    assert counts["neck"] == 512 * 512 + 512 + 2 * 512
    assert counts["head"] == 512 * 1000


def test_train_mode_uses_batch_statistics_and_eval_mode_does_not(plugin, batch):
    from flax import nnx

    images, labels = batch
    model = build(plugin)
    model.eval()
    before = leaves(nnx.state(model, nnx.BatchStat))  # copies: a State holds the live variables
    alone = np.asarray(model(images[:2]))
    together = np.asarray(model(images))
    np.testing.assert_allclose(alone, together[:2], rtol=1e-5, atol=1e-5)  # eval rows do not see each other
    cosines = np.asarray(model.logits(together, labels))
    assert np.abs(cosines).max() <= 1.0 + 1e-6  # eval head: the cosines, no margin, no scale
    after_eval = leaves(nnx.state(model, nnx.BatchStat))
    assert all(np.array_equal(a, b) for a, b in zip(before, after_eval, strict=True))

    model.train()
    features = np.asarray(model(images))
    assert not np.allclose(features[:2], np.asarray(model(images[:2]))[:2], atol=1e-4)  # batch statistics
    after_train = leaves(nnx.state(model, nnx.BatchStat))
    assert not any(np.array_equal(a, b) for a, b in zip(before, after_train, strict=True))  # every BN updated
    trained_logits = np.asarray(model.logits(features, labels))
    assert np.abs(trained_logits).max() > 1.0  # training head: scaled by 30, margin on the label column


def leaves(state) -> list[np.ndarray]:
    import jax

    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state)]


def test_bad_width_is_a_shitu_error(plugin):
    from shitu.errors import ShituError

    with pytest.raises(ShituError, match="no channels"):
        plugin.RESNET18_REC.build(NUM_CLASSES, width=1, scale=0.25)


def test_parameter_groups_name_every_batchnorm_parameter_and_bias(plugin):
    from flax import nnx

    from shitu.models.spec import resolve

    model = build(plugin)
    no_decay, frozen = resolve(plugin.RECIPE.parameter_groups)(model)
    params = {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert no_decay <= params and frozen <= params
    assert frozen == {("neck", "feat_bn", "bias")}
    assert ("backbone", "stem", "bn", "scale") in no_decay and ("neck", "fc", "bias") in no_decay
    decayed = params - no_decay
    assert all(path[-1] in ("kernel", "weight") for path in decayed)
    assert ("head", "weight") in decayed and ("neck", "fc", "kernel") in decayed
    # 20 BatchNorms in the backbone (stem, 16 in the blocks, 3 shortcuts) + the neck's, 2 parameters each
    assert sum(1 for path in no_decay if path[-2] in ("bn", "feat_bn")) == 2 * 21
    assert len(decayed) == 20 + 2  # 20 convolution kernels, the neck's kernel, the head's weight


def test_train_transform_crops_flips_normalises_and_pickles(plugin):
    from shitu.models.spec import IMAGENET_MEAN, IMAGENET_STD, resolve

    transform = resolve(plugin.RECIPE.train_transform)(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    image = np.random.default_rng(1).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    out = transform(image, np.random.default_rng(7))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, transform(image, np.random.default_rng(7)))  # fixed by the generator
    assert not np.array_equal(out, transform(image, np.random.default_rng(8)))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(transform))(image, np.random.default_rng(7)), out)
    # normalised with the model's mean/std: a flat image maps to one known value per channel
    flat = np.full((40, 40, 3), 255, np.uint8)
    expected = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(transform(flat, np.random.default_rng(0))[0, 0], expected, rtol=1e-6)


def test_recipe_loss_terms_and_eval_loss(plugin, batch):
    from shitu.models.spec import resolve
    from shitu.train.losses import cross_entropy

    images, labels = batch
    model = build(plugin)
    loss = resolve(plugin.RECIPE.loss)
    model.eval()
    total, terms = loss(model, images, labels, train=False)
    assert set(terms) == {"loss", "CELoss"} and float(terms["loss"]) == float(total)
    logits = model.logits(model(images), labels)
    assert float(total) == pytest.approx(float(cross_entropy(logits, labels, 0.0)), rel=1e-6)
    model.train()
    smoothed, _ = loss(model, images, labels, train=True)
    assert np.isfinite(float(smoothed)) and float(smoothed) > 0


def test_the_recipe_loss_decreases_on_a_fixed_batch(plugin, batch):
    """A few optax SGD-momentum steps, with the recipe's groups (no decay, frozen), lower its loss."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from shitu.models.spec import resolve

    images, labels = (jnp.asarray(a) for a in batch)
    model = build(plugin)
    model.train()
    loss = resolve(plugin.RECIPE.loss)
    no_decay, frozen = resolve(plugin.RECIPE.parameter_groups)(model)

    def labelled(predicate):  # an optax mask: the tree it is given → True where predicate(parameter path)
        return lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: predicate(nnx_path(path)), tree)

    tx = optax.chain(
        optax.masked(optax.add_decayed_weights(plugin.RECIPE.weight_decay), labelled(lambda p: p not in no_decay)),
        optax.sgd(0.01, momentum=0.9),
        optax.masked(optax.set_to_zero(), labelled(lambda p: p in frozen)),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        (value, _), grads = nnx.value_and_grad(lambda m: loss(m, images, labels, train=True), has_aux=True)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer, images, labels)) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    assert float(jnp.abs(model.neck.feat_bn.bias[...]).max()) == 0.0  # frozen at its initial zeros


def nnx_path(key_path) -> tuple:
    import jax

    return tuple(
        entry.key if isinstance(entry, jax.tree_util.DictKey) else entry.idx
        for entry in key_path
        if isinstance(entry, jax.tree_util.DictKey | jax.tree_util.SequenceKey)
    )


def test_registered_through_the_plugin_host_with_its_config(plugin):
    from importlib import resources

    from shitu.config import load_config
    from shitu.models.spec import resolve
    from shitu.plugins import PluginHost

    host = PluginHost(load_entry_points=False)
    info = host.register(plugin, name="resnet")
    assert info.ok and info.models == ["ResNet18_rec"]
    spec = host.model("resnet18_rec")
    assert spec is plugin.RESNET18_REC and spec.embedding_size == 512 and spec.recipe.sampler == "shuffle"
    for reference in (spec.builder, spec.recipe.loss, spec.recipe.train_transform, spec.recipe.parameter_groups):
        assert callable(resolve(reference))
    package, _, relative = spec.config.partition(":")
    with resources.as_file(resources.files(package) / relative) as path:
        config = load_config(path)
    builtin = load_config("PP-ShiTuV2_rec")
    assert {s: sorted(config[s]) for s in config} == {s: sorted(builtin[s]) for s in builtin}  # the same schema
    assert config.get("Global.model") == "ResNet18_rec" and config.get("Train.sampler") == "shuffle"
    assert config.get("Train.input_size") == spec.input_size
