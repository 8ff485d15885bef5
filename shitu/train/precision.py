"""Mixed-precision training: ``Train.precision`` ``fp32`` (default) or ``bf16``.

A :class:`PrecisionPolicy` is applied by the training step around the recipe's loss, so a model plugin's recipe
does not need to know about it:

- master weights, optimizer state and BatchNorm running statistics stay float32; the checkpoints and bundles
  hold float32;
- at the top of the differentiated function the floating-point parameters and the images are cast to the
  compute dtype (bfloat16), so matmuls and convolutions run in bf16 forward and backward; the gradients come
  back through the cast as float32;
- Flax's own layers are switched to compute in that dtype (their ``dtype`` attribute): their normalisation
  layers (BatchNorm, LayerNorm, ...) still compute the statistics and the normalisation in float32 and only hand
  their output on in bf16;
- the loss and its terms are returned in float32 (the built-in losses compute softmax, the feature
  normalisation and the triplet similarities in float32 anyway, see :mod:`shitu.train.losses`).

bfloat16 has float32's exponent range, so no loss scaling is needed (unlike float16).

Written here rather than taken from a library: ``jmp`` (DeepMind's mixed-precision policies) casts pytrees, the
trivial part, and knows nothing of Flax NNX modules; what matters here is which layers keep float32, which
needs NNX's layer types, and Flax offers no policy object of its own (only each layer's ``dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shitu.errors import ShituError

#: The values of ``Train.precision``.
PRECISIONS = ("fp32", "bf16")


def check_precision(value: Any) -> str:
    """``value`` if it is one of :data:`PRECISIONS`; a one-line ShituError naming the key otherwise."""
    if value not in PRECISIONS:
        raise ShituError(f"Train.precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return str(value)


def _is_flax_layer(node: Any) -> bool:
    return type(node).__module__.startswith("flax.") and hasattr(node, "dtype")


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one training step computes: ``name`` is ``fp32`` (everything as built) or ``bf16``."""

    name: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.name)

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    @property
    def compute_dtype(self) -> Any:
        import jax.numpy as jnp

        return jnp.bfloat16 if self.mixed else jnp.float32

    def cast_to_compute(self, tree: Any) -> Any:
        """``tree`` with its floating-point leaves in the compute dtype (unchanged under fp32)."""
        if not self.mixed:
            return tree
        import jax
        import jax.numpy as jnp

        dtype = self.compute_dtype

        def cast(leaf: Any) -> Any:
            return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

        return jax.tree.map(cast, tree)

    def cast_like(self, tree: Any, reference: Any) -> Any:
        """``tree``'s leaves in the dtypes of ``reference``'s (same structure): state that must keep its type."""
        if not self.mixed:
            return tree
        import jax

        return jax.tree.map(lambda leaf, ref: leaf.astype(ref.dtype), tree, reference)

    def to_float32(self, tree: Any) -> Any:
        """``tree``'s floating-point leaves in float32 (losses and logged terms)."""
        if not self.mixed:
            return tree
        import jax
        import jax.numpy as jnp

        def cast(leaf: Any) -> Any:
            leaf = jnp.asarray(leaf)
            return leaf.astype(jnp.float32) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

        return jax.tree.map(cast, tree)

    def apply_to_layers(self, model: Any) -> Any:
        """Set the computation ``dtype`` of every Flax layer of ``model`` (in place; a model merged for one
        traced step) to the compute dtype, and return it. Flax's normalisation layers keep their statistics
        and arithmetic in float32 with it; shitu's own layers follow the dtype of their inputs."""
        if not self.mixed:
            return model
        from flax import nnx

        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and _is_flax_layer(node):
                node.dtype = self.compute_dtype
        return model
