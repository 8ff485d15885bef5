"""``shitu convert``: a foreign dataset layout into ShiTuRecDataset lists, through its format plugin."""

from __future__ import annotations

import os
from pathlib import Path

from shitu.data.lists import path_problem
from shitu.data.split import WriteResult, refuse_bundled_demo, validate_options, write_lists
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
    if options is not None:
        validate_options(options)
    root = Path(dataset)
    if not root.is_dir():
        raise ShituError("dataset folder does not exist" if not root.exists() else "not a folder", path=root)
    if source_format is not None:
        fmt = host.dataset_format(source_format)  # an unknown name fails before anything else
    else:
        detected = host.detect_format(root, convertible_only=True)
        if detected is None:
            native = host.dataset_formats.get(str(host.detect_format(root)).lower())
            if native is not None and not native.converts:
                raise ShituError(
                    f"this folder is already a {native.name}: there is nothing to convert",
                    path=root,
                    hint="use 'shitu split' to divide it again",
                )
            names = sorted(f.name for f in host.dataset_formats.values() if f.converts)
            raise ShituError(
                "cannot tell which format this folder is", path=root, hint=f"name it with --from ({', '.join(names)})"
            )
        fmt = host.dataset_format(detected)
    if not fmt.converts:
        raise ShituError(
            f"{fmt.name} is shitu's own format and needs no conversion",
            path=root,
            hint="use 'shitu split' to divide it again",
        )
    refuse_bundled_demo(root)
    recover(root)
    errors = [issue for issue in fmt.validate(root) if issue.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        first = errors[0]
        raise ShituError(first.message + more, path=first.file, line=first.line)
    try:
        plan = fmt.convert(root, options)
    except NotImplementedError as exc:
        raise ShituError(f"the {fmt.name} format cannot be converted: {exc}", path=root) from exc
    real_root = root.resolve()
    total = sum(len(plan.lists.get(split) or []) for split in SPLITS)
    for split in SPLITS:
        samples = plan.lists.get(split)
        if not samples:
            raise ShituError(
                f"the {fmt.name} converter produced an empty {split} list ({total} image lines in all are too few)",
                path=root,
            )
        for sample in samples:
            problem = path_problem(sample.path)
            resolved = (root / sample.path).resolve() if problem is None else None
            if resolved is not None and not resolved.is_relative_to(real_root):
                problem = f"image path {sample.path!r} resolves outside the dataset root"
            if problem is None and resolved is not None and not resolved.is_file():
                problem = f"image not found: {sample.path}"
            if problem is not None:
                raise ShituError(f"{fmt.name} converter: {problem}", path=root)
    written = write_lists(root, plan.lists, plan.class_names)
    return fmt.name, written, list(plan.notes)
