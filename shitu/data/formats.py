"""Dataset formats: the contract between the host and format plugins.

A format plugin never writes files. ``convert`` returns a :class:`ConversionPlan` (the three lists and
the class names), and the host writes it atomically, keeping the originals as ``.bak`` files. That way
every format gets the same crash safety and the same backup rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

SPLITS: tuple[str, ...] = ("train", "gallery", "query")

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Issue:
    """One problem found in a dataset, located at ``file`` (and ``line``, 1-based, when it has one)."""

    severity: Severity
    file: str
    message: str
    line: int | None = None
    code: str = "invalid"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "code": self.code,
            "message": self.message,
        }


@dataclass(frozen=True)
class Sample:
    """One line of a ShiTuRecDataset list: an image path relative to the dataset root, and its label."""

    path: str
    label: int


@dataclass(frozen=True)
class SplitOptions:
    """How to divide samples into train / gallery / query.

    Percentages are integers > 0 summing to 100. ``by="image"`` shuffles all images (PaddleX's rule,
    closed-set); ``by="class"`` gives whole classes to train and divides the images of the other classes
    between gallery and query (open-set). The same seed always gives the same split.
    """

    train: int = 70
    gallery: int = 20
    query: int = 10
    seed: int = 0
    by: Literal["image", "class"] = "image"


@dataclass
class ConversionPlan:
    """What a converter wants written: the three lists, optional class names, and notes for the user."""

    lists: dict[str, list[Sample]]
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)


class DatasetFormat:
    """Base class for a dataset format. Subclasses set ``name`` and ``description`` and override
    :meth:`validate` and, for foreign formats, :meth:`convert`."""

    name: str = ""
    description: str = ""
    #: Whether :meth:`convert` turns this format into ShiTuRecDataset.
    converts: bool = False

    def validate(self, root: Path) -> list[Issue]:
        """Return every problem that would stop this folder being read (errors) or make it doubtful (warnings)."""
        return []

    def convert(self, root: Path, options: SplitOptions | None) -> ConversionPlan:
        """Read the foreign dataset at ``root`` and return the ShiTuRecDataset lists to write.

        Image paths in the plan are relative to ``root``. ``options`` is None when the user gave no split
        options (the format's own default applies). Raise :class:`shitu.ShituError` naming the file (and
        line) for anything that cannot be converted. Must not write anything.
        """
        raise NotImplementedError(f"{self.name} cannot be converted")

    def __repr__(self) -> str:
        return f"<DatasetFormat {self.name}>"
