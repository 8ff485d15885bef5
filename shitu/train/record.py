"""What a run records in its folder as it goes: the log, the checkpoints and their metadata, the per-epoch
history, the best epoch and ``train_result.json`` (names and formats in :mod:`shitu.train.rundir`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shitu.errors import ShituError
from shitu.train import rundir
from shitu.train.settings import TrainSettings

CHECKPOINT_FORMAT = "shitu-train-checkpoint"
CHECKPOINT_VERSION = 1

#: ``on_event(kind, data)``: kinds "start", "compiled", "step", "eval", "epoch", "best", "checkpoint",
#: "warning", "interrupted", "done" (see :func:`shitu.train.trainer.train`).
EventFn = Callable[[str, dict[str, Any]], None]


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """The per-epoch JSON line: epoch, loss, each term, lr, images_per_s, recall1, recall5, mAP, seconds."""
    row = {"epoch": record["epoch"], "loss": record["loss"], **record.get("terms", {})}
    for key in ("lr", "images_per_s", "recall1", "recall5", "mAP", "seconds"):
        row[key] = record.get(key)
    return row


class RunRecord:
    """The run's log, checkpoint store and history. Only process 0 writes files (``primary``); every
    process saves and restores checkpoints (Orbax's collectives)."""

    def __init__(
        self,
        settings: TrainSettings,
        *,
        store: Any,
        loader: Any,
        num_classes: int,
        train_list_sha: str,
        primary: bool,
        emit: EventFn,
        previous_run: Path | None,
    ) -> None:
        self.settings = settings
        self.out_dir = settings.output
        self.store = store
        self.loader = loader
        self.num_classes = num_classes
        self.train_list_sha = train_list_sha
        self.primary = primary
        self.emit = emit
        self.previous_run = previous_run
        self.steps_per_epoch = int(loader.steps_per_epoch)
        self.log = rundir.TrainLog(self.out_dir / rundir.TRAIN_LOG if primary else None)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.compile_seconds = 0.0
        self._previous_runs_deleted = False
        self._summaries: dict[int, dict[str, Any] | None] = {}  # checkpoint iteration → what train_result needs

    def close(self) -> None:
        self.log.close()

    def warn(self, message: str) -> None:
        self.log.write(message, level="WARNING")
        self.emit("warning", {"message": message})

    # -- checkpoints -------------------------------------------------------------------------------
    def meta(self, *, iteration: int, epoch_index: int, step: int, partial: dict[str, Any] | None) -> dict[str, Any]:
        s = self.settings
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": s.spec.name,
            "arch": s.arch,
            "num_classes": self.num_classes,
            "input_size": s.input_size,
            "batch_size": s.batch_size,
            "precision": s.precision,
            "seed": s.seed,
            "iteration": iteration,
            "epoch_index": epoch_index,
            "step": step,
            "loader": self.loader.state(epoch_index, step),
            "history": self.history,
            "best": self.best,
            "partial": partial,
            "train_list_sha256": self.train_list_sha,
            "compile_seconds": self.compile_seconds,
        }

    def save(self, state: Any, *, iteration: int, epoch_index: int, step: int, partial: Any) -> Path:
        """Checkpoint ``state``; the first one of a run that replaced another deletes the one moved aside."""
        meta = self.meta(iteration=iteration, epoch_index=epoch_index, step=step, partial=partial)
        path = self.store.save(iteration, state, meta)
        self._summary(iteration, meta)
        self.log.write(f"Already save model in {path}")
        self.emit("checkpoint", {"path": str(path), "iteration": iteration, "epoch": epoch_index, "step": step})
        if not self._previous_runs_deleted and self.primary:
            # The new run now has a checkpoint: the runs moved aside can go (ours, and any an earlier
            # --overwrite moved aside before it was killed ahead of its first checkpoint).
            rundir.delete_previous_run(self.previous_run)
            rundir.delete_previous_runs(self.out_dir)
            self._previous_runs_deleted = True
        self.previous_run = None
        return path

    def restore(self, place: Callable[[Any], Any], state: Any) -> tuple[Any, dict[str, Any]]:
        """The newest checkpoint, in the structure of ``state`` and placed by ``place``, with its metadata;
        a located ShituError when it belongs to another run (model, classes, sizes, seed, train.txt)."""
        from shitu.train.checkpoint import abstract_like

        s = self.settings
        latest = self.store.latest()
        if latest is None:
            raise ShituError("nothing to resume: no complete checkpoint", path=self.store.directory)
        meta = self.store.read_meta(latest)
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise ShituError("not a shitu training checkpoint", path=self.store.path_of(latest))
        for key, now in (
            ("model", s.spec.name),
            ("num_classes", self.num_classes),
            ("arch", s.arch),
            ("input_size", s.input_size),
            ("batch_size", s.batch_size),
            ("precision", s.precision),
            ("seed", s.seed),
        ):
            if meta.get(key, "fp32" if key == "precision" else None) != now:  # older checkpoints: fp32
                raise ShituError(
                    f"cannot resume: the checkpoint has {key} {meta.get(key)!r}, this run {now!r}",
                    path=self.store.path_of(latest),
                )
        if meta.get("train_list_sha256") != self.train_list_sha:
            raise ShituError(
                "cannot resume: train.txt changed since the run started",
                path=s.dataset_dir / "train.txt",
                hint="start a new run with --overwrite",
            )
        restored = self.store.restore(latest, abstract_like(state))
        return place(restored.state), restored.meta

    def read_summaries(self) -> None:
        """Read what train_result.json needs from every checkpoint (in every process: a restore is collective)."""
        for existing in self.store.iterations():
            self._summary(existing)

    def recorded_done_everywhere(self) -> bool:
        """Whether train_result.json says the run finished, as process 0 reads it, in every process (a
        checkpoint after the last epoch can precede that record: then resuming only writes the outputs)."""
        from shitu.runtime.distributed import broadcast_json

        done = False
        if self.primary:
            try:
                text = (self.out_dir / rundir.TRAIN_RESULT).read_text(encoding="utf-8")
                done = bool(json.loads(text).get("done_flag"))
            except (OSError, ValueError):
                done = False
        return bool(broadcast_json(done))

    def _summary(self, iteration: int, meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Epoch, step and recall1 of checkpoint ``iteration`` (read once from its metadata; None if unreadable)."""
        if iteration not in self._summaries or meta is not None:
            if meta is None:
                try:
                    meta = self.store.read_meta(iteration)
                except ShituError:
                    self._summaries[iteration] = None
                    return None
            epochs_done, step = int(meta.get("epoch_index", 0)), int(meta.get("step", 0))
            row = next((r for r in meta.get("history") or [] if r["epoch"] == epochs_done), None)
            self._summaries[iteration] = {
                "epoch": epochs_done if step == 0 else epochs_done + 1,
                "recall1": row.get("recall1") if row is not None and step == 0 else None,
            }
        return self._summaries[iteration]

    # -- the files of the run ----------------------------------------------------------------------
    def write_start(self, label_map: dict[int, int]) -> None:
        """config.yaml, label_dict.txt and a first train_result.json (process 0)."""
        if not self.primary:
            return
        from shitu.fileio import atomic_write_text

        atomic_write_text(self.out_dir / rundir.CONFIG, self.settings.config.to_yaml())
        rundir.write_label_dict(self.out_dir / rundir.LABEL_DICT, dict(label_map))
        self.write_result(done=False)

    def publish_epoch(self, record: dict[str, Any]) -> None:
        """After an epoch's record joined :attr:`history` (and its checkpoint, if any, is saved): refresh
        train_result.json and the curves (process 0) and report it."""
        if self.primary:
            self.write_result(done=False)
            rundir.plot_curves(self.out_dir / rundir.CURVES, self.history)
        self.emit("epoch", public_record(record))

    def write_result(self, *, done: bool, latest: Path | None = None) -> dict[str, Any]:
        """PaddleX's train_result.json (written by process 0; the document is returned everywhere)."""
        last: list[dict[str, Any]] = []
        for iteration in reversed(self.store.iterations()):
            summary = self._summary(iteration)
            if summary is None:
                continue
            last.append(
                rundir.model_entry(
                    score=summary["recall1"],
                    bundle=rundir.LATEST_MODEL if (latest is not None and not last) else None,
                    checkpoint=f"{rundir.CHECKPOINTS}/{iteration}",
                    epoch=summary["epoch"],
                )
            )
        best = None
        if self.best is not None:
            best = rundir.model_entry(
                score=self.best["recall1"],
                bundle=rundir.BEST_MODEL,
                epoch=self.best["epoch"],
                metrics={k: self.best[k] for k in ("recall1", "recall5", "mAP")},
            )
        document = rundir.train_result_document(
            model_name=self.settings.spec.name,
            done=done,
            last=last,
            best=best,
            extra={
                "dataset_dir": str(self.settings.dataset_dir),
                "epochs": self.settings.epochs,
                "epochs_done": len(self.history),
                "precision": self.settings.precision,
                "history": [public_record(r) for r in self.history],
                "curves": rundir.CURVES if (self.out_dir / rundir.CURVES).exists() or self.history else "",
                "compile_seconds": round(self.compile_seconds, 3),
            },
        )
        if self.primary:
            rundir.write_train_result(self.out_dir, document)
        return document
