"""Optimizer and learning-rate schedule of the recognition recipes, as PaddleClas trains them
(reference/ppshitu_spec.md §4, §7).

Update rule (Paddle ``Momentum``, non-Nesterov, with a fused coupled L2 regularizer), per parameter ``w``
with gradient ``g`` at iteration ``i`` (0-based)::

    g' = g + coeff·w                # L2Decay(coeff), coupled: enters the momentum (not AdamW-style)
    v  = momentum·v + g'            # velocity, starts at 0
    w  = w − lr(i)·v

This is ``optax.add_decayed_weights`` → ``optax.trace(momentum, nesterov=False)`` (``trace`` keeps
``v = g + decay·v``, the same form) → ``optax.scale_by_learning_rate(schedule)`` (which reads the schedule
at the update count, so the first update uses ``lr(0)`` like Paddle's first step).

Which parameters (computed from the model's NNX state paths, see :func:`parameter_groups`):

- ``"pplcnet"``: coeff 1e-5. **No L2** on the BatchNorm ``scale``/``bias`` of every ``ConvBN`` layer of the
  backbone (Paddle's ``ConvBNLayer`` gives them ``L2Decay(0.0)``): the paths ``<ConvBN path>.bn.scale`` and
  ``<ConvBN path>.bn.bias`` (stem, every block's dw/pw convs and the rep branches). L2 still applies to the
  convolution kernels, SE convs, ``last_conv``, the BNNeck ``feat_bn.scale``/``feat_bn.bias`` and the FC
  head. The BNNeck bias ``neck.feat_bn.bias`` is **frozen** (upstream ``learning_rate: 1e-20``, i.e. an
  update of ~1e-20·lr·v): its update is set to exactly zero.
- ``"clip"``: coeff 2e-5 on every parameter (LayerNorms, cls token and position embedding included, as
  upstream's config sets no exclusions); nothing frozen.

Learning rate (PaddleClas ``Cosine`` with ``by_epoch: False``, i.e. Paddle ``LinearWarmup`` around
``CosineAnnealingDecay``; the scheduler steps once per iteration, after the optimizer step)::

    W = round(warmup_epochs · steps_per_epoch)         (warmup_epochs clamped to epochs first)
    T = (epochs − warmup_epochs) · steps_per_epoch
    lr(i) = base · i / W                                 for i < W  (lr(0) = 0: the first step is a no-op)
          = base · (1 + cos(π (i − W) / T)) / 2          otherwise  (Paddle's closed form; eta_min 0)
          = base                                          when T = 0 (warmup covers all epochs)

``round`` is Python's (half to even), as upstream. Paddle requires an integer T; a fractional
``warmup_epochs`` here just gives a fractional T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shitu.errors import ShituError

__all__ = [
    "DEFAULT_WEIGHT_DECAY",
    "ParameterGroups",
    "lr_schedule",
    "make_optimizer",
    "parameter_groups",
    "warmup_and_decay_steps",
]

#: L2 coefficient per recipe (GeneralRecognitionV2_PPLCNetV2_base.yaml / ..._CLIP_vit_*.yaml).
DEFAULT_WEIGHT_DECAY = {"pplcnet": 1e-5, "clip": 2e-5}

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class ParameterGroups:
    """Parameter paths (NNX state paths, e.g. ``("backbone", "stem", 0, "bn", "scale")``) with special
    optimizer treatment. ``all_params`` lists every parameter path of the model."""

    all_params: tuple[Path, ...]
    no_decay: frozenset[Path]
    frozen: frozenset[Path]

    @staticmethod
    def dotted(path: Path) -> str:
        """``("backbone", "stem", 0, "bn", "scale")`` → ``"backbone.stem.0.bn.scale"``."""
        return ".".join(str(p) for p in path)

    def to_json(self) -> dict[str, Any]:
        return {
            "params": len(self.all_params),
            "no_decay": sorted(self.dotted(p) for p in self.no_decay),
            "frozen": sorted(self.dotted(p) for p in self.frozen),
        }


def parameter_groups(model: Any, recipe: str) -> ParameterGroups:
    """Which parameters of ``model`` get no L2 and which are frozen, under ``recipe`` (module docstring).

    Found by walking the model graph: every ``ConvBN`` module's ``bn`` parameters (pplcnet), and a
    ``BNNeck`` neck's ``feat_bn.bias`` (pplcnet). Paths are those of ``nnx.state(model, nnx.Param)``.
    """
    from flax import nnx

    from shitu.models.layers import ConvBN
    from shitu.models.pplcnetv2 import BNNeck

    all_params = tuple(tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    known = set(all_params)
    no_decay: set[Path] = set()
    frozen: set[Path] = set()
    if recipe == "pplcnet":
        for path, node in nnx.iter_graph(model):
            if isinstance(node, ConvBN) and node.bn is not None:
                no_decay.update(p for p in known if p[: len(path) + 1] == (*path, "bn"))
            elif isinstance(node, BNNeck):
                frozen.update(p for p in known if p == (*path, "feat_bn", "bias"))
    elif recipe != "clip":
        raise ShituError(f"unknown training recipe {recipe!r}", hint="use 'pplcnet' or 'clip'")
    return ParameterGroups(all_params=all_params, no_decay=frozenset(no_decay), frozen=frozenset(frozen))


def warmup_and_decay_steps(epochs: int, warmup_epochs: float, steps_per_epoch: int) -> tuple[int, float]:
    """``(W, T)``: warmup iterations and cosine length, PaddleClas' way (warmup clamped to ``epochs``)."""
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ShituError(f"epochs ({epochs}) and steps per epoch ({steps_per_epoch}) must be positive")
    if warmup_epochs < 0:
        raise ShituError(f"warmup epochs must not be negative, got {warmup_epochs}")
    warmup_epochs = min(warmup_epochs, epochs)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    decay_steps = (epochs - warmup_epochs) * steps_per_epoch
    return int(warmup_steps), float(decay_steps)


def lr_schedule(
    learning_rate: float, *, epochs: int, warmup_epochs: float, steps_per_epoch: int
) -> Callable[[Any], Any]:
    """The per-iteration learning rate ``schedule(i)`` (module docstring); jit-able, float32."""
    import jax.numpy as jnp

    if learning_rate < 0:
        raise ShituError(f"learning rate must not be negative, got {learning_rate}")
    base = float(learning_rate)
    warmup_steps, decay_steps = warmup_and_decay_steps(epochs, warmup_epochs, steps_per_epoch)

    def schedule(count: Any) -> Any:
        i = jnp.asarray(count, jnp.float32)
        if decay_steps > 0:
            after = base * 0.5 * (1.0 + jnp.cos(jnp.pi * (i - warmup_steps) / decay_steps))
        else:
            after = jnp.full_like(i, base)
        if warmup_steps <= 0:
            return after
        return jnp.where(i < warmup_steps, base * i / warmup_steps, after)

    return schedule


def _path_of(key_path: tuple[Any, ...]) -> Path:
    """A jax key path of a parameter tree (``nnx.State`` with Variables or pure arrays, or a nested dict) →
    the NNX state path (``GetAttrKey`` entries, such as a Variable's ``.value``, are dropped)."""
    import jax

    out: list[str | int] = []
    for entry in key_path:
        if isinstance(entry, jax.tree_util.DictKey):
            out.append(entry.key)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            out.append(entry.idx)
    return tuple(out)


def _path_mask(paths: frozenset[Path], value: bool) -> Callable[[Any], Any]:
    """An optax mask function: leaf → ``value`` if its path is in ``paths`` else ``not value``. It checks
    that every path in ``paths`` is present, so a tree of another model cannot silently go unmasked."""
    import jax

    def mask(tree: Any) -> Any:
        seen: set[Path] = set()

        def leaf(key_path: Any, _: Any) -> bool:
            path = _path_of(key_path)
            if path in paths:
                seen.add(path)
                return value
            return not value

        result = jax.tree_util.tree_map_with_path(leaf, tree)
        missing = paths - seen
        if missing:
            name = ParameterGroups.dotted(sorted(missing, key=str)[0])
            raise ShituError(f"optimizer mask: parameter {name!r} is not in the parameter tree it was given")
        return result

    return mask


def make_optimizer(
    model: Any,
    *,
    recipe: str,
    learning_rate: float,
    epochs: int,
    warmup_epochs: float,
    steps_per_epoch: int,
    momentum: float = 0.9,
    weight_decay: float | None = None,
) -> tuple[Any, Callable[[Any], Any]]:
    """``(tx, schedule)``: Paddle's Momentum + coupled L2 for ``recipe`` ("pplcnet" | "clip") on ``model``
    (module docstring), and the per-iteration learning rate ``schedule(i)``.

    ``weight_decay`` overrides the recipe's L2 coefficient (the exclusions stay). ``tx`` works on
    ``nnx.state(model, nnx.Param)`` (with Variables or pure arrays), so it serves both
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and a functional ``tx.update(grads, opt_state, params)``.
    """
    import optax

    groups = parameter_groups(model, recipe)
    coeff = DEFAULT_WEIGHT_DECAY[recipe] if weight_decay is None else float(weight_decay)
    schedule = lr_schedule(learning_rate, epochs=epochs, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch)
    parts = []
    if coeff:
        decay = _path_mask(groups.no_decay, False) if groups.no_decay else None
        parts.append(optax.add_decayed_weights(coeff, mask=decay))
    parts += [optax.trace(decay=momentum, nesterov=False), optax.scale_by_learning_rate(schedule)]
    if groups.frozen:
        parts.append(optax.masked(optax.set_to_zero(), _path_mask(groups.frozen, True)))
    return optax.chain(*parts), schedule
