"""The output folder of a training run: its lock, what counts as a run, and the files PaddleX writes there.

Layout (PaddleX's names where PaddleX has the file)::

    OUTPUT/
      train_result.json   PaddleX's result record (done_flag, config, label_dict, train_log, models{last_k, best})
      train.log           PaddleX-like text log ([Train][Epoch e/E][Iter: i/n]..., [Eval][Epoch e][Avg]...)
      config.yaml         the resolved config of the run
      label_dict.txt      "<class index> <original label>" per line: how training relabelled the dataset
      train_curves.png    loss and retrieval metrics per epoch
      best_model/         shitu bundle of the epoch with the best recall1 (``shitu eval``/``predict`` take it)
      latest_model/       shitu bundle of the final weights (written when the run completes)
      checkpoints/N/      Orbax checkpoints (N = iterations done), the newest Train.checkpoints_to_keep
      .shitu-train.lock   held (flock) while a run uses the folder, holding its PID

Only this module and :mod:`shitu.train.trainer` know these names.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from shitu.fileio import (
    LOCK_SUFFIX,
    STAGING_NAME,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    exclusive_lock,
    remove_stale_lock,
    writing,
)

TRAIN_RESULT = "train_result.json"
TRAIN_LOG = "train.log"
CONFIG = "config.yaml"
LABEL_DICT = "label_dict.txt"
CURVES = "train_curves.png"
BEST_MODEL = "best_model"
LATEST_MODEL = "latest_model"
CHECKPOINTS = "checkpoints"
LOCK = ".shitu-train.lock"
PREVIOUS_PREFIX = ".previous-run."

#: What a training run leaves in its folder; any of them means "this folder holds a run".
RUN_ENTRIES = (TRAIN_RESULT, TRAIN_LOG, CONFIG, LABEL_DICT, CURVES, BEST_MODEL, LATEST_MODEL, CHECKPOINTS)

#: PaddleX keeps the newest five epochs as last_1..last_5 in train_result.json.
PADDLEX_LAST_K = 5
_PADDLEX_MODEL_FIELDS = (
    "score",
    "pdparams",
    "pdema",
    "pdopt",
    "pdstates",
    "inference_config",
    "pdmodel",
    "pdiparams",
    "pdiparams.info",
)


def existing_run_entries(output: Path) -> list[str]:
    """The names of :data:`RUN_ENTRIES` present in ``output``."""
    return [name for name in RUN_ENTRIES if (output / name).exists()]


def run_lock(output: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the run's lock (:func:`shitu.fileio.exclusive_lock` on ``OUTPUT/.shitu-train.lock``, which holds
    the PID while the run lasts); a second run on the same folder fails at once with a ShituError."""
    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(
        output / LOCK,
        busy="another 'shitu train' is running with this output folder",
        busy_path=output,
        hint="wait for it to finish, or choose another --output",
    )


def move_previous_run(output: Path) -> Path | None:
    """Move the files of an earlier run in ``output`` into a hidden sibling folder ``OUTPUT/.previous-run.<time>``
    (deleted later by :func:`delete_previous_run` once the new run has its first checkpoint); None if none."""
    names = existing_run_entries(output)
    if not names:
        return None
    aside = output / f"{PREVIOUS_PREFIX}{datetime.now().strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
    with writing(output):
        aside.mkdir()
        for name in names:
            os.replace(output / name, aside / name)
    return aside


def delete_previous_run(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


#: The staging file or folder of an atomic write (:data:`shitu.fileio.STAGING_NAME` of any entry).
_STAGING = re.compile(STAGING_NAME.format(name=".+"))


def remove_staging_leftovers(output: Path) -> list[str]:
    """Delete what a kill during an atomic write left in the run folder ``output`` (a half-written bundle or
    file that never replaced anything, and the lock file of a bundle being written); returns the names
    removed. Call with the run lock held."""
    removed = []
    for entry in output.iterdir():
        if entry.name.endswith(LOCK_SUFFIX) and entry.name.startswith("."):
            if remove_stale_lock(entry):
                removed.append(entry.name)
            continue
        if not _STAGING.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def delete_previous_runs(output: Path) -> None:
    """Delete every earlier run moved aside in ``output`` (``.previous-run.*``), e.g. by an ``--overwrite``
    that was killed before its first checkpoint. Call once the current run has a checkpoint."""
    for entry in output.glob(f"{glob.escape(PREVIOUS_PREFIX)}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


class TrainLog:
    """Appends PaddleX-like lines to ``train.log`` (``[time] shitu INFO: message``), flushed per line."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            with writing(path):
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def write(self, message: str, level: str = "INFO") -> None:
        if self._file is None:
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        with writing(self.path):
            self._file.write(f"[{stamp}] shitu {level}: {message}\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            # Every line was flushed when written: only a line whose write already failed (and raised) can
            # still be buffered, and that failure is the one to report.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def format_terms(terms: dict[str, float], digits: int = 5) -> str:
    """``CELoss: 1.23456, TripletAngularMarginLoss: 0.12345, loss: 1.35801`` (PaddleClas' order: terms, loss)."""
    names = [k for k in terms if k != "loss"] + (["loss"] if "loss" in terms else [])
    return ", ".join(f"{name}: {terms[name]:.{digits}f}" for name in names)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def write_label_dict(path: Path, label_map: dict[Any, int]) -> None:
    """``<class index> <original label>`` per line, in index order."""
    lines = [f"{index} {label}\n" for label, index in sorted(label_map.items(), key=lambda item: item[1])]
    atomic_write_text(path, "".join(lines))


def _empty_model_entry() -> dict[str, Any]:
    return {name: "" for name in _PADDLEX_MODEL_FIELDS}


def model_entry(
    *,
    score: float | None,
    bundle: str | None = None,
    checkpoint: str | None = None,
    epoch: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``models`` entry: PaddleX's fields mapped onto our files (``pdparams``/``pdiparams`` → the bundle's
    ``params``, ``pdopt`` → the checkpoint's state, ``pdstates`` → its metadata, ``inference_config`` → the
    bundle's ``shitu_model.json``; fields with no counterpart stay ``""`` as PaddleX leaves them), then ours."""
    entry = _empty_model_entry()
    entry["score"] = score if score is not None else ""
    if bundle is not None:
        entry["pdparams"] = f"{bundle}/params"
        entry["pdiparams"] = f"{bundle}/params"
        entry["inference_config"] = f"{bundle}/shitu_model.json"
    if checkpoint is not None:
        if bundle is None:
            entry["pdparams"] = f"{checkpoint}/state"
        entry["pdopt"] = f"{checkpoint}/state"
        entry["pdstates"] = f"{checkpoint}/meta"
    entry["bundle"] = bundle or ""
    entry["checkpoint"] = checkpoint or ""
    entry["epoch"] = epoch
    if metrics is not None:
        entry["metrics"] = metrics
    return entry


def train_result_document(
    *,
    model_name: str,
    done: bool,
    last: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """PaddleX's ``train_result.json``: ``model_name, done_flag, config, label_dict, train_log, visualdl_log,
    models{last_1..last_5, best}`` with paths relative to the output folder, then shitu's own fields."""
    models: dict[str, Any] = {}
    for k in range(1, PADDLEX_LAST_K + 1):
        models[f"last_{k}"] = last[k - 1] if k <= len(last) else _empty_model_entry()
    models["best"] = best if best is not None else _empty_model_entry()
    return {
        "model_name": model_name,
        "done_flag": done,
        "config": CONFIG,
        "label_dict": LABEL_DICT,
        "train_log": TRAIN_LOG,
        "visualdl_log": "",
        "models": models,
        **extra,
    }


def write_train_result(output: Path, document: dict[str, Any]) -> None:
    atomic_write_json(output / TRAIN_RESULT, document, indent=2)


def plot_curves(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Loss terms (left) and recall1/recall5/mAP (right) per epoch, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    try:
        epochs = [row["epoch"] for row in history]
        term_names = [k for k in (history[0].get("terms") or {})] if history else []
        for name in term_names:
            left.plot(epochs, [row["terms"].get(name) for row in history], marker=".", label=name)
        left.plot(epochs, [row["loss"] for row in history], marker="o", label="loss")
        left.set_xlabel("epoch")
        left.set_title("training loss (epoch average)")
        left.legend()
        left.grid(alpha=0.3)
        evaluated = [row for row in history if row.get("recall1") is not None]
        for key in ("recall1", "recall5", "mAP"):
            right.plot([row["epoch"] for row in evaluated], [row[key] for row in evaluated], marker="o", label=key)
        right.set_xlabel("epoch")
        right.set_ylim(0, 1)
        right.set_title("retrieval on gallery/query")
        right.legend()
        right.grid(alpha=0.3)
        for axis in (left, right):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.tight_layout()
        with atomic_open(path, "wb", encoding=None) as handle:
            figure.savefig(handle, format="png")
    finally:
        plt.close(figure)
