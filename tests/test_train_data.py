"""The training input pipeline: augmentations, samplers, relabelling, the Grain loader (resume, shards, workers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shitu.data.demo import demo_dataset_path
from shitu.errors import ShituError
from shitu.models import pplcnetv2_recipe, vit_recipe
from shitu.train import augment as A
from shitu.train.data import TrainLoader, read_train_samples
from shitu.train.sampler import PKSampler, ShuffleSampler

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
S = 32


def _smooth_image(height: int = 60, width: int = 80) -> np.ndarray:
    """A smooth RGB test image (gradients and a soft blob), so interpolation differences stay small."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    blob = 255 * np.exp(-(((x - width * 0.6) / (width * 0.2)) ** 2 + ((y - height * 0.4) / (height * 0.25)) ** 2))
    image = np.stack([255 * x / width, 255 * y / height, blob], axis=-1)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def demo_samples():
    return read_train_samples(demo_dataset_path())


RECIPES = {"pplcnet": pplcnetv2_recipe, "vit": vit_recipe}


def _loader(samples, recipe: str = "pplcnet", **overrides) -> TrainLoader:
    transform = RECIPES[recipe].train_transform(S, MEAN, STD)
    options = dict(transform=transform, input_size=S, batch_size=16, sample_per_id=4, seed=3)
    options.update(overrides)
    return TrainLoader(samples, **options)


def _batches_equal(left: list[dict], right: list[dict]) -> bool:
    return len(left) == len(right) and all(
        np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
        for a, b in zip(left, right, strict=True)
    )


# -- augmentations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["pplcnet", "vit"])
def test_transform_shape_dtype_range_and_determinism(recipe):
    transform = RECIPES[recipe].train_transform(S, MEAN, STD)
    image = _smooth_image()
    out = transform(image, np.random.default_rng(7))
    assert out.shape == (S, S, 3) and out.dtype == np.float32
    low = (0 - np.array(MEAN)) / np.array(STD)
    high = (1 - np.array(MEAN)) / np.array(STD)
    assert np.all(out >= low - 1e-5) and np.all(out <= high + 1e-5)
    assert np.array_equal(out, transform(image, np.random.default_rng(7)))
    others = [transform(image, np.random.default_rng(seed)) for seed in range(8, 14)]
    assert not all(np.array_equal(out, other) for other in others)
    raw = transform.augment(image, np.random.default_rng(7))
    assert raw.dtype == np.uint8 and raw.shape == (S, S, 3)
    np.testing.assert_array_equal(A.normalize_hwc(raw, MEAN, STD), out)


def test_normalize_is_bit_identical_to_eval_normalize():
    from shitu.data.transforms import normalize

    image = np.random.default_rng(0).integers(0, 256, (S, S + 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(A.normalize_hwc(image, MEAN, STD), normalize(image, MEAN, STD))


def test_pplcnet_steps_without_rotation_are_resize_flip_pad_crop():
    """With the rotation skipped (its draw ≥ 0.5), the output is the resized image shifted by the crop."""
    image = _smooth_image()
    resized = A.resize(image, S)
    padded = A.pad_constant(resized, pplcnetv2_recipe.PAD)
    assert padded.shape == (S + 20, S + 20, 3) and padded[:10].max() == 0 and padded[:, -10:].max() == 0
    assert np.array_equal(padded[10:-10, 10:-10], resized)
    rng = np.random.default_rng(0)
    flipped = A.random_hflip(resized, rng)
    assert np.array_equal(flipped, resized) or np.array_equal(flipped, resized[:, ::-1])


def test_crop_quirk_gives_s_minus_one_crops_at_the_expected_rate():
    padded = np.zeros((S + 20, S + 20, 3), np.uint8)
    rng = np.random.default_rng(1)
    shapes = np.array([A.rand_crop_v2(padded, S, rng).shape[:2] for _ in range(4000)])
    assert set(np.unique(shapes)) == {S - 1, S}
    # top, left ~ randint(0, 21) inclusive → the 22nd offset leaves S-1 rows: p = 1/22 per side
    short_rows = np.mean(shapes[:, 0] == S - 1)
    short_cols = np.mean(shapes[:, 1] == S - 1)
    sigma = np.sqrt((1 / 22) * (21 / 22) / 4000)
    assert abs(short_rows - 1 / 22) < 4 * sigma and abs(short_cols - 1 / 22) < 4 * sigma


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_rotation_matches_pillow_rotate(interpolation):
    """paddle.vision's RandomRotation calls PIL ``Image.rotate`` (about the centre, same size, fill 0); our
    cv2.warpAffine form must agree up to interpolation rounding, and exactly for a quarter turn."""
    image = _smooth_image(48, 48)
    quarter = A.rotate(image, 90.0, interpolation)
    np.testing.assert_array_equal(quarter, np.rot90(image))  # counter-clockwise, about the centre
    np.testing.assert_array_equal(A.rotate(image, 90.0, interpolation, backend="pil"), np.rot90(image))
    wide = _smooth_image(40, 56)
    ours = A.rotate(wide, 33.0, interpolation).astype(np.int16)
    pillow = A.rotate(wide, 33.0, interpolation, backend="pil").astype(np.int16)
    assert ours.shape == pillow.shape == wide.shape
    inside = A.rotate(np.full_like(wide, 255), 33.0, "nearest", backend="pil")[..., 0] == 255
    import cv2

    # away from the rotated border (bicubic reaches 2 px), the kernels' rounding differs by ≤ 2 grey levels
    inside = cv2.erode(inside.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    difference = np.abs(ours - pillow)[inside]
    assert inside.mean() > 0.5
    assert difference.mean() < 0.6 and difference.max() <= 2
    corner = (0, 0) if not inside[0, 0] else (-1, -1)
    assert ours[corner].tolist() == [0, 0, 0] == pillow[corner].tolist()


def test_rand_resized_crop_stays_inside_and_resizes():
    image = _smooth_image(30, 90)
    rng = np.random.default_rng(2)
    for _ in range(50):
        assert A.rand_resized_crop(image, S, rng).shape == (S, S, 3)


def test_rand_augment_policy_parsing_and_ops():
    config = A.parse_rand_augment("rand-m7-mstd0.5-inc1")
    assert (config.magnitude, config.num_ops, config.magnitude_std, config.increasing) == (7.0, 2, 0.5, True)
    assert len(config.op_names) == 15 and "PosterizeIncreasing" in config.op_names
    with pytest.raises(ValueError):
        A.parse_rand_augment("auto-m7")
    from PIL import Image

    image = _smooth_image(S, S)
    pil = Image.fromarray(image)
    ctx = A._OpContext(resample=Image.Resampling.BICUBIC, fill=(124, 116, 104))
    rng = np.random.default_rng(0)
    for name in config.op_names:
        out = np.asarray(A.apply_rand_augment_op(pil, name, 7.0, rng, ctx))
        assert out.shape == image.shape and out.dtype == np.uint8, name
    invert = np.asarray(A.apply_rand_augment_op(pil, "Invert", 7.0, rng, ctx))
    np.testing.assert_array_equal(invert, 255 - image)
    # level 7 → keep 4 - int(2.8) = 2 bits; solarize-add adds int(77) below 128
    posterized = np.asarray(A.apply_rand_augment_op(pil, "PosterizeIncreasing", 7.0, rng, ctx))
    np.testing.assert_array_equal(posterized, image & 0b11000000)
    added = np.asarray(A.apply_rand_augment_op(pil, "SolarizeAdd", 7.0, rng, ctx))
    np.testing.assert_array_equal(added, np.where(image < 128, np.minimum(255, image.astype(int) + 77), image))
    # a translation moves the content and fills with the ImageNet-mean bytes
    moved = np.asarray(A.apply_rand_augment_op(pil, "TranslateXRel", 10.0, np.random.default_rng(5), ctx))
    filled = np.all(moved == (124, 116, 104), axis=-1)
    assert 0.3 < filled.mean() < 0.6


def test_rand_augment_draws_two_ops_with_probability_one_half():
    """With magnitude_std 0 and Invert the only op, an image is inverted 0 times (p .25), once (p .5) or
    twice (p .25, back to the original)."""
    image = _smooth_image(8, 8)
    config = A.RandAugmentConfig(magnitude=5, num_ops=2, increasing=True)
    rng = np.random.default_rng(4)
    changed = 0
    runs = 2000
    from unittest import mock

    with mock.patch.object(A, "_INCREASING_OPS", ("Invert",)):
        for _ in range(runs):
            changed += not np.array_equal(A.rand_augment(image, rng, config), image)
    assert abs(changed / runs - 0.5) < 4 * np.sqrt(0.25 / runs)


# -- samplers ------------------------------------------------------------------------------------------


def test_pk_batches_have_p_ids_times_k(demo_samples):
    sampler = PKSampler(demo_samples.labels, 16, 4, seed=1)
    plan = sampler.epoch_batches(0)
    assert plan.shape == (int(np.ceil(120 / 16)), 16) == (len(sampler), 16)
    for batch in plan:
        labels = demo_samples.labels[batch].reshape(4, 4)
        assert np.all(labels == labels[:, :1]), "K consecutive rows per identity"
        assert len(set(labels[:, 0].tolist())) == 4, "P distinct identities"
        assert all(len(set(batch[i * 4 : (i + 1) * 4].tolist())) == 4 for i in range(4)), "no repeats with ≥K images"
    np.testing.assert_array_equal(plan, PKSampler(demo_samples.labels, 16, 4, seed=1).epoch_batches(0))
    assert not np.array_equal(plan, sampler.epoch_batches(1))
    assert not np.array_equal(plan, PKSampler(demo_samples.labels, 16, 4, seed=2).epoch_batches(0))


def test_pk_samples_with_replacement_when_an_id_has_fewer_than_k():
    labels = np.array([0, 1, 1, 1, 1, 2, 2, 2, 2])
    plan = PKSampler(labels, 8, 4, seed=0).epoch_batches(0)
    for batch in plan:
        for block in batch.reshape(2, 4):
            if labels[block[0]] == 0:
                assert block.tolist() == [0, 0, 0, 0]


def test_pk_identity_probabilities_follow_image_counts():
    counts = np.array([1, 2, 3, 4, 10])
    labels = np.repeat(np.arange(5), counts)
    sampler = PKSampler(labels, 2, 2, seed=0)  # P = 1: one identity per batch, drawn ∝ counts
    drawn = np.concatenate([labels[sampler.epoch_batches(e)[:, 0]] for e in range(300)])
    frequencies = np.bincount(drawn, minlength=5) / len(drawn)
    expected = counts / counts.sum()
    sigma = np.sqrt(expected * (1 - expected) / len(drawn))
    assert np.all(np.abs(frequencies - expected) < 4 * sigma), (frequencies, expected)
    uniform = PKSampler(labels, 2, 2, sample_method="id_avg_prob", seed=0)
    drawn = np.concatenate([labels[uniform.epoch_batches(e)[:, 0]] for e in range(300)])
    assert np.all(np.abs(np.bincount(drawn, minlength=5) / len(drawn) - 0.2) < 4 * np.sqrt(0.16 / len(drawn)))


def test_pk_validation_errors():
    labels = np.repeat(np.arange(3), 4)
    with pytest.raises(ShituError, match="multiple of"):
        PKSampler(labels, 10, 4)
    with pytest.raises(ShituError, match="#classes"):
        PKSampler(labels, 16, 4)
    with pytest.raises(ShituError, match="at least one"):
        PKSampler([], 8, 4)


def test_shuffle_sampler_permutes_and_drops_last():
    sampler = ShuffleSampler(10, 4, seed=0)
    batches = sampler.epoch_batches(0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert [len(b) for b in ShuffleSampler(10, 4, drop_last=True, seed=0).epoch_batches(0)] == [4, 4]


# -- samples and the loader ----------------------------------------------------------------------------


def test_read_train_samples_relabels_sorted_and_locates_errors(tmp_path):
    from PIL import Image

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(root / "images" / f"{name}.jpg")
    (root / "train.txt").write_text("images/a.jpg 30\nimages/b.jpg -2\nimages/c.jpg 30\n")
    samples = read_train_samples(root)
    assert samples.label_map == {-2: 0, 30: 1} and samples.num_classes == 2
    assert samples.labels.tolist() == [1, 0, 1] and samples.labels.dtype == np.int32
    assert samples.original_labels.tolist() == [30, -2, 30]
    assert samples.paths[1] == str(root / "images" / "b.jpg")
    (root / "train.txt").write_text("images/a.jpg 1\nimages/b.jpg x\n")
    with pytest.raises(ShituError) as caught:
        read_train_samples(root)
    assert caught.value.line == 2 and caught.value.path.endswith("train.txt")
    (root / "train.txt").write_text("")
    with pytest.raises(ShituError, match="no images"):
        read_train_samples(root)


def test_loader_validates_before_any_work(demo_samples):
    with pytest.raises(ShituError, match="multiple of"):
        _loader(demo_samples, batch_size=18)
    with pytest.raises(ShituError, match="#classes"):
        _loader(demo_samples, batch_size=84)  # 20 ids × 4 = 80 < 84
    with pytest.raises(ShituError, match="processes"):
        _loader(demo_samples, batch_size=16, shard_count=3)


def test_loader_batches_follow_the_plan(demo_samples):
    with _loader(demo_samples) as loader:
        assert loader.steps_per_epoch == 8
        batches = list(loader.epoch(0))
        plan = loader.epoch_plan(0)
    assert len(batches) == 8
    for batch, indices in zip(batches, plan, strict=True):
        assert batch["images"].shape == (16, S, S, 3) and batch["images"].dtype == np.float32
        assert batch["labels"].dtype == np.int32
        np.testing.assert_array_equal(batch["labels"], demo_samples.labels[indices])


def test_resume_yields_the_same_batches_as_a_full_epoch(demo_samples):
    with _loader(demo_samples) as loader:
        first = list(loader.epoch(0))
        second = list(loader.epoch(1))  # continues the running stream
        resumed = list(loader.epoch(0, start_step=5))  # restarts it
        again = list(loader.epoch(1))
    with _loader(demo_samples) as fresh:
        cold = list(fresh.epoch(1, start_step=3))  # a new process resuming mid-epoch
    assert _batches_equal(resumed, first[5:])
    assert _batches_equal(again, second) and _batches_equal(cold, second[3:])
    assert not np.array_equal(first[0]["images"], second[0]["images"])


def test_shards_concatenate_to_the_global_batch(demo_samples):
    with _loader(demo_samples) as whole:
        full = list(whole.epoch(2, start_step=6))
    parts = []
    for index in range(4):
        with _loader(demo_samples, shard_index=index, shard_count=4) as shard:
            parts.append(list(shard.epoch(2, start_step=6)))
    for step, batch in enumerate(full):
        assert all(part[step]["images"].shape[0] == 4 for part in parts)
        np.testing.assert_array_equal(np.concatenate([p[step]["images"] for p in parts]), batch["images"])
        np.testing.assert_array_equal(np.concatenate([p[step]["labels"] for p in parts]), batch["labels"])


def test_loader_state_round_trip(demo_samples):
    import json

    loader = _loader(demo_samples)
    state = json.loads(json.dumps(loader.state(3, 5)))
    assert loader.restore_position(state) == (3, 5)
    assert loader.restore_position(loader.state(3, 8)) == (4, 0)  # the end of epoch 3
    with pytest.raises(ShituError, match="batch_size"):
        _loader(demo_samples, batch_size=32).restore_position(state)
    with pytest.raises(ShituError, match="seed"):
        _loader(demo_samples, seed=4).restore_position(state)


def test_vit_recipe_with_shuffle_sampler(demo_samples):
    with _loader(demo_samples, recipe="vit", sampler="shuffle", batch_size=32, drop_last=True) as loader:
        assert loader.steps_per_epoch == 3
        batches = list(loader.epoch(0))
    assert [b["images"].shape for b in batches] == [(32, S, S, 3)] * 3
    seen = np.concatenate([b["labels"] for b in batches])
    assert len(seen) == 96 and len(set(seen.tolist())) > 10


def _broken_dataset(root: Path) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = []
    for label in range(3):
        for i in range(4):
            Image.new("RGB", (20, 16), (60 * label, 50 * i, 9)).save(root / "images" / f"{label}_{i}.jpg")
            lines.append(f"images/{label}_{i}.jpg {label}")
    (root / "images" / "1_2.jpg").write_bytes(b"not a jpeg")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_undecodable_image_names_the_file(tmp_path):
    samples = read_train_samples(_broken_dataset(tmp_path / "broken"))
    with _loader(samples, batch_size=12) as loader, pytest.raises(ShituError) as caught:
        list(loader.epoch(0))
    assert "1_2.jpg" in str(caught.value) and "train.txt:7" in str(caught.value)


def test_worker_processes_give_the_same_batches(demo_samples):
    """Two Grain worker processes: the same batches, in the same order, across an epoch boundary."""
    with _loader(demo_samples, batch_size=32) as inline:
        expected = list(inline.epoch(0, start_step=2)) + list(inline.epoch(1))
    with _loader(demo_samples, batch_size=32, num_workers=2) as workers:
        got = list(workers.epoch(0, start_step=2)) + list(workers.epoch(1))
    assert _batches_equal(got, expected) and len(got) == 6
