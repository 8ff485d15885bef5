"""Optimizer and learning-rate schedule, as PaddleClas trains recognition models (reference/ppshitu_spec.md §4).

Update rule (Paddle ``Momentum``, non-Nesterov, with a fused coupled L2 regularizer), per parameter ``w``
with gradient ``g`` at iteration ``i`` (0-based)::

    g' = g + coeff·w                # L2Decay(coeff), coupled: enters the momentum (not AdamW-style)
    v  = momentum·v + g'            # velocity, starts at 0
    w  = w − lr(i)·v

This is ``optax.add_decayed_weights`` → ``optax.trace(momentum, nesterov=False)`` (``trace`` keeps
``v = g + decay·v``, the same form) → ``optax.scale_by_learning_rate(schedule)`` (which reads the schedule
at the update count, so the first update uses ``lr(0)`` like Paddle's first step).

Which parameters: every parameter gets the L2 term and an update, except the groups a model's recipe names
(:func:`parameter_groups`): ``no_decay`` paths get no L2 term, ``frozen`` paths get an update of exactly
zero (PaddleClas freezes a parameter with ``learning_rate: 1e-20``, an update of ~1e-20·lr·v).

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
from shitu.models.spec import TrainingRecipe, resolve

__all__ = [
    "ParameterGroups",
    "lr_schedule",
    "make_optimizer",
    "parameter_groups",
    "warmup_and_decay_steps",
]

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


def parameter_groups(model: Any, recipe: TrainingRecipe | None = None) -> ParameterGroups:
    """The parameters of ``model`` that ``recipe.parameter_groups(model)`` excludes from L2 (``no_decay``)
    and from updates (``frozen``); no recipe or no reference: none. Paths are those of
    ``nnx.state(model, nnx.Param)``; the recipe may spell list indices as ints or strings. A path that
    is not a parameter of the model is a ShituError naming the reference."""
    from flax import nnx

    all_params = tuple(tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if recipe is None or recipe.parameter_groups is None:
        return ParameterGroups(all_params=all_params, no_decay=frozenset(), frozen=frozenset())
    by_text = {tuple(str(part) for part in path): path for path in all_params}
    no_decay, frozen = resolve(recipe.parameter_groups)(model)

    def known(paths: Any, what: str) -> frozenset[Path]:
        found: set[Path] = set()
        for path in paths:
            key = tuple(str(part) for part in path)
            if key not in by_text:
                raise ShituError(
                    f"{recipe.parameter_groups} names {what} parameter {'.'.join(key)!r}, which the model lacks"
                )
            found.add(by_text[key])
        return frozenset(found)

    return ParameterGroups(
        all_params=all_params, no_decay=known(no_decay, "a no-decay"), frozen=known(frozen, "a frozen")
    )


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
    learning_rate: float,
    epochs: int,
    warmup_epochs: float,
    steps_per_epoch: int,
    weight_decay: float = 0.0,
    groups: ParameterGroups | None = None,
    momentum: float = 0.9,
) -> tuple[Any, Callable[[Any], Any]]:
    """``(tx, schedule)``: Paddle's Momentum + coupled L2 of coefficient ``weight_decay`` on ``model``,
    sparing ``groups.no_decay`` the L2 and ``groups.frozen`` every update (module docstring; ``groups``
    None: :func:`parameter_groups` without a recipe), and the per-iteration learning rate ``schedule(i)``.

    ``tx`` works on ``nnx.state(model, nnx.Param)`` (with Variables or pure arrays), so it serves both
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and a functional ``tx.update(grads, opt_state, params)``.
    """
    import optax

    if groups is None:
        groups = parameter_groups(model)
    coeff = float(weight_decay)
    if coeff < 0:
        raise ShituError(f"weight decay must not be negative, got {coeff}")
    schedule = lr_schedule(learning_rate, epochs=epochs, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch)
    parts = []
    if coeff:
        decay = _path_mask(groups.no_decay, False) if groups.no_decay else None
        parts.append(optax.add_decayed_weights(coeff, mask=decay))
    parts += [optax.trace(decay=momentum, nesterov=False), optax.scale_by_learning_rate(schedule)]
    if groups.frozen:
        parts.append(optax.masked(optax.set_to_zero(), _path_mask(groups.frozen, True)))
    return optax.chain(*parts), schedule
