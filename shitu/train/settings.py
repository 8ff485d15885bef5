"""The settings of a training run: which config it uses (a resumed run keeps its own) and every value
training reads from it, validated once into a :class:`TrainSettings`.

Nothing here compiles or touches the output folder (but for reading a resumed run's ``config.yaml``), so
every refusal comes before any work.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu.config import Config, Overrides, load_config
from shitu.errors import ShituError
from shitu.train import rundir
from shitu.train.precision import check_precision

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

SAMPLERS = ("pk", "shuffle")

ConfigSource = Config | str | os.PathLike[str] | None


def _is_model_name(source: Any) -> bool:
    return isinstance(source, str) and "/" not in source and not source.endswith((".yaml", ".yml"))


def run_config(
    config: ConfigSource, *, overrides: Overrides = (), output: str | os.PathLike[str] | None, resume: bool
) -> tuple[Config, Path]:
    """``(config, output folder)`` of a run: ``config`` (a Config, a model name or a YAML path) with
    ``overrides`` on top, and ``output`` (default ``Global.output``).

    With ``resume`` the run's own ``OUTPUT/config.yaml`` is the config; ``config``, if given, must train the
    same model, and it and ``overrides`` may change only :data:`RESUME_FREE_KEYS` (a located ShituError
    lists the others). A model name given to resume is only checked against the run's model.
    """
    given: Config | None = None
    if config is not None and not (resume and _is_model_name(config)):
        given = (config if isinstance(config, Config) else load_config(config)).with_overrides(overrides)
    if not resume:
        if given is None:
            raise ShituError("no config given (a model name, a YAML path or a Config)")
        folder = output if output is not None else given.get("Global.output")
        return given, Path(folder).absolute()

    if output is None:
        if given is None:
            raise ShituError("give the folder of the run to resume", hint="--output FOLDER")
        output = given.get("Global.output")
    folder = Path(output).absolute()
    saved_path = folder / rundir.CONFIG
    if not saved_path.is_file():
        raise ShituError("nothing to resume: no training run in this folder (no config.yaml)", path=folder)
    saved = load_config(saved_path)
    wanted_model = config if _is_model_name(config) else given.get("Global.model") if given is not None else None
    if wanted_model is not None and wanted_model != saved.get("Global.model"):
        raise ShituError(f"the run in this folder trains {saved.get('Global.model')}, not {wanted_model}", path=folder)
    if given is None:
        given = saved.with_overrides(overrides)
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
    resumed = saved.with_overrides({k: v for k, v in free.items() if v is not None and saved.get(k, None) is not None})
    return resumed, folder


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run reads from its config and arguments, checked. ``spec`` is the registered model
    (it has a training recipe); ``sampler`` and ``weight_decay`` are the config's or else the recipe's;
    ``precision`` is ``Train.precision`` (``fp32`` or ``bf16``, see :mod:`shitu.train.precision`).
    ``config`` is the run's config with ``Global.dataset_dir``/``Global.output`` made absolute (what
    ``config.yaml`` and the bundles record)."""

    config: Config
    spec: Any
    output: Path
    dataset_dir: Path
    pretrained: Path | None
    device: str
    seed: int
    epochs: int
    batch_size: int
    input_size: int
    learning_rate: float
    warmup_epochs: float
    weight_decay: float
    sampler: str
    sample_per_id: int
    num_classes: int | None
    arch: dict[str, Any] = field(default_factory=dict)
    eval_interval: int = 1
    save_interval: int = 1
    log_interval: int = 1
    checkpoints_to_keep: int = 3
    num_workers: int = 0
    eval_batch_size: int = 64
    precision: str = "fp32"

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        output: Path,
        dataset_dir: str | os.PathLike[str] | None = None,
        pretrained: str | os.PathLike[str] | None = None,
        arch: dict[str, Any] | None = None,
    ) -> TrainSettings:
        """Read and check every training setting of ``config``; ``dataset_dir``, ``pretrained`` and ``arch``
        (extra builder options) override the config's. A ShituError names the first bad value."""
        from shitu.plugins import get_host

        spec = get_host().model(str(config.get("Global.model")))
        recipe = spec.recipe
        if recipe is None:
            raise ShituError(
                f"model {spec.name} cannot be trained: its plugin gives no training recipe (ModelSpec.recipe)"
            )
        dataset = dataset_dir if dataset_dir is not None else config.get("Global.dataset_dir")
        if dataset is None:
            raise ShituError("no dataset given (pass --dataset or -o Global.dataset_dir=...)")
        dataset_path = Path(dataset).absolute()
        if not dataset_path.is_dir():
            raise ShituError("dataset folder does not exist", path=dataset_path)
        pretrained = pretrained if pretrained is not None else config.get("Train.pretrain_weight_path")
        if isinstance(pretrained, str) and pretrained.startswith(("http://", "https://")):
            from shitu.hub import training_weights_from_url  # a URL, as in PaddleX's configs: fetched and cached

            pretrained = training_weights_from_url(spec, pretrained)
        if pretrained is not None and not Path(pretrained).exists():
            raise ShituError("pretrained weights not found", path=pretrained)

        epochs = int(config.get("Train.epochs_iters"))
        batch_size = int(config.get("Train.batch_size"))
        input_size = int(config.get("Train.input_size"))
        if epochs < 1:
            raise ShituError(f"Train.epochs_iters must be at least 1, got {epochs}")
        if batch_size < 1 or input_size < 8:
            raise ShituError(f"Train.batch_size must be ≥ 1 and Train.input_size ≥ 8, got {batch_size}, {input_size}")
        learning_rate = float(config.get("Train.learning_rate"))
        warmup = float(config.get("Train.warmup_steps"))
        if learning_rate < 0 or warmup < 0:
            raise ShituError(
                f"Train.learning_rate and Train.warmup_steps must not be negative, got {learning_rate}, {warmup}"
            )
        weight_decay = config.get("Train.weight_decay", None)
        weight_decay = float(recipe.weight_decay if weight_decay is None else weight_decay)
        if not math.isfinite(weight_decay) or weight_decay < 0:
            raise ShituError(f"Train.weight_decay must be a non-negative number, got {weight_decay}")
        sampler = config.get("Train.sampler", None) or recipe.sampler
        if sampler not in SAMPLERS:
            raise ShituError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        num_classes = config.get("Train.num_classes", None)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
            raise ShituError(f"Train.num_classes must be an integer or null, got {num_classes!r}")
        precision = check_precision(config.get("Train.precision", "fp32"))
        num_workers = int(config.get("Train.num_workers", 0))
        if num_workers < 0:
            raise ShituError(f"Train.num_workers must be ≥ 0, got {num_workers}")

        model_arch: dict[str, Any] = {}
        scale = config.get("Train.model_scale", None)
        if scale is not None and float(scale) != 1.0:
            if not 0 < float(scale) <= 4:
                raise ShituError(f"Train.model_scale must be in (0, 4], got {scale}")
            model_arch["scale"] = float(scale)
        model_arch.update(arch or {})

        return cls(
            config=config.with_overrides({"Global.dataset_dir": str(dataset_path), "Global.output": str(output)}),
            spec=spec,
            output=output,
            dataset_dir=dataset_path,
            pretrained=Path(pretrained) if pretrained is not None else None,
            device=str(config.get("Global.device")),
            seed=int(config.get("Global.seed")),
            epochs=epochs,
            batch_size=batch_size,
            input_size=input_size,
            learning_rate=learning_rate,
            warmup_epochs=warmup,
            weight_decay=weight_decay,
            sampler=str(sampler),
            sample_per_id=int(config.get("Train.sample_per_id", 4)),
            num_classes=num_classes,
            arch=model_arch,
            eval_interval=max(1, int(config.get("Train.eval_interval"))),
            save_interval=max(1, int(config.get("Train.save_interval"))),
            log_interval=max(1, int(config.get("Train.log_interval"))),
            checkpoints_to_keep=int(config.get("Train.checkpoints_to_keep", 3)),
            num_workers=num_workers,
            eval_batch_size=int(config.get("Evaluate.batch_size")),
            precision=precision,
        )
