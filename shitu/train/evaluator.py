"""Evaluation during training: Recall@1/5 and mAP on the dataset's gallery/query after an epoch, and the
bundles (``best_model/``, ``latest_model/``) written from the weights last evaluated."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shitu.train.compiled import CompiledSteps
from shitu.train.settings import TrainSettings


class EpochEvaluator:
    """One Recognizer on an eval-mode copy of the model being trained; each :meth:`load` gives it the
    current weights (its eval-mode forward is compiled once, shared through ``compiled``).

    ``log(text)`` writes a line of the run's log, ``emit(kind, data)`` reports an "eval" event.
    """

    def __init__(
        self,
        settings: TrainSettings,
        model: Any,
        *,
        num_classes: int,
        devices: Sequence[Any],
        compiled: CompiledSteps,
        log: Callable[[str], None],
        emit: Callable[[str, dict[str, Any]], None],
    ) -> None:
        import json

        from flax import nnx

        from shitu.embed.recognizer import Recognizer
        from shitu.runtime.distributed import local_device

        self.settings = settings
        self.num_classes = num_classes
        self.devices = devices
        self.log = log
        self.emit = emit
        here = local_device(devices)
        key = (
            "eval",
            settings.spec.name,
            json.dumps(settings.arch, sort_keys=True),
            num_classes,
            settings.input_size,
            (here.platform, here.id),
        )

        def make() -> Any:
            # A separate eval-mode copy of the model: the Embedder puts its model in eval mode and splits it.
            graphdef, state = nnx.split(model)
            copy = nnx.merge(graphdef, state, copy=True)
            copy.eval()
            return Recognizer(settings.spec, copy, num_classes=num_classes, input_size=settings.input_size)

        self.recognizer = compiled.get(key, make)
        self.recognizer.config = settings.config
        self.model = self.recognizer.model

    def load(self, state: dict[str, Any]) -> None:
        """Give the evaluation model the parameters and statistics of the training ``state``."""
        from flax import nnx

        from shitu.runtime.distributed import local_copy, local_device

        device = local_device(self.devices)
        nnx.update(self.model, local_copy(state["params"], device), local_copy(state["batch_stats"], device))
        self.recognizer.embedder.set_state(nnx.state(self.model))

    def evaluate(self, state: dict[str, Any], epoch: int) -> dict[str, float]:
        """``{"recall1", "recall5", "mAP"}`` of ``state``'s weights (non-finite values read as 0)."""
        from shitu.evaluation.evaluate import evaluate_dataset

        self.load(state)
        started = time.perf_counter()
        result = evaluate_dataset(self.recognizer, self.settings.dataset_dir, batch_size=self.settings.eval_batch_size)
        metrics = result.metrics
        values = {"recall1": float(metrics.recall[1]), "recall5": float(metrics.recall[5]), "mAP": float(metrics.mAP)}
        values = {k: (v if math.isfinite(v) else 0.0) for k, v in values.items()}
        seconds = time.perf_counter() - started
        self.log(
            f"[Eval][Epoch {epoch}][Avg]recall1: {values['recall1']:.5f}, recall5: {values['recall5']:.5f}, "
            f"mAP: {values['mAP']:.5f}"
        )
        self.emit("eval", {"epoch": epoch, **values, "seconds": seconds})
        return values

    def save_bundle(self, path: Path, extra: dict[str, Any]) -> Path:
        """Write the weights last given to :meth:`load` as a bundle (call in process 0 only: in a
        multi-process run it writes alone)."""
        from shitu.models.bundle import save_bundle

        settings = self.settings
        return save_bundle(
            path,
            spec=settings.spec,
            model=self.model,
            num_classes=self.num_classes,
            config=settings.config,
            arch=settings.arch,
            extra={
                "input_size": settings.input_size,
                "trained_on": str(settings.dataset_dir),
                "train_output": str(settings.output),
                **extra,
            },
            single_process=True,
        )
