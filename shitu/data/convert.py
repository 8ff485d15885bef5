"""``shitu convert``: a foreign dataset layout into ShiTuRecDataset lists, through its format plugin."""

from __future__ import annotations

import os
from pathlib import Path

from shitu.data.lists import path_problem
from shitu.data.split import WriteResult, write_lists
from shitu.errors import ShituError
from shitu.fileio import recover
from shitu.formats import SPLITS, SplitOptions


def convert_dataset(
    dataset: str | os.PathLike[str],
    *,
    source_format: str | None = None,
    options: SplitOptions | None = None,
    host: object | None = None,
) -> tuple[str, WriteResult, list[str]]:
    """Convert the dataset folder ``dataset`` in place; returns (format name, what was written, notes).

    ``source_format`` None means detect it. The format plugin validates and plans; this function checks
    the plan (every image exists inside the folder) and writes it atomically, originals kept as ``.bak``.
    """
    from shitu.plugins import get_host

    host = host or get_host()
    root = Path(dataset)
    if not root.is_dir():
        raise ShituError("dataset folder does not exist" if not root.exists() else "not a folder", path=root)
    recover(root)
    if source_format is None:
        source_format = host.detect_format(root, convertible_only=True)
        if source_format is None:
            names = sorted(f.name for f in host.dataset_formats.values() if f.converts)
            raise ShituError(
                "cannot tell which format this folder is", path=root, hint=f"name it with --from ({', '.join(names)})"
            )
    fmt = host.dataset_format(source_format)
    if not fmt.converts:
        raise ShituError(f"{fmt.name} is shitu's own format and needs no conversion", path=root)
    errors = [issue for issue in fmt.validate(root) if issue.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        first = errors[0]
        raise ShituError(first.message + more, path=first.file, line=first.line)
    plan = fmt.convert(root, options)
    real_root = root.resolve()
    for split in SPLITS:
        samples = plan.lists.get(split)
        if not samples:
            raise ShituError(f"the {fmt.name} converter produced an empty {split} list", path=root)
        for sample in samples:
            problem = path_problem(sample.path)
            resolved = (root / sample.path).resolve()
            if problem is None and not resolved.is_relative_to(real_root):
                problem = f"image path {sample.path!r} resolves outside the dataset root"
            if problem is None and not resolved.is_file():
                problem = f"image not found: {sample.path}"
            if problem is not None:
                raise ShituError(f"{fmt.name} converter: {problem}", path=root)
    written = write_lists(root, plan.lists, plan.class_names)
    return fmt.name, written, list(plan.notes)
