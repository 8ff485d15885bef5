"""Built-in plugin: the ShiTuRecDataset format (shitu's and PaddleX's native dataset layout)."""

from __future__ import annotations

from pathlib import Path

from shitu import hookimpl
from shitu.data.formats import SPLITS, DatasetFormat, Issue, SplitOptions


class ShiTuRecDataset(DatasetFormat):
    name = "ShiTuRecDataset"
    description = "images/ + train.txt, gallery.txt, query.txt ('<relative path> <int label>' per line)"
    converts = False

    def validate(self, root: Path) -> list[Issue]:
        from shitu.data.check import check_dataset

        return check_dataset(root, output=None).issues

    def convert(self, root: Path, options: SplitOptions | None):
        raise NotImplementedError("ShiTuRecDataset is the target format")


@hookimpl
def register_dataset_formats(register):
    register(ShiTuRecDataset())


@hookimpl
def detect_dataset_format(path: Path) -> str | None:
    if any((path / f"{split}.txt").is_file() for split in SPLITS):
        return ShiTuRecDataset.name
    return None
