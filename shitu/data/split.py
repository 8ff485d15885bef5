"""Dividing samples into train / gallery / query, and writing the three lists safely."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shitu.data.formats import SPLITS, Sample, SplitOptions
from shitu.data.lists import format_lines, locate_root, read_list, resolve_inside
from shitu.errors import ShituError
from shitu.fileio import recover, replace_together


def validate_options(options: SplitOptions) -> None:
    """PaddleX's rules: each percentage is an integer above 0 and they sum to 100; ``by`` is image or class."""
    values = {"train": options.train, "gallery": options.gallery, "query": options.query}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ShituError(f"--{name} must be a whole percentage, got {value!r}")
        if value <= 0:
            raise ShituError(f"--{name} must be above 0, got {value}")
    if sum(values.values()) != 100:
        raise ShituError(
            f"percentages must sum to 100, got {options.train} + {options.gallery} + {options.query} = "
            f"{sum(values.values())}"
        )
    if options.by not in ("image", "class"):
        raise ShituError(f"--by must be 'image' or 'class', got {options.by!r}")
    if isinstance(options.seed, bool) or not isinstance(options.seed, int):
        raise ShituError(f"--seed must be a whole number, got {options.seed!r}")


def split_samples(samples: Sequence[Sample], options: SplitOptions) -> dict[str, list[Sample]]:
    """Split ``samples`` deterministically: the result depends only on the set of samples and the options.

    ``by="image"`` (PaddleX): shuffle all samples, train takes round(N·t/100), gallery the next
    round(N·g/100), query the rest. ``by="class"`` (open-set): shuffle the classes, train takes
    round(C·t/100) whole classes; each other class's images go to gallery and query in the ratio g:q, at
    least one to each when the class has two or more. Each list comes back sorted by path.
    """
    validate_options(options)
    rng = random.Random(options.seed)
    ordered = sorted(set(samples), key=lambda s: (s.path, s.label))
    if options.by == "image":
        rng.shuffle(ordered)
        n = len(ordered)
        n_train = round(n * options.train / 100)
        n_gallery = round(n * options.gallery / 100)
        parts = {
            "train": ordered[:n_train],
            "gallery": ordered[n_train : n_train + n_gallery],
            "query": ordered[n_train + n_gallery :],
        }
    else:
        by_class: dict[int, list[Sample]] = defaultdict(list)
        for sample in ordered:
            by_class[sample.label].append(sample)
        classes = sorted(by_class)
        if len(classes) < 2:
            raise ShituError(f"splitting by class needs at least 2 classes, the dataset has {len(classes)}")
        rng.shuffle(classes)
        n_train = min(max(round(len(classes) * options.train / 100), 1), len(classes) - 1)
        parts = {"train": [], "gallery": [], "query": []}
        for label in classes[:n_train]:
            parts["train"].extend(by_class[label])
        share = options.gallery / (options.gallery + options.query)
        for label in sorted(classes[n_train:]):
            images = list(by_class[label])
            rng.shuffle(images)
            n_gallery = len(images) if len(images) < 2 else min(max(round(len(images) * share), 1), len(images) - 1)
            parts["gallery"].extend(images[:n_gallery])
            parts["query"].extend(images[n_gallery:])
    for name, part in parts.items():
        if not part:
            raise ShituError(
                f"{len(ordered)} images are too few to split {options.train}/{options.gallery}/{options.query} "
                f"by {options.by}: the {name} list would be empty"
            )
    return {name: sorted(part, key=lambda s: (s.path, s.label)) for name, part in parts.items()}


@dataclass
class WriteResult:
    """What was written: the dataset root, the new list sizes, the backups kept and the files changed
    (empty when the lists already held exactly this content)."""

    root: Path
    counts: dict[str, int]
    backups: list[Path]
    changed: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "dataset_path": str(self.root),
            "counts": self.counts,
            "backups": [str(p) for p in self.backups],
            "changed": [str(p) for p in self.changed],
        }


def write_lists(root: Path, lists: dict[str, list[Sample]], class_names: Sequence[str] | None = None) -> WriteResult:
    """Replace the dataset's list files (and ``label.txt`` when ``class_names`` is given) as one unit.

    The previous content of each changed file is kept as ``<name>.bak`` (or ``.bak.N`` when an older
    backup holds something else), so nothing is ever lost, and a crash leaves the old or the new set.
    """
    files = {root / f"{split}.txt": format_lines(lists[split]) for split in SPLITS}
    if class_names is not None:
        for name in class_names:
            if not name.strip() or "\n" in name or "\r" in name:
                raise ShituError(f"cannot write class name {name!r} into label.txt (one name per line)")
        files[root / "label.txt"] = "".join(f"{name}\n" for name in class_names).encode("utf-8")
    for path in files:  # the old content is read (to compare, to back up): never through a link out of the root
        if path.is_symlink() and resolve_inside(root, path.name)[0] is None:
            raise ShituError(
                f"{path.name} is a symbolic link out of the dataset: refusing to read or replace it", path=path
            )
    recover(root)
    changed = [path for path, data in files.items() if not (path.is_file() and path.read_bytes() == data)]
    backups = replace_together(files)
    return WriteResult(
        root=root, counts={split: len(lists[split]) for split in SPLITS}, backups=backups, changed=changed
    )


def refuse_bundled_demo(path: Path) -> None:
    """The demo dataset inside the installed package is read-only: refuse to modify it."""
    from shitu.data.demo import demo_dataset_path

    try:
        demo = demo_dataset_path().resolve()
    except Exception:  # pragma: no cover - a package without its demo data
        return
    if path.resolve() == demo:
        raise ShituError(
            "the bundled demo dataset is read-only", path=path, hint="copy it elsewhere before splitting or converting"
        )


def split_dataset(dataset: str | os.PathLike[str], options: SplitOptions) -> WriteResult:
    """Re-split a ShiTuRecDataset: gather the lines of its lists (duplicates once), split, write with backups.

    Refuses (ShituError naming the file and line) if a list has a malformed line, so no line is dropped.
    """
    validate_options(options)
    root = locate_root(dataset)
    refuse_bundled_demo(root)
    recover(root)
    samples: list[Sample] = []
    for split in SPLITS:
        parsed = read_list(root, split)
        for issue in parsed.issues:
            if issue.severity == "error" and issue.code not in ("missing-list", "empty-list"):
                raise ShituError(issue.message, path=issue.file, line=issue.line, hint="fix it before splitting")
        samples.extend(entry.sample for entry in parsed.entries)
    if not samples:
        raise ShituError("the dataset lists no images to split", path=root)
    return write_lists(root, split_samples(samples, options))
