"""Initialising a model being trained from earlier weights: a shitu bundle or PaddleClas weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shitu.errors import ShituError

#: ``emit(kind, data)``: how a warning reaches the caller (kind "warning", ``data["message"]``).
EmitFn = Callable[[str, dict[str, Any]], None]


def _flat(state: Any) -> dict[str, Any]:
    import jax

    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def load_pretrained(model: Any, source: Path, *, spec: Any, emit: EmitFn) -> None:
    """Initialise ``model`` (built from ``spec``) in place from a shitu bundle (``import-weights`` output, a
    ``best_model``) or PaddleClas weights (``.pdparams`` or an inference model). The training head is skipped,
    with a warning, when its class count differs; any other mismatch is an error (another architecture)."""
    import jax
    from flax import nnx

    from shitu.models.bundle import INFO_FILE, load_bundle

    if not source.exists():
        raise ShituError("pretrained weights not found", path=source)
    if source.is_dir() and (source / INFO_FILE).is_file():
        bundle = load_bundle(source)
        if bundle.info.model != spec.name:
            raise ShituError(f"pretrained bundle holds {bundle.info.model}, not {spec.name}", path=source)
        given = _flat(nnx.state(bundle.model, nnx.Any(nnx.Param, nnx.BatchStat)))
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
            nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
        )
        leaves, skipped_head, mismatched = [], [], []
        for path, leaf in paths_leaves:
            key = jax.tree_util.keystr(path)
            value = given.get(key)
            if value is not None and tuple(value.shape) == tuple(leaf.shape) and value.dtype == leaf.dtype:
                leaves.append(value)
            elif key.startswith("['head']"):
                skipped_head.append(key)
                leaves.append(leaf)
            else:
                mismatched.append(key)
                leaves.append(leaf)
        if mismatched:
            deploy = bool(bundle.info.arch.get("deploy"))
            raise ShituError(
                f"pretrained bundle does not fit the model being trained: {len(mismatched)} parameters differ "
                f"(e.g. {mismatched[0]})",
                path=source,
                hint="it holds a re-parameterised (exported) model; import the training .pdparams instead"
                if deploy
                else f"its architecture options are {bundle.info.arch or 'the defaults'}",
            )
        nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
        if skipped_head:
            emit(
                "warning",
                {
                    "message": f"pretrained head has {bundle.info.num_classes} classes, this training "
                    f"{model.num_classes}: the head starts from random weights"
                },
            )
        return
    from shitu.weights.importer import import_paddle_state, read_paddle_state

    if spec.paddle_importer is None:
        raise ShituError(f"model {spec.name} cannot read Paddle weights; give a shitu bundle", path=source)
    state, _ = read_paddle_state(source, spec)
    report = import_paddle_state(spec, model, state, source=source)  # refuses non-float arrays
    if not report.loaded:
        raise ShituError("no parameter of this file fits the model", path=source)
    heads = [item for item in report.skipped if item[0].startswith("head.")]
    others = [item for item in report.skipped if not item[0].startswith("head.")]
    if others:
        key, file_shape, model_shape = others[0]
        raise ShituError(
            f"pretrained weights do not fit the model: {key} is {list(file_shape)} in the file, "
            f"{list(model_shape)} in the model ({len(others)} such parameters)",
            path=source,
        )
    if heads:
        emit(
            "warning",
            {
                "message": f"pretrained head {heads[0][0]} has shape {list(heads[0][1])}, this training "
                f"{list(heads[0][2])}: the head starts from random weights"
            },
        )
