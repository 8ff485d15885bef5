#!/usr/bin/env python3
"""Build a ShiTuRecDataset of every real photo of the Grocery Store Dataset (about 3,000 JPEGs).

Layout written under ``--output DIR``::

    DIR/
      images/<NN_Name>/<original file name>.jpg   byte-for-byte copies (not links, not re-encoded)
      train.txt      the ``train_`` photos          "<relative path> <NN>" lines
      gallery.txt    the 81 catalogue ("iconic") pictures
      query.txt      the ``val_`` photos
      label.txt      line i = class folder name of label i
      LICENSE        verbatim copy of the source licence (MIT: it must travel with the pictures)
      README.md      credit and protocol

This is the shop-to-street protocol: catalogue pictures are the gallery, store photos the queries,
and the label is the fine-grained class id ``NN`` of the folder name.

Usage (from the repository root)::

    .venv/bin/python benchmarks/make_grocery_dataset.py --output benchmarks/.work/grocery3k

The output is deterministic: every list is sorted, lines end with ``\\n``. The protocol involves no
random choice, so ``--seed`` changes nothing today; it is accepted (and recorded in README.md) so that
the benchmark scripts share one interface. The dataset is written into a temporary sibling folder and
renamed into place at the end; an existing non-empty output folder is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT / ".." / "shared" / "data" / "grocery"
DEFAULT_SEED = 0

_CLASS_DIR = re.compile(r"(?P<id>[0-9]{2})_(?P<name>\S+)")
_IMAGE_SUFFIXES = {".jpg", ".jpeg"}


class BuildError(Exception):
    """A problem with the source or the output folder, reported as one line."""


def _class_dirs(folder: Path) -> dict[str, int]:
    """``{folder name: class id}`` for the ``NN_Name`` folders of ``folder``."""
    if not folder.is_dir():
        raise BuildError(f"{folder}: not a folder (is --source a Grocery Store folder?)")
    classes: dict[str, int] = {}
    for child in sorted(folder.iterdir()):
        if not child.is_dir():
            continue
        match = _CLASS_DIR.fullmatch(child.name)
        if match is None:
            raise BuildError(f"{child}: folder name is not NN_Name")
        classes[child.name] = int(match["id"])
    if not classes:
        raise BuildError(f"{folder}: no NN_Name class folders")
    return classes


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def collect(source: Path) -> tuple[dict[str, list[tuple[Path, str, int]]], dict[int, str]]:
    """Every picture to copy, per split: ``(source file, relative path in the dataset, label)``."""
    photo_classes = _class_dirs(source / "photos")
    iconic_classes = _class_dirs(source / "iconic")
    if photo_classes != iconic_classes:
        only = sorted(set(photo_classes) ^ set(iconic_classes))
        raise BuildError(f"photos/ and iconic/ hold different classes: {', '.join(only)}")
    names = {label: name for name, label in photo_classes.items()}
    if len(names) != len(photo_classes):
        raise BuildError("two class folders share one NN id")

    splits: dict[str, list[tuple[Path, str, int]]] = {"train": [], "gallery": [], "query": []}
    seen: set[str] = set()
    for name, label in photo_classes.items():
        entries: list[tuple[str, Path]] = []
        for photo in _images(source / "photos" / name):
            if photo.name.startswith("train_"):
                entries.append(("train", photo))
            elif photo.name.startswith("val_"):
                entries.append(("query", photo))
            else:
                raise BuildError(f"{photo}: neither a train_ nor a val_ photo")
        iconic = _images(source / "iconic" / name)
        if len(iconic) != 1:
            raise BuildError(f"{source / 'iconic' / name}: expected one catalogue picture, found {len(iconic)}")
        entries.append(("gallery", iconic[0]))
        for split, picture in entries:
            relative = f"images/{name}/{picture.name}"
            if relative in seen:
                raise BuildError(f"{picture}: two pictures would be copied to {relative}")
            if " " in relative or "\n" in relative:
                raise BuildError(f"{picture}: file name unfit for a list file")
            seen.add(relative)
            splits[split].append((picture, relative, label))
    for split in splits:
        splits[split].sort(key=lambda item: item[1])
    return splits, names


def _readme(source: Path, seed: int, counts: dict[str, int]) -> str:
    return (
        "# Grocery Store photos, shop-to-street protocol (benchmark dataset)\n\n"
        "Built by `benchmarks/make_grocery_dataset.py` from the Grocery Store Dataset by Marcus Klasson,\n"
        'Cheng Zhang and Hedvig Kjellström, "A Hierarchical Grocery Store Image Dataset with Visual and\n'
        'Semantic Labels", WACV 2019 (marcusklasson/GroceryStoreDataset). MIT licence: see LICENSE.\n\n'
        f"- train.txt: {counts['train']} `train_` photos\n"
        f"- gallery.txt: {counts['gallery']} catalogue (iconic) pictures, one per class\n"
        f"- query.txt: {counts['query']} `val_` photos\n"
        "- label = the NN class id of the folder name; label.txt line i names class i\n\n"
        f"Source folder: `{source.name}`; seed {seed} (the protocol makes no random choice).\n"
    )


def build(source: Path, output: Path, seed: int = DEFAULT_SEED) -> dict[str, int]:
    """Write the dataset to ``output`` (which must be absent or empty); returns the list sizes."""
    source = source.resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BuildError(f"{output}: exists and is not an empty folder; refusing to overwrite it")
    splits, names = collect(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for items in splits.values():
            for picture, relative, _ in items:
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(picture, target)
        for split, items in splits.items():
            text = "".join(f"{relative} {label}\n" for _, relative, label in items)
            (staging / f"{split}.txt").write_bytes(text.encode("utf-8"))
        labels = "".join(f"{names.get(i, '')}\n" for i in range(max(names) + 1))
        (staging / "label.txt").write_bytes(labels.encode("utf-8"))
        counts = {split: len(items) for split, items in splits.items()}
        (staging / "README.md").write_bytes(_readme(source, seed, counts).encode("utf-8"))
        if (source / "LICENSE").is_file():
            shutil.copyfile(source / "LICENSE", staging / "LICENSE")
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        if output.exists():
            output.rmdir()  # empty (checked above); fails, rather than overwrite, if something appeared
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="Grocery Store folder holding photos/ and iconic/ (default: ../shared/data/grocery from the repo)",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to create (must not hold anything)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="recorded only; the protocol is not random")
    args = parser.parse_args(argv)
    try:
        counts = build(args.source, args.output, args.seed)
    except (BuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(counts.values())
    print(
        f"wrote {args.output}: {total} images "
        f"(train {counts['train']}, gallery {counts['gallery']}, query {counts['query']})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
