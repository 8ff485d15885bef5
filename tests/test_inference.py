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
