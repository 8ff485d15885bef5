"""The compiled training step: one ``jax.jit`` function of the whole training state, data-parallel over a mesh.

The model is split once into its graph and its state (NNX's functional form): parameters (``nnx.Param``),
BatchNorm running statistics (``nnx.BatchStat``) and RNG streams. The step is a pure function of
``state = {"params", "batch_stats", "opt_state"}``, the batch and the iteration number, compiled once, with
the state buffers donated (updated in place, no copy of the model per step).

Parallelism: a one-axis mesh (``"data"``) over the devices; the batch is sharded on its first axis, the state
replicated. The loss is a function of the *global* batch (the PK triplet loss mines over all of it), and
BatchNorm normalises with the global batch statistics (synchronised BatchNorm), so the same global batch
gives the same update on 1 or N devices: XLA partitions the computation and inserts the all-reduces.

Randomness (dropout) is not carried in the state: each step's keys are ``fold_in(key(seed), iteration)``
(one more ``fold_in`` per RNG stream), so a resumed run draws exactly what an uninterrupted one did, and
nothing random needs checkpointing. (JAX's partitionable Threefry makes the draws independent of sharding.)

Precision: a :class:`~shitu.train.precision.PrecisionPolicy` (``Train.precision``) casts the parameters and the
images at the top of the differentiated function; the state (master weights, optimizer state, BatchNorm
statistics) stays float32 whatever the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

STATE_KEYS = ("params", "batch_stats", "opt_state")


@dataclass
class CompiledInfo:
    """What compiling the step cost."""

    seconds: float
    devices: int
    reused: bool = False  # compiled by an earlier run in this process


class TrainStep:
    """Owns the split model and the compiled step.

    ``loss_fn(model, images, labels) -> (total, terms)`` is called on the merged model in training mode;
    ``tx`` is the optax transformation, ``schedule(count)`` the learning rate of optimizer step ``count``;
    ``precision`` (``fp32`` or ``bf16``, see :mod:`shitu.train.precision`) how the forward and backward compute.
    """

    def __init__(
        self,
        model: Any,
        *,
        loss_fn: Callable[[Any, Any, Any], tuple[Any, dict[str, Any]]],
        tx: Any,
        schedule: Callable[[Any], Any],
        devices: Sequence[Any],
        seed: int,
        precision: str = "fp32",
    ) -> None:
        import jax
        import numpy as np
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from shitu.train.precision import PrecisionPolicy

        model.train()
        # Only the graph and the RNG/other templates are kept: the state is always passed in.
        self.graphdef, _, _, self._rng_keys, self._rng_counts, self._other = nnx.split(
            model, nnx.Param, nnx.BatchStat, nnx.RngKey, nnx.RngCount, ...
        )
        self.loss_fn = loss_fn
        self.tx = tx
        self.schedule = schedule
        self.seed = int(seed)
        self.policy = PrecisionPolicy(precision)
        self.mesh = Mesh(np.asarray(list(devices)), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self._jitted = jax.jit(
            self._step,
            in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
        )
        self._compiled: Any = None
        self._compiled_shape: tuple[int, ...] | None = None

    @property
    def device_count(self) -> int:
        return int(self.mesh.devices.size)

    # -- state --------------------------------------------------------------------------------------
    def initial_state(self, model: Any) -> dict[str, Any]:
        """The training state of ``model`` (built like the one given at construction: same structure) with a
        fresh optimizer state, replicated over the mesh. Its buffers are donated to the first step."""
        import jax
        from flax import nnx

        params, batch_stats = nnx.state(model, nnx.Param, nnx.BatchStat)
        state = {"params": params, "batch_stats": batch_stats, "opt_state": self.tx.init(params)}
        return jax.device_put(state, self.replicated)

    def place(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` (host or device arrays) replicated over the mesh."""
        import jax

        return jax.device_put(state, self.replicated)

    def merged_model(self, state: dict[str, Any]) -> Any:
        """A new NNX model (training mode) holding ``state``'s parameters and statistics (arrays shared)."""
        from flax import nnx

        return nnx.merge(
            self.graphdef, state["params"], state["batch_stats"], self._rng_keys, self._rng_counts, self._other
        )

    def shard_batch(self, images: Any, labels: Any) -> tuple[Any, Any]:
        """Global arrays from this process's rows of the batch (all of it in a one-process run)."""
        import jax

        return (
            jax.make_array_from_process_local_data(self.batch_sharding, images),
            jax.make_array_from_process_local_data(self.batch_sharding, labels),
        )

    # -- the step -----------------------------------------------------------------------------------
    def _fresh_rngs(self, iteration: Any) -> tuple[Any, Any]:
        import jax
        import jax.numpy as jnp

        base = jax.random.fold_in(jax.random.key(self.seed), iteration)
        leaves, treedef = jax.tree.flatten(self._rng_keys)
        keys = []
        for index, leaf in enumerate(leaves):
            key = jax.random.fold_in(base, index)
            keys.append(key if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else jax.random.key_data(key))
        counts = jax.tree.map(jnp.zeros_like, self._rng_counts)
        return jax.tree.unflatten(treedef, keys), counts

    def _step(self, state: dict[str, Any], images: Any, labels: Any, iteration: Any) -> tuple[Any, Any]:
        import jax
        import optax
        from flax import nnx

        rng_keys, rng_counts = self._fresh_rngs(iteration)
        policy = self.policy

        def loss_of(params: Any, batch_stats: Any, keys: Any, counts: Any) -> tuple[Any, Any]:
            # Under bf16 the float32 master weights are cast here, so their gradients come back as float32.
            compute_params = policy.cast_to_compute(params)
            model = nnx.merge(self.graphdef, compute_params, batch_stats, keys, counts, self._other, copy=True)
            policy.apply_to_layers(model)
            total, terms = policy.to_float32(self.loss_fn(model, policy.cast_to_compute(images), labels))
            new_stats = policy.cast_like(nnx.state(model, nnx.BatchStat), batch_stats)
            return total, (terms, new_stats)

        (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"], state["batch_stats"], rng_keys, rng_counts
        )
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(terms)
        metrics["lr"] = self.schedule(iteration)
        return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, metrics

    def compile(self, state: dict[str, Any], batch_shape: tuple[int, ...]) -> CompiledInfo:
        """Compile ahead of the first step (so its cost is measured apart) for images of ``batch_shape``."""
        import time

        import jax
        import jax.numpy as jnp

        if self._compiled is not None and self._compiled_shape == tuple(batch_shape):
            return CompiledInfo(seconds=0.0, devices=self.device_count, reused=True)
        start = time.perf_counter()
        images = jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=self.batch_sharding)
        labels = jax.ShapeDtypeStruct(batch_shape[:1], jnp.int32, sharding=self.batch_sharding)
        iteration = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        self._compiled = self._jitted.lower(abstract, images, labels, iteration).compile()
        self._compiled_shape = tuple(batch_shape)
        return CompiledInfo(seconds=time.perf_counter() - start, devices=self.device_count)

    def __call__(self, state: dict[str, Any], images: Any, labels: Any, iteration: int) -> tuple[Any, Any]:
        """One optimizer step on a sharded batch; ``state``'s buffers are donated (do not reuse them)."""
        import jax
        import jax.numpy as jnp

        it = jax.device_put(jnp.asarray(iteration, jnp.int32), self.replicated)
        function = self._compiled if self._compiled is not None else self._jitted
        return function(state, images, labels, it)
