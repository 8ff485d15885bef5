"""Training checkpoints: Orbax's ``CheckpointManager`` under ``OUTPUT/checkpoints/``.

One checkpoint is one training *iteration* number (the global step count, so an interrupt in the middle of
an epoch fits in the same numbering as the end-of-epoch saves) holding two items:

- ``state``: the arrays (parameters, optimizer state, BatchNorm statistics) — ``StandardSave``, *packed*: the
  leaves of each dtype concatenated into one flat array, with the layout (path, shape, dtype of every leaf) in
  ``meta``. Orbax writes one TensorStore array per leaf, and the several hundred small leaves of a compact CNN's state
  took seconds per save on a 2-core machine; packed, a tenth of that. Restoring checks the layout against
  the model being resumed, so a checkpoint of another model or config is refused with a clear message;
- ``meta``: plain JSON — loader position (epoch, step), seed, metrics history, best score, partial sums
  of an interrupted epoch, a fingerprint of the training list — ``JsonSave``.

Orbax writes each checkpoint in a temporary folder and renames it into place when complete, so a process
killed while saving leaves the previous checkpoints intact (the unfinished folder is ignored and removed
by the next save); ``max_to_keep`` keeps the newest N. RNG state is not stored as arrays: the trainer
derives every random key from (seed, iteration), both in ``meta``.

In a multi-process run every method that reads or writes a checkpoint must be called by every process
(Orbax synchronises them: process 0 writes ``meta`` and the replicated arrays, and every process reads).

Saving is synchronous: the arrays are copied to the host (packing) and written before the call returns (the
trainer donates its buffers to the next step); the files are small next to an epoch of training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shitu.errors import ShituError

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
LAYOUT_KEY = "state_layout"


@dataclass
class Restored:
    """What :meth:`CheckpointStore.restore` read back."""

    iteration: int
    state: Any
    meta: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one training run in ``directory`` (created on first save), keeping the newest
    ``keep``. Use as a context manager or call :meth:`close`."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3) -> None:
        import orbax.checkpoint as ocp

        from shitu.fileio import writing

        if keep < 1:
            raise ShituError(f"Train.checkpoints_to_keep must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            create=True,
        )
        with writing(self.directory):
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, META_ITEM))

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iterations(self) -> list[int]:
        """The iteration numbers of the complete checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        """The newest complete checkpoint, or None."""
        steps = self.iterations()
        return steps[-1] if steps else None

    def save(self, iteration: int, state: Any, meta: dict[str, Any]) -> Path:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON) as checkpoint ``iteration``; returns
        its folder. Replaces an existing checkpoint of the same number (a resumed run re-saving)."""
        import orbax.checkpoint as ocp

        from shitu.fileio import writing

        packed, layout = pack(state)
        meta = {**meta, LAYOUT_KEY: layout}
        try:
            # A full disk: one StorageError, Orbax's logged tracebacks dropped.
            with writing(self.path_of(iteration), rerun=self._resume_hint()):
                if iteration in self._manager.all_steps():
                    self._manager.delete(iteration)
                self._manager.save(
                    iteration,
                    args=ocp.args.Composite(
                        **{STATE_ITEM: ocp.args.StandardSave(packed), META_ITEM: ocp.args.JsonSave(meta)}
                    ),
                    force=True,
                )
                self._manager.wait_until_finished()
        except BaseException:
            self._remove_unfinished(iteration)
            raise
        return self.path_of(iteration)

    def _resume_hint(self) -> str:
        """How to go on after a checkpoint could not be written (the earlier checkpoints are intact)."""
        if not self.iterations():  # nothing to resume: start the run again over what it wrote
            return "run the same command again with --overwrite"
        return f"continue with 'shitu train --resume --output {self.directory.parent}'"

    def _remove_unfinished(self, iteration: int) -> None:
        """Delete what a failed save of ``iteration`` left (Orbax's ``N.orbax-checkpoint-tmp*`` folder; the
        next store would remove it too, but a failed command leaves nothing half-written)."""
        import shutil

        for leftover in self.directory.glob(f"{iteration}.orbax-checkpoint-tmp*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)

    def path_of(self, iteration: int) -> Path:
        """The folder of checkpoint ``iteration``."""
        return self.directory / str(iteration)

    def read_meta(self, iteration: int) -> dict[str, Any]:
        """Only the JSON part of checkpoint ``iteration`` (cheap: no arrays are read). Like every Orbax
        restore, a collective in a multi-process run: call it from every process."""
        import orbax.checkpoint as ocp

        try:
            restored = self._manager.restore(iteration, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        except Exception as exc:  # Orbax raises many types for damaged folders
            message = f"cannot read checkpoint {iteration}: {_one_line(exc)}"
            raise ShituError(message, path=self.path_of(iteration)) from None
        return dict(restored[META_ITEM])

    def restore(self, iteration: int, abstract_state: Any) -> Restored:
        """Read checkpoint ``iteration`` into the structure, shapes and shardings of ``abstract_state``
        (a pytree of ``jax.ShapeDtypeStruct``); a ShituError when it does not fit (another model or recipe)."""
        import jax
        import numpy as np
        import orbax.checkpoint as ocp

        where = self.path_of(iteration)
        meta = self.read_meta(iteration)
        expected = layout_of(abstract_state)
        saved = meta.get(LAYOUT_KEY)
        if saved != expected:
            differing = next(
                (f"{a} then, {b} now" for a, b in zip(saved or [], expected, strict=False) if a != b), None
            )
            raise ShituError(
                f"cannot restore checkpoint {iteration}: it holds the state of another model or config"
                + (
                    f" ({len(saved or [])} arrays then, {len(expected)} now)"
                    if differing is None
                    else f" ({differing})"
                ),
                path=where,
            )
        target = {
            dtype: jax.ShapeDtypeStruct((sum(int(np.prod(e[1])) for e in expected if e[2] == dtype),), np.dtype(dtype))
            for dtype in sorted({e[2] for e in expected})
        }
        try:
            restored = self._manager.restore(
                iteration, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
            )
        except Exception as exc:  # Orbax raises many types for damaged or foreign checkpoints
            raise ShituError(f"cannot restore checkpoint {iteration} (damaged): {_one_line(exc)}", path=where) from None
        return Restored(iteration=iteration, state=unpack(restored[STATE_ITEM], abstract_state), meta=meta)

    def close(self) -> None:
        from shitu.fileio import writing

        with writing(self.directory, rerun=self._resume_hint()):
            self._manager.wait_until_finished()
            self._manager.close()


def layout_of(tree: Any) -> list[list[Any]]:
    """``[path, shape, dtype]`` of every leaf of ``tree`` (arrays or ShapeDtypeStructs), in leaf order."""
    import jax
    import numpy as np

    return [
        [jax.tree_util.keystr(path), [int(d) for d in leaf.shape], np.dtype(leaf.dtype).name]
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def pack(tree: Any) -> tuple[dict[str, Any], list[list[Any]]]:
    """``tree``'s leaves as one flat host array per dtype (leaf order), and its :func:`layout_of`."""
    import jax
    import numpy as np

    leaves = [np.asarray(leaf) for leaf in jax.device_get(jax.tree.leaves(tree))]
    packed: dict[str, Any] = {}
    for dtype in sorted({leaf.dtype.name for leaf in leaves}):
        parts = [leaf.ravel() for leaf in leaves if leaf.dtype.name == dtype]
        packed[dtype] = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    return packed, layout_of(tree)


def unpack(packed: dict[str, Any], abstract: Any) -> Any:
    """Inverse of :func:`pack`: the arrays of ``packed`` cut and shaped as the leaves of ``abstract``."""
    import jax
    import numpy as np

    offsets = dict.fromkeys(packed, 0)
    leaves = []
    for leaf in jax.tree.leaves(abstract):
        dtype = np.dtype(leaf.dtype).name
        size = int(np.prod(leaf.shape))
        flat = np.asarray(packed[dtype])
        leaves.append(flat[offsets[dtype] : offsets[dtype] + size].reshape(leaf.shape))
        offsets[dtype] += size
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` (with sharding) for every array of ``tree``: an Orbax restore target."""
    import jax

    def describe(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        return leaf

    return jax.tree.map(describe, tree)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
