"""Facts about a registered model for listings: parameters, input size, embedding size, GFLOPs per image.

Counting needs no weights (shapes only), but GFLOPs come from XLA's cost analysis of the traced forward,
which takes seconds for the large ViT; results are cached per shitu version in the cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from shitu.fileio import atomic_write_json
from shitu.runtime import cache_dir


@dataclass(frozen=True)
class ModelFacts:
    name: str
    description: str
    parameters: int  # network + neck, without the training head (what inference uses)
    head_parameters_per_class: int
    input_size: int
    embedding_size: int
    gflops: float  # per image at input_size, XLA's count (a multiply-add is 2 FLOPs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _key(spec: Any) -> str:
    from shitu import __version__

    text = json.dumps([__version__, spec.name, spec.builder, spec.arch, spec.input_size], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measure(spec: Any) -> ModelFacts:
    """Count parameters and FLOPs of ``spec``'s model without materialising any weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def count(module: Any) -> int:
        return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))

    one = nnx.eval_shape(lambda: spec.build(1))
    two = nnx.eval_shape(lambda: spec.build(2))
    per_class = count(two) - count(one)
    one.eval()
    graphdef, state = nnx.split(one)
    image = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, 3), jnp.float32)
    analysis = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, image).cost_analysis() or {}
    return ModelFacts(
        name=spec.name,
        description=spec.description,
        parameters=count(one) - per_class,
        head_parameters_per_class=per_class,
        input_size=spec.input_size,
        embedding_size=spec.embedding_size,
        gflops=round(float(analysis.get("flops", 0.0)) / 1e9, 3),
    )


def model_facts(spec: Any) -> ModelFacts:
    """:func:`measure`, cached on disk (a failed cache read or write only costs the measurement)."""
    file = cache_dir() / "model-facts" / f"{_key(spec)}.json"
    try:
        return ModelFacts(**json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass
    facts = measure(spec)
    with contextlib.suppress(OSError):
        atomic_write_json(file, facts.to_json())
    return facts
