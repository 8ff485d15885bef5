"""``shitu check``: PaddleX's check_dataset for ShiTuRecDataset, plus a full decode of every image.

PaddleX's result file, sample pictures and histogram are reproduced with the same names and fields;
beyond PaddleX every listed image is decoded and every problem is reported with its file and line.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu.data.formats import SPLITS, Issue
from shitu.data.images import DEFAULT_MAX_PIXELS, ImageReport, inspect_images
from shitu.data.lists import ListEntry, file_problem, locate_root, read_list, resolve_inside
from shitu.errors import StorageError
from shitu.fileio import JOURNAL_NAME, atomic_directory, atomic_write_json, writing

#: ``on_progress(stage, advance, total)``: ``stage`` names the step, ``total`` its size.
ProgressFn = Callable[[str, int, int], None]

DEMO_SEED = 123  # PaddleX seeds its sample shuffle with 123


@dataclass
class CheckResult:
    """Everything ``check`` learned; :meth:`to_json` is the ``check_dataset_result.json`` document."""

    dataset_path: str
    root: Path
    entries: dict[str, list[ListEntry]]
    issues: list[Issue]
    images: dict[str, ImageReport] = field(default_factory=dict)
    sample_paths: dict[str, list[str]] = field(default_factory=dict)
    histogram: str | None = None
    output: Path | None = None

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def check_pass(self) -> bool:
        return not self.errors

    def class_counts(self, split: str) -> Counter[int]:
        return Counter(e.sample.label for e in self.entries.get(split, []))

    def to_json(self) -> dict[str, Any]:
        """The result document: PaddleX's fields, then shitu's additions (``errors``, ``warnings``)."""
        attributes: dict[str, Any] = {}
        for split in SPLITS:
            attributes[f"{split}_samples"] = len(self.entries.get(split, []))
            attributes[f"{split}_sample_paths"] = self.sample_paths.get(split, [])
        doc: dict[str, Any] = {"done_flag": self.check_pass, "check_pass": self.check_pass}
        if not self.check_pass:
            first = self.errors[0]
            doc["err_type"] = "CheckFailedError"
            doc["err_msg"] = f"{first} (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else str(first)
        doc["attributes"] = attributes
        analysis: dict[str, Any] = {}
        if self.histogram is not None:
            analysis["histogram"] = self.histogram
        analysis["num_classes"] = {split: len(self.class_counts(split)) for split in SPLITS}
        analysis["num_images_decoded"] = len(self.images)
        doc["analysis"] = analysis
        doc["dataset_path"] = self.dataset_path
        doc["show_type"] = "image"
        doc["dataset_type"] = "ShiTuRecDataset"
        doc["errors"] = [i.to_dict() for i in self.errors]
        doc["warnings"] = [i.to_dict() for i in self.warnings]
        return doc


def check_dataset(
    dataset: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = "output",
    sample_num: int = 10,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    num_workers: int = 0,
    on_progress: ProgressFn | None = None,
) -> CheckResult:
    """Check the ShiTuRecDataset at ``dataset``; never modifies it.

    With ``output`` set, writes ``<output>/check_dataset_result.json``, ``<output>/check_dataset/demo_img/``
    and ``<output>/check_dataset/histogram.png`` (atomically, replacing an earlier check's files). Raises
    ShituError only when ``dataset`` is not a dataset folder at all; every other problem is an issue.
    """
    root = locate_root(dataset)
    shown_root = Path(os.fspath(dataset)) if Path(dataset).resolve() == root.resolve() else root
    issues: list[Issue] = []
    entries: dict[str, list[ListEntry]] = {}
    if (root / JOURNAL_NAME).exists():
        issues.append(
            Issue(
                "warning",
                str(shown_root / JOURNAL_NAME),
                "an interrupted list update is pending; 'shitu split' or 'shitu convert' completes it",
                code="pending-update",
            )
        )
    for split in SPLITS:
        parsed = read_list(root, split, display_root=shown_root)
        issues.extend(parsed.issues)
        entries[split] = parsed.entries

    images = _inspect_listed_images(root, entries, issues, max_image_pixels, num_workers, on_progress)
    _cross_split_checks(entries, issues)

    result = CheckResult(
        dataset_path=os.fspath(dataset), root=root, entries=entries, issues=_ordered(issues), images=images
    )
    if output is not None:
        _write_outputs(result, Path(output), sample_num, on_progress)
    return result


def _inspect_listed_images(
    root: Path,
    entries: dict[str, list[ListEntry]],
    issues: list[Issue],
    max_pixels: int,
    workers: int,
    on_progress: ProgressFn | None,
) -> dict[str, ImageReport]:
    by_path: dict[str, list[ListEntry]] = defaultdict(list)
    for split in SPLITS:
        for entry in entries[split]:
            by_path[entry.sample.path].append(entry)
    to_decode: list[str] = []
    for relative, refs in by_path.items():
        resolved, problem = resolve_inside(root, relative)
        if resolved is None:
            code = "path-outside-root" if "outside" in str(problem) else "bad-path"
            for ref in refs:
                issues.append(Issue("error", ref.file, str(problem), ref.line, code))
            continue
        if file_problem(resolved) == "image file not found":
            for ref in refs:
                issues.append(Issue("error", ref.file, f"image not found: {relative}", ref.line, "missing-image"))
            continue
        to_decode.append(relative)
    total = len(to_decode)
    progress = None
    if on_progress is not None:
        on_progress("decode", 0, total)

        def progress(n: int) -> None:
            on_progress("decode", n, total)

    reports = inspect_images(
        [root / r for r in to_decode], max_pixels=max_pixels, workers=workers, on_progress=progress
    )
    images: dict[str, ImageReport] = {}
    for relative, report in zip(to_decode, reports, strict=True):
        refs = by_path[relative]
        if report.error is not None:
            for ref in refs:
                issues.append(Issue("error", ref.file, f"{relative}: {report.error}", ref.line, "bad-image"))
            continue
        images[relative] = report
        for note in report.warnings:
            issues.append(Issue("warning", refs[0].file, f"{relative}: {note}", refs[0].line, "image-warning"))
    return images


def _cross_split_checks(entries: dict[str, list[ListEntry]], issues: list[Issue]) -> None:
    # The same image with different labels.
    label_of: dict[str, ListEntry] = {}
    for split in SPLITS:
        for entry in entries[split]:
            first = label_of.setdefault(entry.sample.path, entry)
            if first.sample.label != entry.sample.label:
                issues.append(
                    Issue(
                        "warning",
                        entry.file,
                        f"{entry.sample.path} has label {entry.sample.label} "
                        f"here but {first.sample.label} at {first.file}:{first.line}",
                        entry.line,
                        "conflicting-label",
                    )
                )
    gallery_labels = {e.sample.label for e in entries["gallery"]}
    gallery_paths = {e.sample.path for e in entries["gallery"]}
    reported: set[int] = set()
    for entry in entries["query"]:
        label = entry.sample.label
        if entries["gallery"] and label not in gallery_labels and label not in reported:
            reported.add(label)
            issues.append(
                Issue(
                    "warning",
                    entry.file,
                    f"query class {label} has no image in the gallery (its queries cannot be answered)",
                    entry.line,
                    "query-class-not-in-gallery",
                )
            )
        if entry.sample.path in gallery_paths:
            issues.append(
                Issue(
                    "warning",
                    entry.file,
                    f"{entry.sample.path} is in both gallery and query (it will match itself and inflate recall)",
                    entry.line,
                    "query-in-gallery",
                )
            )
    for split in ("train", "gallery"):
        counts = Counter(e.sample.label for e in entries[split])
        first_line = {}
        for entry in entries[split]:
            first_line.setdefault(entry.sample.label, entry)
        for label, count in counts.items():
            if count == 1 and split == "train":
                entry = first_line[label]
                issues.append(
                    Issue(
                        "warning",
                        entry.file,
                        f"class {label} has a single training image",
                        entry.line,
                        "single-image-class",
                    )
                )


def _ordered(issues: list[Issue]) -> list[Issue]:
    """Errors first, then by file and line, so reports read top to bottom."""
    return sorted(issues, key=lambda i: (i.severity != "error", i.file, i.line or 0))


def _write_outputs(result: CheckResult, output: Path, sample_num: int, on_progress: ProgressFn | None) -> None:
    from shitu.data.report import draw_histogram, draw_labelled_sample

    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
    with atomic_directory(output / "check_dataset") as staging:
        demo_dir = staging / "demo_img"
        demo_dir.mkdir()
        used: dict[str, tuple[str, int]] = {}
        for split in SPLITS:
            chosen = [e for e in result.entries[split] if e.sample.path in result.images]
            random.Random(DEMO_SEED).shuffle(chosen)
            paths: list[str] = []
            for entry in chosen[:sample_num]:
                name = _unique_name(entry, used)
                if not (demo_dir / name).exists():
                    try:
                        with warnings.catch_warnings():  # the size was checked against the limit while decoding
                            warnings.simplefilter("ignore")
                            draw_labelled_sample(
                                result.root / entry.sample.path, str(entry.sample.label), demo_dir / name
                            )
                    except StorageError:  # the disk, not the image: the whole check fails (nothing written)
                        raise
                    except Exception as exc:  # the file changed since it was decoded, or is too large to redraw
                        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
                        result.issues.append(
                            Issue(
                                "warning",
                                entry.file,
                                f"{entry.sample.path}: no sample picture drawn ({reason})",
                                entry.line,
                                "sample-not-drawn",
                            )
                        )
                        continue
                paths.append(f"check_dataset/demo_img/{name}")
            result.sample_paths[split] = paths
        counts = {split: (len(result.entries[split]), len(result.class_counts(split))) for split in SPLITS}
        draw_histogram(counts, staging / "histogram.png")
        result.histogram = "check_dataset/histogram.png"
    result.output = output
    atomic_write_json(output / "check_dataset_result.json", result.to_json())


def _unique_name(entry: ListEntry, used: dict[str, tuple[str, int]]) -> str:
    """PaddleX names samples by basename, so two images of the same name overwrite each other; here the
    same image (and label) reuses its picture and a different one gets a numbered name."""
    key = (entry.sample.path, entry.sample.label)
    base = Path(entry.sample.path).name
    stem, suffix = os.path.splitext(base)
    suffix = suffix.lower() if suffix.lower() in {".jpg", ".jpeg", ".png"} else ".jpg"
    candidate = stem + suffix
    number = 0
    while candidate in used and used[candidate] != key:
        number += 1
        candidate = f"{stem}_{number}{suffix}"
    used[candidate] = key
    return candidate
