"""shitu plugin: the ImageFolder dataset format (``root/<class>/<image>``)."""

from __future__ import annotations

from pathlib import Path

import shitu
from shitu.data.formats import SPLITS, ConversionPlan, DatasetFormat, Issue, Sample, SplitOptions

__version__ = "0.1.0"

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
#: Files allowed beside the class folders (they do not make the folder something else).
_ALLOWED_TOP_LEVEL = ("readme", "license", "label.txt", ".")
DEFAULT_SPLIT = SplitOptions(train=70, gallery=20, query=10, seed=0, by="image")


_BAD_CLASS_NAME = "class folder name has a line break or leading/trailing whitespace (a list line cannot hold it)"


def _usable_name(name: str) -> bool:
    """Whether a name can be written on a list line: no line break, no leading or trailing whitespace."""
    return name == name.strip() and not any(c in name for c in "\r\n")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(root: Path, class_dir: Path) -> tuple[list[Path], int]:
    """Images below ``class_dir`` (any depth, sorted), and how many files were skipped."""
    real_root = root.resolve()
    found: list[Path] = []
    skipped = 0
    for path in sorted(class_dir.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(class_dir).parts):
            continue
        if (
            path.suffix.lower() not in IMAGE_EXTENSIONS
            or not _usable_name(path.relative_to(class_dir).as_posix())
            or not path.resolve().is_relative_to(real_root)
        ):
            skipped += 1  # not an image, a name a list line cannot hold, or a link that leaves the dataset
            continue
        found.append(path)
    return found, skipped


class ImageFolder(DatasetFormat):
    name = "ImageFolder"
    description = "root/<class>/<image>: one folder per class"
    converts = True

    def validate(self, root: Path) -> list[Issue]:
        issues: list[Issue] = []
        classes = 0
        for class_dir in _class_dirs(root):
            images, _ = _images(root, class_dir)
            if not images:
                issues.append(Issue("warning", str(class_dir), "class folder holds no image; skipped", code="empty"))
                continue
            if not _usable_name(class_dir.name):
                issues.append(Issue("error", str(class_dir), _BAD_CLASS_NAME, code="bad-name"))
                continue
            if any(c.isspace() for c in class_dir.name):
                issues.append(
                    Issue("warning", str(class_dir), "class folder name contains whitespace (PaddleX cannot read it)")
                )
            classes += 1
        if classes == 0:
            issues.append(Issue("error", str(root), "no class folder with images (expected root/<class>/<image>)"))
        return issues

    def convert(self, root: Path, options: SplitOptions | None) -> ConversionPlan:
        samples: list[Sample] = []
        class_names: list[str] = []
        notes: list[str] = []
        stray = [p.name for p in root.iterdir() if p.is_file() and not _allowed_top_level(p.name)]
        if stray:
            notes.append(
                f"{root}: {len(stray)} file(s) beside the class folders skipped ({', '.join(sorted(stray)[:3])})"
            )
        for class_dir in _class_dirs(root):
            images, skipped = _images(root, class_dir)
            if skipped:
                notes.append(f"{class_dir}: {skipped} file(s) that are not images inside the dataset skipped")
            if not images:
                notes.append(f"{class_dir}: no image, class skipped")
                continue
            if not _usable_name(class_dir.name):
                raise shitu.ShituError(_BAD_CLASS_NAME, path=class_dir)
            label = len(class_names)
            class_names.append(class_dir.name)
            samples.extend(Sample(p.relative_to(root).as_posix(), label) for p in images)
        if not samples:
            raise shitu.ShituError("no class folder with images (expected root/<class>/<image>)", path=root)
        lists = shitu.split_samples(samples, options or DEFAULT_SPLIT)
        return ConversionPlan(lists, class_names, notes)


@shitu.hookimpl
def register_dataset_formats(register):
    register(ImageFolder())


@shitu.hookimpl
def detect_dataset_format(path: Path) -> str | None:
    """An ImageFolder: no annotations/ folder, only class folders (plus lists, READMEs, licences) on top,
    and at least one class folder that holds an image.

    A folder that already has lists is a ShiTuRecDataset; it is claimed only when it was converted from an
    ImageFolder (its label.txt names top-level folders), so converting it again picks up new images, while a
    ShiTuRecDataset with a flat ``images/`` folder is never mistaken for a one-class ImageFolder.
    """
    if not path.is_dir() or (path / "annotations").is_dir():
        return None
    for entry in path.iterdir():
        if entry.is_file() and not _allowed_top_level(entry.name):
            return None
    if any((path / f"{split}.txt").is_file() for split in SPLITS) and not _labels_are_folders(path):
        return None
    for class_dir in _class_dirs(path):
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in class_dir.iterdir() if p.is_file()):
            return ImageFolder.name
    return None


def _allowed_top_level(filename: str) -> bool:
    name = filename.lower()
    return any(name.startswith(f"{split}.txt") for split in SPLITS) or name.startswith(_ALLOWED_TOP_LEVEL)


def _labels_are_folders(path: Path) -> bool:
    """Whether ``label.txt`` exists and each of its lines names a folder beside it."""
    try:
        names = [line.strip() for line in (path / "label.txt").read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError):
        return False
    names = [name for name in names if name]
    return bool(names) and all((path / name).is_dir() for name in names)
