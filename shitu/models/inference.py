"""The inference entry point: images in, L2-normalised float32 [B, 512] features out, for any batch size.

Batches are padded up to a few bucket sizes so XLA compiles a handful of shapes, not one per batch size;
larger inputs are cut into chunks of the largest bucket. On a CPU, large images are cut into smaller chunks
(:data:`CPU_CHUNK_PIXELS`) run two at a time (:meth:`Embedder.chunk_size`). The model runs in eval mode under
``jax.jit`` (split into graph and state once, so there is no per-call NNX overhead). JAX's persistent compilation
cache is the command line's to turn on (:func:`shitu.runtime.configure_jax`), not this library's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
#: On a CPU, the most input pixels (images x height x width) one call of the compiled model takes; a larger
#: input runs as chunks of the largest bucket within it, :data:`CPU_CONCURRENT_CHUNKS` at a time. XLA:CPU keeps
#: a small chunk's activations in cache and leaves cores idle in each call's narrow layers, which a second
#: call in flight fills. PP-ShiTuV2_rec fp32, 2-core AVX-512 EPYC, jax 0.10.2, images/s against one call per
#: batch: 224 px batch 32 1.3-1.45x (chunks of 2), batch 8 1.26x; 128 px batch 32 1.3-1.5x (chunks of 8);
#: at 64 px no split was faster (a batch of 32 is one chunk), so small inputs, the tests' included, run as before.
CPU_CHUNK_PIXELS = 2**17
#: Chunks in flight at once on a CPU (capped by the cores the process may use).
CPU_CONCURRENT_CHUNKS = 2


def l2_normalize(features: Any) -> Any:
    """Row-wise L2 normalisation as PaddleX's NormalizeFeatures (a zero row stays zero instead of NaN)."""
    import jax.numpy as jnp

    norm = jnp.sqrt(jnp.sum(features * features, axis=1, keepdims=True))
    return features / jnp.where(norm > 0, norm, 1.0)


def _signature(tree: Any) -> tuple[Any, list[tuple[Any, Any]]]:
    """A state's tree structure and its leaves' shapes and dtypes (what a compiled forward depends on)."""
    import jax

    return jax.tree.structure(tree), [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree)]


class Embedder:
    """Computes normalised features with ``model`` (an NNX recognition module; put in eval mode here).

    ``compute_dtype`` (e.g. ``jnp.bfloat16``) runs the network with its floating-point parameters and the
    images cast to that type; the features are normalised and returned in float32 either way.

    ``inference_form``: run :func:`shitu.export.convert.inference_form` of ``model`` (for PP-ShiTuV2_rec the
    BatchNorm-folded form: rep branches merged, every BatchNorm, the dropout scale and the BNNeck folded
    into the convolutions) instead of ``model`` as given. Same features to float32 rounding (~3e-7), fewer
    passes over the activations: at 224 px on a 2-core AVX-512 EPYC (jax 0.10.2) the fp32 forward of a
    training-form model (three depthwise branches per rep block) went from 42 to 32 ms at batch 1 and from
    1.82 to 1.41 s at batch 32 (1.3×, same process, interleaved). A deploy-form model (branches already
    merged, e.g. imported from a Paddle inference export) gains little: XLA fuses an eval BatchNorm into the
    neighbouring loop anyway.
    :meth:`set_state` still takes states of ``model`` itself and derives the inference form from them.

    ``cpu_chunk_pixels``: on a CPU, the most pixels (images x height x width) per compiled call; larger inputs
    run as chunks of the largest bucket within it, :data:`CPU_CONCURRENT_CHUNKS` calls in flight (default
    :data:`CPU_CHUNK_PIXELS`; None: one call per largest bucket, as on a GPU).
    """

    def __init__(
        self,
        model: Any,
        *,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        compute_dtype: Any = None,
        inference_form: bool = False,
        cpu_chunk_pixels: int | None = CPU_CHUNK_PIXELS,
    ) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        if not buckets or any(b < 1 for b in buckets):
            raise ValueError("buckets must be positive batch sizes")
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.cpu_chunk_pixels = cpu_chunk_pixels
        self._compute_dtype = compute_dtype
        model.eval()
        network = model
        if inference_form:
            from shitu.export.convert import inference_form as derive

            network = derive(model)
        # The given model's structure, when the network run is derived from it (set_state's input).
        self._source_graphdef = nnx.graphdef(model) if network is not model else None
        self._source_signature = _signature(nnx.state(model)) if network is not model else None
        self._graphdef, state = nnx.split(network)
        self._pool: Any = None  # a thread pool for concurrent chunks, made on first use
        self._state = self._cast(state)
        treedef = self._treedef

        def forward(leaves: Any, images: Any) -> Any:
            if compute_dtype is not None:
                images = images.astype(compute_dtype)
            features = nnx.merge(self._graphdef, jax.tree.unflatten(treedef, leaves))(images)
            return l2_normalize(features.astype(jnp.float32))

        self._forward = jax.jit(forward)

    @property
    def _state(self) -> Any:
        """The weights the network runs with (an ``nnx.State``)."""
        return self.__state

    @_state.setter
    def _state(self, state: Any) -> None:
        import jax

        self.__state = state
        # The compiled call takes the state's leaves as a flat list: parsing the nnx.State's ~100 Variables
        # cost about 0.45 ms more per call (PP-ShiTuV2_rec, 0.9 against 0.46 ms to dispatch; ~3% at batch 1).
        self._leaves, self._treedef = jax.tree.flatten(state)
        present = [leaf for leaf in self._leaves[:1] if hasattr(leaf, "devices") and not leaf.is_deleted()]
        self._on_cpu = all(device.platform == "cpu" for leaf in present for device in leaf.devices())

    def _cast(self, state: Any) -> Any:
        """``state`` with its floating-point leaves in the compute dtype (unchanged without one)."""
        if self._compute_dtype is None:
            return state
        import jax
        import jax.numpy as jnp

        def cast(leaf: Any) -> Any:
            return leaf.astype(self._compute_dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

        return jax.tree.map(cast, state)

    def set_state(self, state: Any) -> None:
        """Embed with new weights from now on, without recompiling: ``state`` is ``nnx.state(m)`` of a model
        ``m`` of the same architecture (same structure, shapes and dtypes; e.g. a copy of the model being
        trained, put in eval mode), as training's per-epoch evaluation needs. ValueError if it differs.
        With ``inference_form`` the form run is derived from ``state`` (``m`` is not changed)."""
        from flax import nnx

        if self._source_graphdef is not None:
            if _signature(state) != self._source_signature:
                raise ValueError("set_state: the new state does not match the model's structure, shapes and dtypes")
            import jax

            from shitu.export.convert import inference_form

            source = nnx.merge(self._source_graphdef, state, copy=True)
            # Leaves the folding passes through unchanged are the caller's own arrays; training donates those
            # to its next step, so keep copies, never references that may be deleted under us.
            derived = jax.tree.map(lambda leaf: leaf.copy(), self._cast(nnx.state(inference_form(source))))

            def devices(tree: Any) -> set[Any]:
                return {device for leaf in jax.tree.leaves(tree) if not leaf.is_deleted() for device in leaf.devices()}

            # Keep the weights where they were (the derived copy is on the default device); moving them when
            # they already are there would commit them and cost a recompilation.
            before = devices(self._state)
            if len(before) == 1 and devices(derived) != before:
                derived = jax.device_put(derived, before.pop())
            self._state = derived
            return
        if _signature(state) != _signature(self._state):
            raise ValueError("set_state: the new state does not match the model's structure, shapes and dtypes")
        self._state = state

    def to_device(self, device: Any) -> None:
        """Keep the weights on ``device`` (a ``jax.Device``): later calls compute there, whatever JAX's default
        device is (e.g. the CPU of a machine whose default is a GPU)."""
        import jax

        self._state = jax.device_put(self._state, device)

    def bucket_for(self, n: int) -> int:
        """The batch size an input of ``n`` images is padded to (n ≤ the largest bucket)."""
        return next(b for b in self.buckets if b >= n)

    def chunk_size(self, height: int, width: int) -> int:
        """The most images one compiled call takes at ``height`` x ``width``: the largest bucket, or on a CPU the
        largest bucket within ``cpu_chunk_pixels`` (at least the smallest bucket; None: the largest bucket)."""
        if not self._on_cpu or self.cpu_chunk_pixels is None:
            return self.buckets[-1]
        fitting = [b for b in self.buckets if b * height * width <= self.cpu_chunk_pixels]
        return fitting[-1] if fitting else self.buckets[0]

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        """One compiled call on ``chunk``, padded up to its bucket; the padding's rows are dropped again."""
        count, size = len(chunk), self.bucket_for(len(chunk))
        if size != count:
            chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]), np.float32)])
        return np.asarray(self._forward(self._leaves, chunk))[:count]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``images``: float32 [N, H, W, 3], preprocessed. Returns float32 [N, embedding] unit rows."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape [N, H, W, 3], got {list(images.shape)}")
        step = self.chunk_size(images.shape[1], images.shape[2])
        chunks = [images[start : start + step] for start in range(0, len(images), step)]
        if not chunks:
            return np.zeros((0, 0), np.float32)
        if len(chunks) > 1 and step < self.buckets[-1]:
            # Chunks cut for the cache (cpu_chunk_pixels) run concurrently: XLA releases the GIL while it computes.
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                from shitu.export.backends import cpu_threads

                workers = max(1, min(CPU_CONCURRENT_CHUNKS, cpu_threads()))
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="shitu-embed")
            parts = list(self._pool.map(self._run, chunks))
        else:
            parts = [self._run(chunk) for chunk in chunks]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def compiled_shapes(self) -> int:
        """How many input shapes have been compiled so far (for tests and diagnostics)."""
        return self._forward._cache_size()
