"""``shitu train``: PaddleX's ``Global.mode=train`` for the image recognition module, on JAX.

:func:`train` checks everything it can before compiling anything (the settings, :mod:`shitu.train.settings`;
the dataset with ``shitu check``'s rules; the batch / K / identity constraints; the devices; the output
folder), builds the model and its optimizer from the model's :class:`~shitu.models.spec.TrainingRecipe`,
then runs :func:`shitu.train.loop.train_epochs`: one compiled, data-parallel step (:mod:`shitu.train.step`),
Recall@k/mAP on the dataset's gallery/query every ``Train.eval_interval`` epochs (and after the last), the
best epoch by recall1 kept as a bundle, an Orbax checkpoint every ``Train.save_interval`` epochs
(:mod:`shitu.train.checkpoint`). Outputs follow PaddleX (:mod:`shitu.train.rundir`).

Interrupting (Ctrl-C or SIGTERM) saves a checkpoint at the current step and raises
:class:`TrainingInterrupted`; ``resume=True`` continues from the newest checkpoint and gives the same
parameters and metrics as a run that was never stopped (batches, dropout masks and the learning rate are
functions of (seed, epoch, step)). A killed process loses at most what followed its last checkpoint.

``Train.batch_size`` is the *global* batch, split over the devices of the mesh (PaddleX's is per device: for
N GPUs, multiply it by N to train as PaddleX does); the result does not depend on the device count.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu.config import Overrides
from shitu.errors import ShituError
from shitu.train import rundir
from shitu.train.compiled import CompiledSteps
from shitu.train.interrupt import TrainingInterrupted
from shitu.train.loop import Position, train_epochs
from shitu.train.record import EventFn, RunRecord, public_record
from shitu.train.settings import RESUME_FREE_KEYS, ConfigSource, TrainSettings, run_config

__all__ = ["RESUME_FREE_KEYS", "CompiledSteps", "TrainResult", "TrainingInterrupted", "train"]


@dataclass
class TrainResult:
    """What a finished run produced (also in ``OUTPUT/train_result.json``)."""

    output: Path
    model: str
    epochs: int
    iterations: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_model: Path | None
    latest_model: Path | None
    compile_seconds: float
    document: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "model": self.model,
            "epochs": self.epochs,
            "iterations": self.iterations,
            "best": self.best,
            "best_model": str(self.best_model) if self.best_model else None,
            "latest_model": str(self.latest_model) if self.latest_model else None,
            "compile_seconds": round(self.compile_seconds, 3),
            "history": self.history,
        }


def train(
    config: ConfigSource,
    *,
    overrides: Overrides = (),
    dataset_dir: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventFn | None = None,
    arch: dict[str, Any] | None = None,
    max_steps: int | None = None,
    compiled: CompiledSteps | None = None,
) -> TrainResult:
    """Train the model of ``config`` (a :class:`~shitu.config.Config`, a model name or a YAML path, with
    ``overrides`` on top) on the ShiTuRecDataset ``dataset_dir`` (default ``Global.dataset_dir``), writing
    PaddleX's outputs to ``output`` (default ``Global.output``).

    - ``pretrained``: a bundle or Paddle weights to start from (default ``Train.pretrain_weight_path``;
      null = random initialisation);
    - ``resume``: continue the run in ``output`` from its newest checkpoint with the run's own
      ``config.yaml`` (``config`` may be None; given, it must train the same model, and it and
      ``overrides`` may change only :data:`RESUME_FREE_KEYS`);
    - ``overwrite``: start afresh in a folder holding another run (it is moved aside, then deleted once the
      new run has its first checkpoint);
    - ``on_event(kind, data)``: progress for a front end (the CLI draws it): "start", "compiled", "step"
      (per iteration), "eval", "epoch" (the per-epoch record), "best", "checkpoint", "warning", "done";
    - ``arch``: extra architecture options for the model builder (e.g. ``{"scale": 0.5}``), kept in bundles;
    - ``max_steps``: stop (as an interrupt would, with a checkpoint) after this many iterations in this call
      — for tests and benchmarks;
    - ``compiled``: compiled steps to reuse from earlier calls (and to keep for later ones), see
      :class:`CompiledSteps`; None: compile afresh.

    JAX is used as configured by the caller (the CLI calls :func:`shitu.runtime.configure_jax`).
    Raises ShituError before compiling anything when the dataset, config, devices or folder are not usable
    (also for a model whose spec has no training recipe); :class:`TrainingInterrupted` after
    Ctrl-C/SIGTERM (a checkpoint was saved; ``resume=True`` continues).
    """
    emit: EventFn = on_event or (lambda kind, data: None)
    run_cfg, out_dir = run_config(config, overrides=overrides, output=output, resume=resume)
    settings = TrainSettings.from_config(
        run_cfg, output=out_dir, dataset_dir=dataset_dir, pretrained=pretrained, arch=arch
    )
    _check_dataset(settings, emit)

    import jax

    from shitu.models.spec import resolve
    from shitu.runtime.distributed import is_primary, local_device, run_on_primary
    from shitu.train.checkpoint import CheckpointStore
    from shitu.train.data import TrainLoader, read_train_samples
    from shitu.train.devices import select_devices

    devices = select_devices(settings.device)
    if settings.batch_size % len(devices):
        raise ShituError(
            f"Train.batch_size ({settings.batch_size}) must be a multiple of the number of devices ({len(devices)})",
            hint="it is the global batch, split over the devices",
        )
    samples = read_train_samples(settings.dataset_dir)
    num_classes = settings.num_classes or samples.num_classes
    if num_classes < samples.num_classes:
        raise ShituError(
            f"Train.num_classes is {num_classes} but train.txt has {samples.num_classes} classes",
            hint="leave Train.num_classes null to take the dataset's",
        )
    spec = settings.spec
    transform = resolve(spec.recipe.train_transform)(settings.input_size, tuple(spec.mean), tuple(spec.std))
    loader = TrainLoader(
        samples,
        transform=transform,
        input_size=settings.input_size,
        batch_size=settings.batch_size,
        sample_per_id=settings.sample_per_id,
        sampler=settings.sampler,
        seed=settings.seed,
        num_workers=settings.num_workers,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        drop_last=settings.sampler != "pk",
    )
    if loader.steps_per_epoch < 1:
        raise ShituError(
            f"train.txt has {len(samples.paths)} images, fewer than one batch of {settings.batch_size}",
            hint="lower -o Train.batch_size",
        )
    train_list = settings.dataset_dir / "train.txt"
    train_list_sha = hashlib.sha256(train_list.read_bytes()).hexdigest() if train_list.is_file() else ""

    # -- the output folder ---------------------------------------------------------------------------
    # Process 0 alone locks, checks and prepares the folder; the others follow its verdict (they would
    # otherwise see the lock taken, or the files process 0 has just written, and refuse).
    with contextlib.ExitStack() as folder_lock:

        def prepare_folder() -> Path | None:
            out_dir.mkdir(parents=True, exist_ok=True)
            folder_lock.enter_context(rundir.run_lock(out_dir))
            existing = rundir.existing_run_entries(out_dir)
            if existing and not resume and not overwrite:
                raise ShituError(
                    f"this folder holds another training run ({', '.join(existing[:3])})",
                    path=out_dir,
                    hint="--resume continues it, --overwrite replaces it, or choose another --output",
                )
            if resume and not (out_dir / rundir.CHECKPOINTS).is_dir():
                raise ShituError("nothing to resume: the run in this folder has no checkpoint yet", path=out_dir)
            rundir.remove_staging_leftovers(out_dir)  # what a kill during an atomic write left; we hold the lock
            return rundir.move_previous_run(out_dir) if (overwrite and not resume and existing) else None

        aside = run_on_primary(prepare_folder, what="preparing the output folder")
        with CheckpointStore(out_dir / rundir.CHECKPOINTS, keep=settings.checkpoints_to_keep) as store:
            record = RunRecord(
                settings,
                store=store,
                loader=loader,
                num_classes=num_classes,
                train_list_sha=train_list_sha,
                primary=is_primary(),
                emit=emit,
                previous_run=aside,
            )
            try:
                with jax.default_device(local_device(devices)):
                    return _run(
                        settings,
                        record=record,
                        loader=loader,
                        samples=samples,
                        devices=devices,
                        num_classes=num_classes,
                        resume=resume,
                        max_steps=max_steps,
                        compiled=compiled if compiled is not None else CompiledSteps(),
                    )
            finally:
                record.close()


def _check_dataset(settings: TrainSettings, emit: EventFn) -> None:
    """``shitu check``'s rules on the dataset (nothing written); ShituError with the first error if it fails."""
    from shitu.data.check import check_dataset

    config = settings.config
    dataset_dir = settings.dataset_dir
    result = check_dataset(
        dataset_dir,
        output=None,
        max_image_pixels=config.get("CheckDataset.max_image_pixels"),
        num_workers=config.get("CheckDataset.num_workers"),
    )
    if not result.check_pass:
        errors = result.errors
        raise ShituError(
            f"the dataset does not pass the check: {errors[0]}",
            hint=f"{len(errors) - 1} more errors; run 'shitu check {dataset_dir}' for the report"
            if len(errors) > 1
            else f"run 'shitu check {dataset_dir}' for the report",
        )
    if result.warnings:
        first = result.warnings[0]
        emit("warning", {"message": f"the dataset check found {len(result.warnings)} warnings, e.g. {first}"})


def _build(
    settings: TrainSettings,
    *,
    num_classes: int,
    steps_per_epoch: int,
    devices: list[Any],
    compiled: CompiledSteps,
    record: RunRecord,
    pretrained: Path | None,
) -> tuple[Any, Any]:
    """The model (training mode, from ``pretrained`` when given) and the compiled-step owner of its recipe."""
    import json
    from functools import partial

    from shitu.models.spec import resolve
    from shitu.train.optim import make_optimizer, parameter_groups
    from shitu.train.step import TrainStep
    from shitu.weights.pretrained import load_pretrained

    spec, recipe = settings.spec, settings.spec.recipe
    model = spec.build(num_classes, seed=settings.seed, **settings.arch)
    if pretrained is not None:
        load_pretrained(model, pretrained, spec=spec, emit=lambda kind, data: record.warn(data["message"]))
    key = (
        "step",
        spec.name,
        json.dumps(settings.arch, sort_keys=True),
        num_classes,
        recipe,
        settings.weight_decay,
        settings.learning_rate,
        settings.warmup_epochs,
        settings.epochs,
        steps_per_epoch,
        settings.seed,
        settings.precision,
        tuple((d.platform, d.id) for d in devices),
        (settings.batch_size, settings.input_size),
    )

    def make() -> Any:
        tx, schedule = make_optimizer(
            model,
            learning_rate=settings.learning_rate,
            epochs=settings.epochs,
            warmup_epochs=settings.warmup_epochs,
            steps_per_epoch=steps_per_epoch,
            weight_decay=settings.weight_decay,
            groups=parameter_groups(model, recipe),
        )
        loss = partial(resolve(recipe.loss), train=True)
        return TrainStep(
            model,
            loss_fn=loss,
            tx=tx,
            schedule=schedule,
            devices=devices,
            seed=settings.seed,
            precision=settings.precision,
        )

    return model, compiled.get(key, make)


def _run(
    settings: TrainSettings,
    *,
    record: RunRecord,
    loader: Any,
    samples: Any,
    devices: list[Any],
    num_classes: int,
    resume: bool,
    max_steps: int | None,
    compiled: CompiledSteps,
) -> TrainResult:
    """Build, restore (``resume``), announce, compile, train the epochs, write the final outputs."""
    from shitu.train.evaluator import EpochEvaluator

    s = settings
    steps_per_epoch = int(loader.steps_per_epoch)
    model, step_owner = _build(
        s,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        devices=devices,
        compiled=compiled,
        record=record,
        pretrained=None if resume else s.pretrained,
    )
    state = step_owner.initial_state(model)
    start = Position()
    if resume:
        state, meta = record.restore(step_owner.place, state)
        start = Position(int(meta["iteration"]), int(meta["epoch_index"]), int(meta["step"]), meta.get("partial"))
        if meta.get("loader") is not None:
            start.epoch_index, start.step = loader.restore_position(meta["loader"])
        record.history = list(meta.get("history") or [])
        record.best = meta.get("best")
        if start.epoch_index >= s.epochs and record.recorded_done_everywhere():
            raise ShituError(
                f"nothing to resume: the run in this folder is complete ({s.epochs} epochs)", path=s.output
            )
    record.read_summaries()
    record.write_start(samples.label_map)

    info = {
        "model": s.spec.name,
        "epochs": s.epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": s.batch_size,
        "input_size": s.input_size,
        "precision": s.precision,
        "num_classes": num_classes,
        "train_images": len(samples.paths),
        "devices": len(devices),
        "platform": devices[0].platform,
        "resumed_at": {"epoch": start.epoch_index + 1, "step": start.step} if resume else None,
        "output": str(s.output),
    }
    record.log.write(
        f"{'Resume' if resume else 'Start'} training {s.spec.name} on {s.dataset_dir}: "
        f"{info['train_images']} images, {num_classes} classes, {s.epochs} epochs × "
        f"{steps_per_epoch} iterations, batch {s.batch_size}, input {s.input_size}, precision {s.precision}, "
        f"{len(devices)} {info['platform']} device(s)"
    )
    record.emit("start", info)

    done = step_owner.compile(state, (s.batch_size, s.input_size, s.input_size, 3))
    record.compile_seconds = done.seconds
    record.log.write(
        "reused the training step compiled earlier in this process"
        if done.reused
        else f"compiled the training step in {done.seconds:.1f}s"
    )
    record.emit("compiled", {"seconds": done.seconds, "reused": done.reused})

    evaluator = EpochEvaluator(
        s, model, num_classes=num_classes, devices=devices, compiled=compiled, log=record.log.write, emit=record.emit
    )
    state, iteration = train_epochs(
        state,
        step_owner=step_owner,
        loader=loader,
        record=record,
        evaluator=evaluator,
        start=start,
        max_steps=max_steps,
    )

    evaluator.load(state)  # the final weights (already there unless a finished run was only finalised)
    latest = None
    if record.primary:
        last = record.history[-1] if record.history else {}
        metrics = {k: last.get(k) for k in ("recall1", "recall5", "mAP")}
        latest = evaluator.save_bundle(s.output / rundir.LATEST_MODEL, {"epoch": last.get("epoch"), "metrics": metrics})
    document = record.write_result(done=True, latest=latest)
    record.log.write(f"Training done: best recall1 {record.best['recall1'] if record.best else None}")
    result = TrainResult(
        output=s.output,
        model=s.spec.name,
        epochs=len(record.history),
        iterations=iteration,
        history=[public_record(r) for r in record.history],
        best=record.best,
        best_model=s.output / rundir.BEST_MODEL if record.best else None,
        latest_model=latest,
        compile_seconds=record.compile_seconds,
        document=document,
    )
    record.emit("done", result.to_json())
    return result
