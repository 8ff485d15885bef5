"""The inference entry point: unit-length features for any batch size, few compiled shapes."""

from __future__ import annotations

import numpy as np


def _tiny_vit():
    from flax import nnx

    from shitu.models.vit import build_clip_vit

    return build_clip_vit(
        5, rngs=nnx.Rngs(0), embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=32, remove_cls_token=True
    )


def test_any_batch_size_gives_unit_rows_and_few_compiles():
    from shitu.models.inference import Embedder

    embedder = Embedder(_tiny_vit(), buckets=(1, 4, 8))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(19, 32, 32, 3)).astype(np.float32)
    all_at_once = embedder(images)
    assert all_at_once.shape == (19, 512) and all_at_once.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(all_at_once, axis=1), 1.0, atol=1e-5)
    for n in (1, 2, 3, 5, 7):
        np.testing.assert_allclose(embedder(images[:n]), all_at_once[:n], rtol=1e-5, atol=1e-6)
    assert embedder.compiled_shapes() <= 3  # buckets 1, 4, 8, whatever sizes came in
    assert embedder.bucket_for(5) == 8


def test_matches_model_features_normalised():
    from shitu.models.inference import Embedder

    model = _tiny_vit()
    model.eval()
    images = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    raw = np.asarray(model(images))
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(Embedder(model)(images), expected, rtol=1e-5, atol=1e-6)


def test_to_device_keeps_the_weights_there_and_the_features():
    import jax

    from shitu.models.inference import Embedder

    embedder = Embedder(_tiny_vit(), buckets=(2,))
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    before = embedder(images)
    cpu = jax.devices("cpu")[-1]
    embedder.to_device(cpu)
    assert {leaf.devices().pop() for leaf in jax.tree.leaves(embedder._state)} == {cpu}
    np.testing.assert_allclose(embedder(images), before, rtol=1e-6, atol=1e-7)


def test_large_cpu_inputs_run_as_concurrent_cache_sized_chunks():
    from shitu.models.inference import CPU_CHUNK_PIXELS, Embedder

    model = _tiny_vit()
    images = np.random.default_rng(3).normal(size=(7, 32, 32, 3)).astype(np.float32)
    default = Embedder(model, buckets=(1, 2, 4, 8))
    assert default.cpu_chunk_pixels == CPU_CHUNK_PIXELS
    whole = default(images)  # 7 x 32 x 32 pixels is within CPU_CHUNK_PIXELS: one call, bucket 8
    assert default.chunk_size(32, 32) == 8 and default.compiled_shapes() == 1 and default._pool is None
    assert default.chunk_size(224, 224) == 2  # 2 x 224 x 224 <= 2**17 < 4 x 224 x 224
    # The tests' sizes never reach the default limit; a lower one cuts two 32 x 32 images per call.
    small = Embedder(model, buckets=(1, 2, 4, 8), cpu_chunk_pixels=2 * 32 * 32)
    assert small.chunk_size(32, 32) == 2
    assert small.chunk_size(64, 64) == 1  # nothing fits: the smallest bucket
    np.testing.assert_allclose(small(images), whole, rtol=1e-5, atol=1e-6)
    assert small.compiled_shapes() == 2  # chunks of 2, 2, 2 and 1
    assert small._pool is not None and small._pool._max_workers >= 1
    assert small(images[:0]).shape == (0, 0)
    never = Embedder(model, buckets=(1, 2, 4, 8), cpu_chunk_pixels=None)
    assert never.chunk_size(224, 224) == 8
