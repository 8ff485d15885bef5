"""Built-in plugin: LabelMe image-level annotations → ShiTuRecDataset (PaddleX's only convertible type).

Layout: ``label.txt`` (line i names class i), ``annotations/*.json`` (LabelMe files whose ``flags`` mark
the classes of the image), ``images/``. Rules as PaddleX: every flag set to true adds the line
``<image> <class id>``; the lines go 50/30/20 to train/gallery/query in order, unshuffled. Beyond PaddleX:
annotations are read in sorted order (PaddleX uses the directory order, which differs between machines),
``imagePath`` may be any path relative to the JSON file (or just a file name under ``images/``), and
split options, when given, replace the fixed 50/30/20. ``label.txt`` is the source of the class ids and
is never rewritten. A flag value other than true/false is an error (PaddleX would count the string
``"false"`` as set).
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from shitu import hookimpl
from shitu.data.formats import ConversionPlan, DatasetFormat, Issue, Sample, SplitOptions
from shitu.data.lists import file_problem, resolve_inside
from shitu.errors import ShituError


def _read_labels(root: Path) -> tuple[dict[str, int], list[Issue]]:
    file = root / "label.txt"
    issues: list[Issue] = []
    labels: dict[str, int] = {}
    if not file.exists() and not file.is_symlink():
        return {}, [Issue("error", str(file), "label.txt is missing (line i must name class i)", code="missing")]
    problem = _unreadable(root, file)
    if problem is not None:
        return {}, [Issue("error", str(file), problem, code="unreadable")]
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [Issue("error", str(file), f"cannot read: {exc}", code="unreadable")]
    lines = text.split("\n")
    while lines and lines[-1].strip() == "":  # trailing blank lines name no class (PaddleX ignores them too)
        lines.pop()
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            issues.append(Issue("error", str(file), "blank line (every line names one class)", number, "blank-line"))
        elif name in labels:
            issues.append(
                Issue(
                    "error",
                    str(file),
                    f"class {name!r} is already on line {labels[name] + 1}",
                    number,
                    "duplicate-label",
                )
            )
        else:
            labels[name] = number - 1
    if not labels and not issues:
        issues.append(Issue("error", str(file), "label.txt names no class", code="empty"))
    return labels, issues


def _unreadable(root: Path, file: Path) -> str | None:
    """Why ``file`` (label.txt, an annotation) may not be read: a link leaving the dataset, a pipe, a folder."""
    resolved, problem = resolve_inside(root, os.path.relpath(file, root))
    if resolved is None:
        return str(problem).replace("image path", "path", 1)
    status = file_problem(resolved)
    return None if status is None else status.replace("image file", "file")


def _image_for(root: Path, annotation: Path, image_path: str) -> str | None:
    """The annotated image as a path relative to ``root`` (POSIX separators), or None if it is not found.

    ``imagePath`` is tried relative to the JSON file first, then by file name under ``images/``. Links are
    kept as written (the list names the link, as PaddleX would), but the file they reach must be inside
    the dataset root.
    """
    normalised = image_path.strip().replace("\\", "/")
    if not normalised or "\x00" in normalised:
        return None
    candidates = []
    if not PurePosixPath(normalised).is_absolute():
        candidates.append(annotation.parent / normalised)
    name = PurePosixPath(normalised).name
    if name and name not in (".", ".."):
        candidates.append(root / "images" / name)
    for candidate in candidates:
        relative = Path(os.path.relpath(os.path.normpath(candidate), os.path.normpath(root)))
        if ".." in relative.parts:
            continue
        resolved, _ = resolve_inside(root, relative.as_posix())  # never raises (link loops, long names)
        if resolved is not None and file_problem(resolved) is None:
            return relative.as_posix()
    return None


class LabelMe(DatasetFormat):
    name = "LabelMe"
    description = "label.txt + annotations/*.json (LabelMe, classes as image flags) + images/"
    converts = True

    def _scan(self, root: Path) -> tuple[list[Sample], list[str], list[Issue]]:
        labels, issues = _read_labels(root)
        annotations_dir = root / "annotations"
        if not annotations_dir.is_dir():
            issues.append(Issue("error", str(annotations_dir), "annotations/ folder is missing", code="missing"))
            return [], [], issues
        samples: list[Sample] = []
        notes: list[str] = []
        for annotation in sorted(annotations_dir.glob("*.json")):
            if annotation.name.startswith(".") or not annotation.is_file():
                continue  # hidden files (e.g. macOS '._x.json') and folders are no annotations
            shown = str(annotation)
            problem = _unreadable(root, annotation)
            if problem is not None:
                issues.append(Issue("error", shown, problem, code="unreadable"))
                continue
            try:
                document = json.loads(annotation.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as exc:
                issues.append(Issue("error", shown, f"invalid JSON: {exc.msg}", exc.lineno, "invalid-json"))
                continue
            except (OSError, UnicodeDecodeError) as exc:
                issues.append(Issue("error", shown, f"cannot read: {exc}", code="unreadable"))
                continue
            except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of 5000 digits
                reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                issues.append(Issue("error", shown, f"invalid JSON: {reason}", code="invalid-json"))
                continue
            if not isinstance(document, dict):
                issues.append(Issue("error", shown, "not a LabelMe annotation (top level is not an object)"))
                continue
            image_path = document.get("imagePath")
            flags = document.get("flags") or {}
            if not isinstance(image_path, str) or not image_path.strip():
                issues.append(Issue("error", shown, "imagePath is missing or not a string", code="no-image"))
                continue
            if not isinstance(flags, dict):
                issues.append(Issue("error", shown, "flags is not an object of class name → true/false"))
                continue
            image = _image_for(root, annotation, image_path)
            if image is None:
                issues.append(
                    Issue(
                        "error",
                        shown,
                        f"image {image_path!r} not found (looked beside the JSON file and in images/)",
                        code="missing-image",
                    )
                )
                continue
            odd = [flag for flag, value in flags.items() if not isinstance(value, bool)]
            if odd:
                value = flags[odd[0]]
                issues.append(
                    Issue("error", shown, f"flag {odd[0]!r} is {value!r}, expected true or false", code="bad-flag")
                )
                continue
            chosen = [flag for flag, value in flags.items() if value]
            if not chosen:
                notes.append(f"{shown}: no flag set, image skipped")
                continue
            for flag in chosen:
                if flag not in labels:
                    if labels:
                        issues.append(
                            Issue(
                                "error", shown, f"unknown label {flag!r}: it is not in label.txt", code="unknown-label"
                            )
                        )
                    continue
                samples.append(Sample(image, labels[flag]))
        if not samples and not any(i.severity == "error" for i in issues):
            issues.append(Issue("error", str(annotations_dir), "no annotation marks any image with a class"))
        return samples, notes, issues

    def validate(self, root: Path) -> list[Issue]:
        return self._scan(root)[2]

    def convert(self, root: Path, options: SplitOptions | None) -> ConversionPlan:
        samples, notes, issues = self._scan(root)
        errors = [i for i in issues if i.severity == "error"]
        if errors:
            raise ShituError(errors[0].message, path=errors[0].file, line=errors[0].line)
        # label.txt is this format's own class list: the plan leaves it as it is (class_names None).
        if options is not None:
            from shitu.data.split import split_samples

            return ConversionPlan(split_samples(samples, options), None, notes)
        n = len(samples)
        n_train, n_gallery = round(n * 50 / 100), round(n * 30 / 100)  # PaddleX's expression
        lists = {
            "train": samples[:n_train],
            "gallery": samples[n_train : n_train + n_gallery],
            "query": samples[n_train + n_gallery :],
        }
        return ConversionPlan(lists, None, notes)


@hookimpl
def register_dataset_formats(register):
    register(LabelMe())


@hookimpl
def detect_dataset_format(path: Path) -> str | None:
    """LabelMe: an annotations/ folder beside label.txt, or holding JSON files (so that a missing
    label.txt is reported as such rather than as an unknown format)."""
    annotations = path / "annotations"
    if not annotations.is_dir():
        return None
    if (path / "label.txt").is_file() or any(p.suffix == ".json" for p in annotations.iterdir()):
        return LabelMe.name
    return None
