"""``shitu train``: PaddleX's ``Global.mode=train`` for the image recognition module, on JAX.

:func:`train` checks everything it can before compiling anything (the dataset with ``shitu check``'s rules,
the batch / K / identity constraints, the devices, the output folder), then trains with one compiled,
data-parallel step (:mod:`shitu.train.step`), evaluates Recall@k/mAP on the dataset's gallery/query every
``Train.eval_interval`` epochs (and after the last), keeps the best epoch by recall1 as a bundle, and saves an
Orbax checkpoint every ``Train.save_interval`` epochs (:mod:`shitu.train.checkpoint`). Outputs follow PaddleX
(:mod:`shitu.train.rundir`).

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
import json
import math
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu.config import Config, load_config
from shitu.errors import ShituError
from shitu.train import rundir

#: ``on_event(kind, data)``: kinds "start", "compiled", "step", "eval", "epoch", "best", "checkpoint",
#: "warning", "interrupted", "done" (see :func:`train`).
EventFn = Callable[[str, dict[str, Any]], None]

CHECKPOINT_FORMAT = "shitu-train-checkpoint"
CHECKPOINT_VERSION = 1

#: Config keys that may differ when a run is resumed (they do not change what is computed).
RESUME_FREE_KEYS = frozenset(
    {
        "Global.device",
        "Global.output",
        "Global.dataset_dir",
        "Train.num_workers",
        "Train.log_interval",
        "Train.checkpoints_to_keep",
        "Train.pretrain_weight_path",
        "Evaluate.batch_size",
    }
)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after an interrupt once the checkpoint at the current step is saved."""

    def __init__(self, message: str, *, checkpoint: Path | None, epoch: int, step: int) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.step = step

    def __str__(self) -> str:
        return self.message


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


# ----------------------------------------------------------------------------------------------- helpers


def recipe_of(spec: Any) -> str:
    """The training recipe of a model spec ("pplcnet" or "clip"): :func:`shitu.train.losses.recipe_for`."""
    from shitu.train.losses import recipe_for

    return recipe_for(spec)


def select_devices(device: str) -> list[Any]:
    """The JAX devices ``Global.device`` names: ``cpu``, ``gpu`` (every GPU), ``gpu:0,1`` (those local ones)."""
    import jax

    name, _, ids = str(device).strip().lower().partition(":")
    platform = {"gpu": "gpu", "cuda": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(name)
    if platform is None:
        raise ShituError(f"Global.device must be cpu, gpu or gpu:0,1,..., got {device!r}")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise ShituError(
            f"Global.device={device!r}: JAX has no {platform.upper()} backend here",
            hint="use -o Global.device=cpu, or install jax with GPU support",
        ) from None
    if ids:
        if jax.process_count() > 1:
            raise ShituError("Global.device may not list device ids in a multi-process run")
        try:
            wanted = [int(part) for part in ids.split(",") if part.strip()]
        except ValueError:
            raise ShituError(f"Global.device: device ids must be integers, got {device!r}") from None
        local = jax.local_devices(backend=platform)
        missing = [i for i in wanted if i >= len(local) or i < 0]
        if missing or not wanted:
            raise ShituError(f"Global.device={device!r}: this machine has {len(local)} {platform} device(s)")
        devices = [local[i] for i in wanted]
    return list(devices)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _arch_for(config: Config, arch: dict[str, Any] | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    scale = config.get("Train.model_scale", None)
    if scale is not None and float(scale) != 1.0:
        if not 0 < float(scale) <= 4:
            raise ShituError(f"Train.model_scale must be in (0, 4], got {scale}")
        result["scale"] = float(scale)
    result.update(arch or {})
    return result


def _resolve_config(config: Config | str | os.PathLike[str] | None, output: Path, resume: bool) -> Config:
    """The config of the run; with ``resume``, the run's own ``config.yaml`` with the differences checked."""
    saved_path = output / rundir.CONFIG
    if resume:
        if not saved_path.is_file():
            raise ShituError("nothing to resume: no training run in this folder (no config.yaml)", path=output)
        saved = load_config(saved_path)
        if config is None:
            return saved
        given = config if isinstance(config, Config) else load_config(config)
        if given.get("Global.model") != saved.get("Global.model"):
            raise ShituError(
                f"the run in this folder trains {saved.get('Global.model')}, not {given.get('Global.model')}",
                path=output,
            )
        differences = []
        for section in ("Global", "Train"):
            for key, value in saved[section].items():
                dotted = f"{section}.{key}"
                if dotted in RESUME_FREE_KEYS:
                    continue
                other = given.get(dotted, None)
                if other != value:
                    differences.append(f"{dotted} is {value!r} in the run, {other!r} now")
        if differences:
            raise ShituError(
                "a resumed run keeps its config: " + "; ".join(differences[:4]),
                path=saved_path,
                hint="resume without those overrides, or start a new run with --overwrite or another --output",
            )
        free = {key: given.get(key, None) for key in RESUME_FREE_KEYS}
        return saved.with_overrides({k: v for k, v in free.items() if v is not None and saved.get(k, None) is not None})
    if config is None:
        raise ShituError("no config given (a model name, a YAML path or a Config)")
    return config if isinstance(config, Config) else load_config(config)


def _check_dataset(dataset_dir: Path, config: Config, emit: EventFn) -> None:
    """``shitu check``'s rules on the dataset (nothing written); ShituError with the first error if it fails."""
    from shitu.data.check import check_dataset

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


class _Prefetcher:
    """Runs ``iterator`` in a background thread, ``size`` items ahead (so decoding and augmentation overlap
    the compiled step); exceptions are re-raised in the consumer; :meth:`close` stops the thread."""

    _END = object()

    def __init__(self, iterator: Iterator[Any], size: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="shitu-train-data")
        self._thread.start()

    def _run(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put((False, exc))
            return
        self._put((True, self._END))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> Any:
        ok, item = self._queue.get()
        if not ok:
            raise item
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _StopFlag:
    """Ctrl-C / SIGTERM set a flag checked between steps (a step is never cut in half: its buffers are
    donated); a second Ctrl-C interrupts at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> bool:
        """Whether to stop now, the same answer in every process of a multi-process run (a signal reaches
        them at different steps; they must stop at the same one, or the collectives would hang)."""
        from shitu.runtime.distributed import any_process, process_count

        if process_count() == 1:
            return self.requested is not None
        if any_process(self.requested is not None) and self.requested is None:
            self.requested = "a stop in another process"
        return self.requested is not None


# ----------------------------------------------------------------------------------------------- caches

#: Compiled training steps and evaluation recognizers of recent runs in this process, by everything that
#: shapes them (model, architecture, classes, recipe and schedule, devices, batch and input size). A second
#: identical ``train`` call in one process (a resume, a test, a sweep point repeated) then skips tracing and
#: compiling; weights are never cached, only the compiled functions.
_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_CACHE_SIZE = 4


def _cached(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = make()
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


# ----------------------------------------------------------------------------------------------- pretrained


def _flat(state: Any) -> dict[str, Any]:
    import jax

    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def load_pretrained(model: Any, source: Path, *, spec: Any, emit: EventFn) -> None:
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
    state, _ = read_paddle_state(source)
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


# ----------------------------------------------------------------------------------------------- train


def train(
    config: Config | str | os.PathLike[str] | None,
    *,
    dataset_dir: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventFn | None = None,
    arch: dict[str, Any] | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train the model of ``config`` (a :class:`~shitu.config.Config`, a model name or a YAML path) on the
    ShiTuRecDataset ``dataset_dir`` (default ``Global.dataset_dir``), writing PaddleX's outputs to ``output``
    (default ``Global.output``).

    - ``pretrained``: a bundle or Paddle weights to start from (default ``Train.pretrain_weight_path``;
      null = random initialisation);
    - ``resume``: continue the run in ``output`` from its newest checkpoint (``config`` may be None: the
      run's own ``config.yaml`` is used; a given config may differ only in :data:`RESUME_FREE_KEYS`);
    - ``overwrite``: start afresh in a folder holding another run (it is moved aside, then deleted once the
      new run has its first checkpoint);
    - ``on_event(kind, data)``: progress for a front end (the CLI draws it): "start", "compiled", "step"
      (per iteration), "eval", "epoch" (the per-epoch record), "best", "checkpoint", "warning", "done";
    - ``arch``: extra architecture options for the model builder (e.g. ``{"scale": 0.5}``), kept in bundles;
    - ``max_steps``: stop (as an interrupt would, with a checkpoint) after this many iterations in this call
      — for tests and benchmarks.

    Raises ShituError before compiling anything when the dataset, config, devices or folder are not usable;
    :class:`TrainingInterrupted` after Ctrl-C/SIGTERM (a checkpoint was saved; ``resume=True`` continues).
    """
    emit: EventFn = on_event or (lambda kind, data: None)
    output_given = output
    provisional = None if config is None else (config if isinstance(config, Config) else load_config(config))
    if output_given is None:
        if provisional is None:
            raise ShituError("give an output folder to resume")
        output_given = provisional.get("Global.output")
    out_dir = Path(output_given).absolute()
    config = _resolve_config(provisional, out_dir, resume)

    # -- everything that can be checked without compiling --------------------------------------------
    from shitu.plugins import get_host
    from shitu.runtime import configure_jax
    from shitu.runtime.distributed import is_primary

    configure_jax()
    spec = get_host().model(str(config.get("Global.model")))
    recipe = recipe_of(spec)
    dataset = dataset_dir if dataset_dir is not None else config.get("Global.dataset_dir")
    if dataset is None:
        raise ShituError("no dataset given (pass --dataset or -o Global.dataset_dir=...)")
    dataset_path = Path(dataset).absolute()
    if not dataset_path.is_dir():
        raise ShituError("dataset folder does not exist", path=dataset_path)
    config = config.with_overrides({"Global.dataset_dir": str(dataset_path), "Global.output": str(out_dir)})
    _check_dataset(dataset_path, config, emit)

    epochs = int(config.get("Train.epochs_iters"))
    batch_size = int(config.get("Train.batch_size"))
    input_size = int(config.get("Train.input_size"))
    if epochs < 1:
        raise ShituError(f"Train.epochs_iters must be at least 1, got {epochs}")
    if batch_size < 1 or input_size < 8:
        raise ShituError(f"Train.batch_size must be ≥ 1 and Train.input_size ≥ 8, got {batch_size}, {input_size}")
    eval_interval = max(1, int(config.get("Train.eval_interval")))
    save_interval = max(1, int(config.get("Train.save_interval")))
    log_interval = max(1, int(config.get("Train.log_interval")))
    keep = int(config.get("Train.checkpoints_to_keep", 3))
    seed = int(config.get("Global.seed"))

    import jax

    devices = select_devices(str(config.get("Global.device")))
    if batch_size % len(devices):
        raise ShituError(
            f"Train.batch_size ({batch_size}) must be a multiple of the number of devices ({len(devices)})",
            hint="it is the global batch, split over the devices",
        )

    from shitu.train.data import TrainLoader, read_train_samples

    samples = read_train_samples(dataset_path)
    num_classes = config.get("Train.num_classes") or samples.num_classes
    if int(num_classes) < samples.num_classes:
        raise ShituError(
            f"Train.num_classes is {num_classes} but train.txt has {samples.num_classes} classes",
            hint="leave Train.num_classes null to take the dataset's",
        )
    num_classes = int(num_classes)
    sampler = str(config.get("Train.sampler", "pk" if recipe == "pplcnet" else "shuffle"))
    loader = TrainLoader(
        samples,
        recipe=recipe,
        input_size=input_size,
        mean=spec.mean,
        std=spec.std,
        batch_size=batch_size,
        sample_per_id=int(config.get("Train.sample_per_id", 4)),
        sampler=sampler,
        seed=seed,
        num_workers=int(config.get("Train.num_workers", 0)),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        drop_last=sampler != "pk",
    )
    steps_per_epoch = int(loader.steps_per_epoch)
    if steps_per_epoch < 1:
        raise ShituError(
            f"train.txt has {len(samples.paths)} images, fewer than one batch of {batch_size}",
            hint="lower -o Train.batch_size",
        )
    model_arch = _arch_for(config, arch)
    pretrained_path = pretrained if pretrained is not None else config.get("Train.pretrain_weight_path")
    if pretrained_path is not None and not Path(pretrained_path).exists():
        raise ShituError("pretrained weights not found", path=pretrained_path)
    train_list_sha = _sha256(dataset_path / "train.txt") if (dataset_path / "train.txt").is_file() else ""

    # -- the output folder ---------------------------------------------------------------------------
    # Process 0 alone locks, checks and prepares the folder; the others follow its verdict (they would
    # otherwise see the lock taken, or the files process 0 has just written, and refuse).
    from shitu.runtime.distributed import local_device, run_on_primary

    primary = is_primary()
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
        from shitu.train.checkpoint import CheckpointStore

        with CheckpointStore(out_dir / rundir.CHECKPOINTS, keep=keep) as store:
            session = _Session(
                config=config,
                spec=spec,
                recipe=recipe,
                out_dir=out_dir,
                dataset_path=dataset_path,
                samples=samples,
                loader=loader,
                devices=devices,
                num_classes=num_classes,
                arch=model_arch,
                store=store,
                emit=emit,
                primary=primary,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                batch_size=batch_size,
                input_size=input_size,
                eval_interval=eval_interval,
                save_interval=save_interval,
                log_interval=log_interval,
                seed=seed,
                train_list_sha=train_list_sha,
                previous_run=aside,
            )
            try:
                with jax.default_device(local_device(devices)):
                    return session.run(
                        resume=resume,
                        pretrained=Path(pretrained_path) if pretrained_path is not None else None,
                        max_steps=max_steps,
                    )
            finally:
                session.close()


class _Session:
    """One call of :func:`train` after the checks: model, state, loop, outputs."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)
        self.log = rundir.TrainLog(self.out_dir / rundir.TRAIN_LOG if self.primary else None)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.compile_seconds = 0.0
        self._previous_runs_deleted = False
        self._summaries: dict[int, dict[str, Any] | None] = {}  # checkpoint iteration → what train_result needs

    def close(self) -> None:
        self.log.close()

    # -- events and logs ---------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        self.log.write(message, level="WARNING")
        self.emit("warning", {"message": message})

    # -- setup -------------------------------------------------------------------------------------
    def _build(self, pretrained: Path | None) -> tuple[Any, Any]:
        """The model (training mode) and the compiled-step owner."""
        from functools import partial

        from shitu.train.losses import recognition_loss
        from shitu.train.optim import make_optimizer
        from shitu.train.step import TrainStep

        model = self.spec.build(self.num_classes, seed=self.seed, **self.arch)
        if pretrained is not None:
            load_pretrained(model, pretrained, spec=self.spec, emit=lambda kind, data: self.warn(data["message"]))
        learning_rate = float(self.config.get("Train.learning_rate"))
        warmup = float(self.config.get("Train.warmup_steps"))
        key = (
            "step",
            self.spec.name,
            json.dumps(self.arch, sort_keys=True),
            self.num_classes,
            self.recipe,
            learning_rate,
            warmup,
            self.epochs,
            self.steps_per_epoch,
            self.seed,
            tuple((d.platform, d.id) for d in self.devices),
            (self.batch_size, self.input_size),
        )

        def make() -> Any:
            tx, schedule = make_optimizer(
                model,
                recipe=self.recipe,
                learning_rate=learning_rate,
                epochs=self.epochs,
                warmup_epochs=warmup,
                steps_per_epoch=self.steps_per_epoch,
            )
            return TrainStep(
                model,
                loss_fn=partial(recognition_loss, self.recipe),
                tx=tx,
                schedule=schedule,
                devices=self.devices,
                seed=self.seed,
            )

        return model, _cached(key, make)

    def _meta(self, *, iteration: int, epoch_index: int, step: int, partial: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self.spec.name,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
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

    def _restore(self, step_owner: Any, state: Any) -> tuple[Any, dict[str, Any]]:
        from shitu.train.checkpoint import abstract_like

        latest = self.store.latest()
        if latest is None:
            raise ShituError("nothing to resume: no complete checkpoint", path=self.store.directory)
        meta = self.store.read_meta(latest)
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise ShituError("not a shitu training checkpoint", path=self.store.path_of(latest))
        for key, now in (
            ("model", self.spec.name),
            ("num_classes", self.num_classes),
            ("arch", self.arch),
            ("input_size", self.input_size),
            ("batch_size", self.batch_size),
            ("seed", self.seed),
        ):
            if meta.get(key) != now:
                raise ShituError(
                    f"cannot resume: the checkpoint has {key} {meta.get(key)!r}, this run {now!r}",
                    path=self.store.path_of(latest),
                )
        if meta.get("train_list_sha256") != self.train_list_sha:
            raise ShituError(
                "cannot resume: train.txt changed since the run started",
                path=self.dataset_path / "train.txt",
                hint="start a new run with --overwrite",
            )
        restored = self.store.restore(latest, abstract_like(state))
        return step_owner.place(restored.state), restored.meta

    def _recorded_done(self) -> bool:
        """Whether train_result.json already says the run finished (a checkpoint after the last epoch can
        precede it: then resuming only writes the final outputs)."""
        try:
            return bool(json.loads((self.out_dir / rundir.TRAIN_RESULT).read_text(encoding="utf-8")).get("done_flag"))
        except (OSError, ValueError):
            return False

    def _recorded_done_everywhere(self) -> bool:
        """:meth:`_recorded_done` as process 0 reads it (it rewrites the file soon after), in every process."""
        from shitu.runtime.distributed import broadcast_json

        return bool(broadcast_json(self._recorded_done() if self.primary else False))

    # -- the run -----------------------------------------------------------------------------------
    def run(self, *, resume: bool, pretrained: Path | None, max_steps: int | None) -> TrainResult:
        import jax
        import numpy as np

        model, step_owner = self._build(None if resume else pretrained)
        state = step_owner.initial_state(model)
        iteration, epoch_index, start_step = 0, 0, 0
        partial: dict[str, Any] | None = None
        if resume:
            state, meta = self._restore(step_owner, state)
            iteration = int(meta["iteration"])
            epoch_index, start_step = int(meta["epoch_index"]), int(meta["step"])
            if hasattr(self.loader, "restore_position") and meta.get("loader") is not None:
                epoch_index, start_step = self.loader.restore_position(meta["loader"])
            self.history = list(meta.get("history") or [])
            self.best = meta.get("best")
            partial = meta.get("partial")
            if epoch_index >= self.epochs and self._recorded_done_everywhere():
                raise ShituError(
                    f"nothing to resume: the run in this folder is complete ({self.epochs} epochs)",
                    path=self.out_dir,
                )
        for existing in self.store.iterations():  # every process reads them: an Orbax restore is collective
            self._summary(existing)
        if self.primary:
            from shitu.fileio import atomic_write_text

            atomic_write_text(self.out_dir / rundir.CONFIG, self.config.to_yaml())
            rundir.write_label_dict(self.out_dir / rundir.LABEL_DICT, dict(self.samples.label_map))
            self._write_result(done=False)

        info = {
            "model": self.spec.name,
            "recipe": self.recipe,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.batch_size,
            "input_size": self.input_size,
            "num_classes": self.num_classes,
            "train_images": len(self.samples.paths),
            "devices": len(self.devices),
            "platform": self.devices[0].platform,
            "resumed_at": {"epoch": epoch_index + 1, "step": start_step} if resume else None,
            "output": str(self.out_dir),
        }
        self.log.write(
            f"{'Resume' if resume else 'Start'} training {self.spec.name} on {self.dataset_path}: "
            f"{info['train_images']} images, {self.num_classes} classes, {self.epochs} epochs × "
            f"{self.steps_per_epoch} iterations, batch {self.batch_size}, input {self.input_size}, "
            f"{len(self.devices)} {info['platform']} device(s)"
        )
        self.emit("start", info)

        compiled = step_owner.compile(state, (self.batch_size, self.input_size, self.input_size, 3))
        self.compile_seconds = compiled.seconds
        self.log.write(
            "reused the training step compiled earlier in this process"
            if compiled.reused
            else f"compiled the training step in {compiled.seconds:.1f}s"
        )
        self.emit("compiled", {"seconds": compiled.seconds, "reused": compiled.reused})

        evaluator = _Evaluator(self, model)
        steps_done_here = 0
        with _StopFlag() as stop:
            while epoch_index < self.epochs:
                epoch = epoch_index + 1
                sums: dict[str, float] = dict((partial or {}).get("sums") or {})
                count = int((partial or {}).get("count") or 0)
                seconds = float((partial or {}).get("seconds") or 0.0)
                lr = float((partial or {}).get("lr") or 0.0)
                partial = None
                batches = _Prefetcher(
                    step_owner.shard_batch(batch["images"], batch["labels"])
                    for batch in self.loader.epoch(epoch_index, start_step)
                )
                step = start_step
                try:
                    tick = time.perf_counter()
                    for images, labels in batches:
                        state, metrics = step_owner(state, images, labels, iteration)
                        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        now = time.perf_counter()
                        seconds += now - tick
                        tick = now
                        iteration += 1
                        step += 1
                        steps_done_here += 1
                        count += 1
                        lr = values.pop("lr")
                        for name, value in values.items():
                            sums[name] = sums.get(name, 0.0) + value
                        if not np.isfinite(values.get("loss", 0.0)):
                            raise ShituError(
                                f"the loss became {values.get('loss')} at epoch {epoch}, iteration {step}",
                                hint="lower -o Train.learning_rate",
                            )
                        self._step_event(epoch, step, values, lr, seconds, count, iteration)
                        if stop.agreed() or (max_steps is not None and steps_done_here >= max_steps):
                            if step < self.steps_per_epoch:
                                self._interrupt(
                                    state,
                                    iteration=iteration,
                                    epoch_index=epoch_index,
                                    step=step,
                                    partial={"sums": sums, "count": count, "seconds": seconds, "lr": lr},
                                    reason=stop.requested or f"max_steps={max_steps}",
                                )
                            break
                finally:
                    batches.close()
                if step < self.steps_per_epoch:
                    continue  # pragma: no cover - _interrupt raised
                # -- end of epoch -----------------------------------------------------------------
                averages = {name: total / max(count, 1) for name, total in sums.items()}
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "loss": averages.get("loss"),
                    "terms": {k: v for k, v in averages.items() if k != "loss"},
                    "lr": lr,
                    "images_per_s": count * self.batch_size / seconds if seconds > 0 else None,
                    "recall1": None,
                    "recall5": None,
                    "mAP": None,
                    "seconds": seconds,
                }
                self.log.write(f"[Train][Epoch {epoch}/{self.epochs}][Avg]{rundir.format_terms(averages)}")
                if epoch % self.eval_interval == 0 or epoch == self.epochs:
                    metrics = evaluator.evaluate(state, epoch)
                    record.update(metrics)
                    if self.best is None or metrics["recall1"] > self.best["recall1"]:
                        evaluator.save_best(epoch, metrics)
                    assert self.best is not None
                    self.log.write(f"[Eval][Epoch {epoch}][best metric: {self.best['recall1']}]")
                self.history.append(record)
                epoch_index += 1
                start_step = 0
                if epoch % self.save_interval == 0 or epoch == self.epochs:
                    self._save(state, iteration=iteration, epoch_index=epoch_index, step=0, partial=None)
                if self.primary:
                    self._write_result(done=False)
                    rundir.plot_curves(self.out_dir / rundir.CURVES, self.history)
                self.emit("epoch", self._public_record(record))
                stopping = stop.agreed() or (max_steps is not None and steps_done_here >= max_steps)
                if stopping and epoch_index < self.epochs:
                    self._interrupt(
                        state,
                        iteration=iteration,
                        epoch_index=epoch_index,
                        step=0,
                        partial=None,
                        reason=stop.requested or f"max_steps={max_steps}",
                        saved=epoch % self.save_interval == 0,
                    )

        evaluator.load(state)  # the final weights (already there unless a finished run was only finalised)
        latest = evaluator.save_latest(self.history[-1] if self.history else {})
        document = self._write_result(done=True, latest=latest)
        self.log.write(f"Training done: best recall1 {self.best['recall1'] if self.best else None}")
        result = TrainResult(
            output=self.out_dir,
            model=self.spec.name,
            epochs=len(self.history),
            iterations=iteration,
            history=[self._public_record(r) for r in self.history],
            best=self.best,
            best_model=self.out_dir / rundir.BEST_MODEL if self.best else None,
            latest_model=latest,
            compile_seconds=self.compile_seconds,
            document=document,
        )
        self.emit("done", result.to_json())
        return result

    @staticmethod
    def _public_record(record: dict[str, Any]) -> dict[str, Any]:
        """The per-epoch JSON line: epoch, loss, each term, lr, images_per_s, recall1, recall5, mAP, seconds."""
        row = {"epoch": record["epoch"], "loss": record["loss"], **record.get("terms", {})}
        for key in ("lr", "images_per_s", "recall1", "recall5", "mAP", "seconds"):
            row[key] = record.get(key)
        return row

    def _step_event(
        self, epoch: int, step: int, values: dict[str, float], lr: float, seconds: float, count: int, iteration: int
    ) -> None:
        per_step = seconds / max(count, 1)
        remaining = (self.epochs * self.steps_per_epoch - iteration) * per_step
        images_per_s = self.batch_size / per_step if per_step > 0 else 0.0
        if step % self.log_interval == 0 or step == self.steps_per_epoch:
            self.log.write(
                f"[Train][Epoch {epoch}/{self.epochs}][Iter: {step - 1}/{self.steps_per_epoch}]lr(Cosine): "
                f"{lr:.8f}, {rundir.format_terms(values)}, batch_cost: {per_step:.5f}s, "
                f"ips: {images_per_s:.5f} samples/s, eta: {rundir.format_eta(remaining)}"
            )
        self.emit(
            "step",
            {
                "epoch": epoch,
                "epochs": self.epochs,
                "step": step,
                "steps": self.steps_per_epoch,
                "iteration": iteration,
                "terms": values,
                "lr": lr,
                "images_per_s": images_per_s,
                "eta_seconds": remaining,
            },
        )

    def _save(self, state: Any, *, iteration: int, epoch_index: int, step: int, partial: Any) -> Path:
        meta = self._meta(iteration=iteration, epoch_index=epoch_index, step=step, partial=partial)
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

    def _interrupt(
        self,
        state: Any,
        *,
        iteration: int,
        epoch_index: int,
        step: int,
        partial: Any,
        reason: str,
        saved: bool = False,
    ) -> None:
        path = (
            self.store.path_of(iteration)
            if saved
            else self._save(state, iteration=iteration, epoch_index=epoch_index, step=step, partial=partial)
        )
        if self.primary:
            self._write_result(done=False)
        where = f"epoch {epoch_index + 1}, iteration {step}/{self.steps_per_epoch}"
        message = f"training stopped ({reason}) at {where}; checkpoint saved, continue with --resume"
        self.log.write(message)
        self.emit("interrupted", {"reason": reason, "checkpoint": str(path), "epoch": epoch_index + 1, "step": step})
        raise TrainingInterrupted(message, checkpoint=path, epoch=epoch_index + 1, step=step)

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

    def _write_result(self, *, done: bool, latest: Path | None = None) -> dict[str, Any]:
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
            model_name=self.spec.name,
            done=done,
            last=last,
            best=best,
            extra={
                "dataset_dir": str(self.dataset_path),
                "epochs": self.epochs,
                "epochs_done": len(self.history),
                "history": [self._public_record(r) for r in self.history],
                "curves": rundir.CURVES if (self.out_dir / rundir.CURVES).exists() or self.history else "",
                "compile_seconds": round(self.compile_seconds, 3),
            },
        )
        if self.primary:
            rundir.write_train_result(self.out_dir, document)
        return document


class _Evaluator:
    """Per-epoch evaluation with one Recognizer whose Embedder gets the current weights each time (the
    eval-mode forward is compiled once), and the bundles written from those weights."""

    def __init__(self, session: _Session, model: Any) -> None:
        from flax import nnx

        from shitu.embed.recognizer import Recognizer
        from shitu.runtime.distributed import local_device

        self.session = session
        here = local_device(session.devices)
        key = (
            "eval",
            session.spec.name,
            json.dumps(session.arch, sort_keys=True),
            session.num_classes,
            session.input_size,
            (here.platform, here.id),
        )

        def make() -> Any:
            # A separate eval-mode copy of the model: the Embedder puts its model in eval mode and splits it.
            graphdef, state = nnx.split(model)
            copy = nnx.merge(graphdef, state, copy=True)
            copy.eval()
            return Recognizer(session.spec, copy, num_classes=session.num_classes, input_size=session.input_size)

        self.recognizer = _cached(key, make)
        self.recognizer.config = session.config
        self.model = self.recognizer.model

    def load(self, state: Any) -> None:
        from flax import nnx

        from shitu.runtime.distributed import local_copy, local_device

        device = local_device(self.session.devices)
        nnx.update(self.model, local_copy(state["params"], device), local_copy(state["batch_stats"], device))
        self.recognizer.embedder.set_state(nnx.state(self.model))

    def evaluate(self, state: Any, epoch: int) -> dict[str, float]:
        from shitu.evaluation.evaluate import evaluate_dataset

        session = self.session
        self.load(state)
        started = time.perf_counter()
        result = evaluate_dataset(
            self.recognizer, session.dataset_path, batch_size=int(session.config.get("Evaluate.batch_size"))
        )
        metrics = result.metrics
        values = {
            "recall1": float(metrics.recall[1]),
            "recall5": float(metrics.recall[5]),
            "mAP": float(metrics.mAP),
        }
        values = {k: (v if math.isfinite(v) else 0.0) for k, v in values.items()}
        seconds = time.perf_counter() - started
        session.log.write(
            f"[Eval][Epoch {epoch}][Avg]recall1: {values['recall1']:.5f}, recall5: {values['recall5']:.5f}, "
            f"mAP: {values['mAP']:.5f}"
        )
        session.emit("eval", {"epoch": epoch, **values, "seconds": seconds})
        return values

    def _bundle(self, path: Path, extra: dict[str, Any]) -> Path:
        """Write the evaluation model as a bundle (process 0 only: in a multi-process run it writes alone)."""
        from shitu.models.bundle import save_bundle

        session = self.session
        return save_bundle(
            path,
            spec=session.spec,
            model=self.model,
            num_classes=session.num_classes,
            config=session.config,
            arch=session.arch,
            extra={
                "input_size": session.input_size,
                "trained_on": str(session.dataset_path),
                "train_output": str(session.out_dir),
                **extra,
            },
            single_process=True,
        )

    def save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        """The weights last given to :meth:`evaluate` become ``best_model/``."""
        session = self.session
        session.best = {"epoch": epoch, **metrics}
        if session.primary:
            self._bundle(session.out_dir / rundir.BEST_MODEL, {"epoch": epoch, "metrics": metrics})
        session.log.write(f"Already save model in {session.out_dir / rundir.BEST_MODEL}")
        session.emit("best", {"epoch": epoch, **metrics, "path": str(session.out_dir / rundir.BEST_MODEL)})

    def save_latest(self, record: dict[str, Any]) -> Path | None:
        """The weights last given to :meth:`evaluate` (the final epoch's: it is always evaluated) as
        ``latest_model/``."""
        session = self.session
        if not session.primary:
            return None
        metrics = {k: record.get(k) for k in ("recall1", "recall5", "mAP")}
        return self._bundle(session.out_dir / rundir.LATEST_MODEL, {"epoch": record.get("epoch"), "metrics": metrics})
