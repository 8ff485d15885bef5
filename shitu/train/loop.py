"""The training loop: epochs of compiled steps on prefetched batches, an evaluation every
``eval_interval`` epochs (and after the last), a checkpoint every ``save_interval``, a stop between steps."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from shitu.errors import ShituError
from shitu.train import rundir
from shitu.train.evaluator import EpochEvaluator
from shitu.train.interrupt import StopFlag, TrainingInterrupted
from shitu.train.prefetch import Prefetcher
from shitu.train.record import RunRecord, public_record


@dataclass
class Position:
    """Where the loop starts: iterations done, the epoch index and step within it, and the running sums of
    an epoch interrupted part-way (``partial``)."""

    iteration: int = 0
    epoch_index: int = 0
    step: int = 0
    partial: dict[str, Any] | None = None


def train_epochs(
    state: Any,
    *,
    step_owner: Any,
    loader: Any,
    record: RunRecord,
    evaluator: EpochEvaluator,
    start: Position,
    max_steps: int | None,
) -> tuple[Any, int]:
    """Train from ``start`` to the last epoch; ``(state, iterations done)``. After Ctrl-C/SIGTERM (agreed
    by every process) or ``max_steps`` steps in this call: a checkpoint, then :class:`TrainingInterrupted`."""
    import jax
    import numpy as np

    s = record.settings
    steps = record.steps_per_epoch
    iteration, epoch_index, start_step, partial = start.iteration, start.epoch_index, start.step, start.partial
    steps_done_here = 0

    def interrupt(reason: str, *, step: int, partial: Any, saved: bool = False) -> None:
        if saved:
            path = record.store.path_of(iteration)
        else:
            path = record.save(state, iteration=iteration, epoch_index=epoch_index, step=step, partial=partial)
        if record.primary:
            record.write_result(done=False)
        message = (
            f"training stopped ({reason}) at epoch {epoch_index + 1}, iteration {step}/{steps}; "
            "checkpoint saved, continue with --resume"
        )
        record.log.write(message)
        record.emit("interrupted", {"reason": reason, "checkpoint": str(path), "epoch": epoch_index + 1, "step": step})
        raise TrainingInterrupted(message, checkpoint=path, epoch=epoch_index + 1, step=step)

    with StopFlag() as stop:

        def stopping() -> bool:
            return stop.agreed() or (max_steps is not None and steps_done_here >= max_steps)

        while epoch_index < s.epochs:
            epoch = epoch_index + 1
            sums: dict[str, float] = dict((partial or {}).get("sums") or {})
            count = int((partial or {}).get("count") or 0)
            seconds = float((partial or {}).get("seconds") or 0.0)
            lr = float((partial or {}).get("lr") or 0.0)
            partial = None
            batches = Prefetcher(
                step_owner.shard_batch(batch["images"], batch["labels"])
                for batch in loader.epoch(epoch_index, start_step)
            )
            step = start_step
            try:
                tick = time.perf_counter()
                for images, labels in batches:
                    state, metrics = step_owner(state, images, labels, iteration)
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    seconds, tick = seconds + now - tick, now
                    iteration, step, steps_done_here, count = iteration + 1, step + 1, steps_done_here + 1, count + 1
                    lr = values.pop("lr")
                    for name, value in values.items():
                        sums[name] = sums.get(name, 0.0) + value
                    if not np.isfinite(values.get("loss", 0.0)):
                        raise ShituError(
                            f"the loss became {values.get('loss')} at epoch {epoch}, iteration {step}",
                            hint="lower -o Train.learning_rate",
                        )
                    _report_step(record, epoch, step, values, lr, seconds, count, iteration)
                    if stopping() and step < steps:
                        partial = {"sums": sums, "count": count, "seconds": seconds, "lr": lr}
                        interrupt(stop.requested or f"max_steps={max_steps}", step=step, partial=partial)
            finally:
                batches.close()

            # -- end of epoch ---------------------------------------------------------------------
            averages = {name: total / max(count, 1) for name, total in sums.items()}
            row: dict[str, Any] = {
                "epoch": epoch,
                "loss": averages.get("loss"),
                "terms": {k: v for k, v in averages.items() if k != "loss"},
                "lr": lr,
                "images_per_s": count * s.batch_size / seconds if seconds > 0 else None,
                "recall1": None,
                "recall5": None,
                "mAP": None,
                "seconds": seconds,
            }
            record.log.write(f"[Train][Epoch {epoch}/{s.epochs}][Avg]{rundir.format_terms(averages)}")
            if epoch % s.eval_interval == 0 or epoch == s.epochs:
                metrics = evaluator.evaluate(state, epoch)
                row.update(metrics)
                if record.best is None or metrics["recall1"] > record.best["recall1"]:
                    _save_best(record, evaluator, epoch, metrics)
                record.log.write(f"[Eval][Epoch {epoch}][best metric: {record.best['recall1']}]")
            record.history.append(row)
            epoch_index, start_step = epoch_index + 1, 0
            if epoch % s.save_interval == 0 or epoch == s.epochs:
                record.save(state, iteration=iteration, epoch_index=epoch_index, step=0, partial=None)
            record.publish_epoch(row)
            if stopping() and epoch_index < s.epochs:
                saved = epoch % s.save_interval == 0
                interrupt(stop.requested or f"max_steps={max_steps}", step=0, partial=None, saved=saved)
    return state, iteration


def _save_best(record: RunRecord, evaluator: EpochEvaluator, epoch: int, metrics: dict[str, float]) -> None:
    """The weights just evaluated become ``best_model/``."""
    path = record.out_dir / rundir.BEST_MODEL
    record.best = {"epoch": epoch, **metrics}
    if record.primary:
        evaluator.save_bundle(path, {"epoch": epoch, "metrics": metrics})
    record.log.write(f"Already save model in {path}")
    record.emit("best", {"epoch": epoch, **metrics, "path": str(path)})


def _report_step(
    record: RunRecord,
    epoch: int,
    step: int,
    values: dict[str, float],
    lr: float,
    seconds: float,
    count: int,
    iteration: int,
) -> None:
    """PaddleX's log line every ``log_interval`` steps (and at the epoch's end) and a "step" event."""
    s = record.settings
    steps = record.steps_per_epoch
    per_step = seconds / max(count, 1)
    remaining = (s.epochs * steps - iteration) * per_step
    images_per_s = s.batch_size / per_step if per_step > 0 else 0.0
    if step % s.log_interval == 0 or step == steps:
        record.log.write(
            f"[Train][Epoch {epoch}/{s.epochs}][Iter: {step - 1}/{steps}]lr(Cosine): "
            f"{lr:.8f}, {rundir.format_terms(values)}, batch_cost: {per_step:.5f}s, "
            f"ips: {images_per_s:.5f} samples/s, eta: {rundir.format_eta(remaining)}"
        )
    record.emit(
        "step",
        {
            "epoch": epoch,
            "epochs": s.epochs,
            "step": step,
            "steps": steps,
            "iteration": iteration,
            "terms": values,
            "lr": lr,
            "images_per_s": images_per_s,
            "eta_seconds": remaining,
        },
    )


__all__ = ["Position", "public_record", "train_epochs"]
