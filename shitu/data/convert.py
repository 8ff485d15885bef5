"""``shitu convert``: a foreign dataset layout into ShiTuRecDataset lists, through its format plugin."""

from __future__ import annotations

import os
from pathlib import Path

from shitu.data.formats import SPLITS, ConversionPlan, Issue, Sample, SplitOptions
from shitu.data.lists import file_problem, path_problem, resolve_inside
from shitu.data.split import WriteResult, refuse_bundled_demo, validate_options, write_lists
from shitu.errors import ShituError
from shitu.fileio import recover


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
    issues = _plugin_call(fmt, "validate", root)
    if not isinstance(issues, list) or not all(isinstance(issue, Issue) for issue in issues):
        raise ShituError(f"the {fmt.name} format plugin's validate() did not return a list of Issue", path=root)
    errors = [issue for issue in issues if issue.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        first = errors[0]
        raise ShituError(first.message + more, path=first.file, line=first.line)
    try:
        plan = _plugin_call(fmt, "convert", root, options)
    except NotImplementedError as exc:
        raise ShituError(f"the {fmt.name} format cannot be converted: {exc}", path=root) from exc
    _check_plan(fmt.name, root, plan)
    written = write_lists(root, plan.lists, plan.class_names)
    return fmt.name, written, list(plan.notes)


def _plugin_call(fmt: object, method: str, *args: object) -> object:
    """Call a format plugin's ``validate`` or ``convert``: ShituError and NotImplementedError pass through,
    anything else the plugin raises becomes one ShituError naming the format (never a traceback)."""
    try:
        return getattr(fmt, method)(*args)
    except (ShituError, NotImplementedError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # a plugin's bug (even SystemExit) is reported, as for its hooks
        try:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        except Exception:  # an exception whose message cannot even be rendered
            reason = type(exc).__name__
        name = getattr(fmt, "name", type(fmt).__name__)
        raise ShituError(f"the {name} format plugin failed in {method}(): {reason}", path=args[0]) from exc


def _check_plan(name: str, root: Path, plan: object) -> None:
    """Refuse a plan that is malformed or names an image that is missing or outside ``root``."""
    lists = getattr(plan, "lists", None)
    class_names = getattr(plan, "class_names", None)
    if not isinstance(plan, ConversionPlan) or not isinstance(lists, dict):
        raise ShituError(f"the {name} converter did not return a ConversionPlan", path=root)
    if class_names is not None and (
        not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names)
    ):
        raise ShituError(f"the {name} converter's class names are not a list of strings", path=root)
    notes = getattr(plan, "notes", None)
    if not isinstance(notes, list) or not all(isinstance(note, str) for note in notes):
        raise ShituError(f"the {name} converter's notes are not a list of strings", path=root)
    if not all(isinstance(lists.get(split), list | None) for split in SPLITS):
        raise ShituError(f"the {name} converter's lists are not lists of Sample", path=root)
    total = sum(len(lists.get(split) or []) for split in SPLITS)
    for split in SPLITS:
        samples = lists.get(split)
        if not samples:
            raise ShituError(
                f"the {name} converter produced an empty {split} list ({total} image lines in all are too few)",
                path=root,
            )
        for sample in samples:
            if (
                not isinstance(sample, Sample)
                or not isinstance(sample.path, str)
                or isinstance(sample.label, bool)
                or not isinstance(sample.label, int)
            ):
                shown = repr(sample) if isinstance(sample, Sample) else f"a {type(sample).__name__}"
                raise ShituError(f"{name} converter: {shown} is not a Sample(path: str, label: int)", path=root)
            problem = path_problem(sample.path)
            if problem is None and ("\n" in sample.path or "\r" in sample.path):
                problem = f"image path {sample.path!r} holds a line break"
            if problem is None and not -(2**63) <= sample.label < 2**63:
                problem = f"label {sample.label} of {sample.path} does not fit in a 64-bit integer"
            if problem is None:
                resolved, problem = resolve_inside(root, sample.path)
                status = file_problem(resolved) if resolved is not None else None
                if status == "image file not found":
                    problem = f"image not found: {sample.path}"
                elif status is not None:
                    problem = f"image {sample.path}: {status}"
            if problem is not None:
                raise ShituError(f"{name} converter: {problem}", path=root)
