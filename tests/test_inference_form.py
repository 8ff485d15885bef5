"""The JAX path's fast forms: the model's inference form (BatchNorm folded) and bf16 products."""

from __future__ import annotations

import numpy as np
import pytest


def _shitu_rec(seed: int):
    """A small PP-ShiTuV2_rec in eval mode with non-trivial BatchNorm statistics (so folding them matters)."""
    import jax.numpy as jnp
    from flax import nnx

    from shitu.models.pplcnetv2 import build_pp_shituv2_rec

    model = build_pp_shituv2_rec(3, rngs=nnx.Rngs(seed), scale=0.5, embedding_size=64)
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            size = node.mean.shape[0]
            node.mean[...] = jnp.asarray(rng.normal(0.0, 0.2, size), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, size), jnp.float32)
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, size), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(0.0, 0.2, size), jnp.float32)
    model.eval()
    return model


def test_inference_form_gives_the_same_features_and_takes_the_given_models_states():
    from flax import nnx

    from shitu.models.inference import Embedder

    images = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
    first, second = _shitu_rec(0), _shitu_rec(1)
    folded = Embedder(first, buckets=(4,), inference_form=True)
    np.testing.assert_allclose(folded(images), Embedder(first, buckets=(4,))(images), atol=1e-5)
    expected = Embedder(second, buckets=(4,))(images)
    assert np.max(np.abs(folded(images) - expected)) > 1e-3
    folded.set_state(nnx.state(second))  # the unfolded model's state: the folded form is derived from it
    np.testing.assert_allclose(folded(images), expected, atol=1e-5)
    assert folded.compiled_shapes() == 1
    assert second.neck is not None  # the given model is left as it was
    with pytest.raises(ValueError, match="does not match"):
        folded.set_state(nnx.state(second.inference_form()))  # a folded state is not the given model's


def test_bf16_products_keep_float32_activations_and_stay_close():
    import jax
    import jax.numpy as jnp

    from shitu.models.inference import Embedder
    from shitu.models.layers import conv2d, use_bf16_products

    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 16)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(4).normal(size=(1, 1, 16, 8)), jnp.float32)
    exact = conv2d(x, kernel)
    rounded = conv2d(x, kernel, operand_dtype=jnp.bfloat16)
    assert rounded.dtype == jnp.float32
    assert 0 < float(jnp.abs(rounded - exact).max()) < 0.1
    # the dot multiplies bf16 operands into f32 (what XLA:CPU runs as one bf16 kernel), not bf16 → f32 upcasts
    hlo = jax.jit(lambda a, k: conv2d(a, k, operand_dtype=jnp.bfloat16)).lower(x, kernel).as_text()
    dot = next(line for line in hlo.splitlines() if "dot_general" in line)
    assert "tensor<16x8xbf16>) -> tensor<2x8x8x8xf32>" in dot

    model = _shitu_rec(0)
    images = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
    expected = Embedder(model, buckets=(2,))(images)
    got = Embedder(use_bf16_products(model.inference_form()), buckets=(2,))(images)
    assert np.abs(got - expected).max() > 0
    assert np.min(np.sum(got * expected, axis=1)) > 0.99
