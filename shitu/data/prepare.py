"""Library entry points that combine a config with the data functions (what the commands call)."""

from __future__ import annotations

import os
from pathlib import Path

from shitu.config import Config
from shitu.data.check import CheckResult, ProgressFn, check_dataset
from shitu.data.formats import SplitOptions
from shitu.errors import ShituError


def check_dataset_with_config(
    dataset: str | os.PathLike[str] | None,
    config: Config,
    *,
    output: str | os.PathLike[str] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[CheckResult, list[str]]:
    """PaddleX's check_dataset mode: convert (if CheckDataset.convert.enable), split (if
    CheckDataset.split.enable), then check. Returns the check result and a line per action taken."""
    dataset = dataset if dataset is not None else config.get("Global.dataset_dir")
    if dataset is None:
        raise ShituError("no dataset given (pass DATASET or -o Global.dataset_dir=...)")
    actions: list[str] = []
    if config.get("CheckDataset.convert.enable") or config.get("CheckDataset.split.enable"):
        from shitu.data.split import refuse_bundled_demo

        refuse_bundled_demo(Path(dataset))  # before any option is checked: the clearest message first
    if config.get("CheckDataset.convert.enable"):
        from shitu.data.convert import convert_dataset

        name, written, _ = convert_dataset(dataset, source_format=config.get("CheckDataset.convert.src_dataset_type"))
        actions.append(f"converted from {name}: {written.counts}")
    if config.get("CheckDataset.split.enable"):
        from shitu.data.split import split_dataset

        percents = [config.get(f"CheckDataset.split.{k}_percent") for k in ("train", "gallery", "query")]
        if None in percents:
            raise ShituError("CheckDataset.split.enable needs train_percent, gallery_percent and query_percent")
        options = SplitOptions(
            *percents, seed=config.get("CheckDataset.split.seed"), by=config.get("CheckDataset.split.by")
        )
        written = split_dataset(dataset, options)
        actions.append(f"split {options.train}/{options.gallery}/{options.query} by {options.by}: {written.counts}")
    result = check_dataset(
        dataset,
        output=output if output is not None else config.get("Global.output"),
        sample_num=config.get("CheckDataset.sample_num"),
        max_image_pixels=config.get("CheckDataset.max_image_pixels"),
        num_workers=config.get("CheckDataset.num_workers"),
        on_progress=on_progress,
    )
    return result, actions
