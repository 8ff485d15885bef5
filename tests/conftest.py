"""Shared fixtures: a CLI runner, the demo dataset copied, and tiny synthetic datasets."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from shitu.cli import main
from shitu.data.demo import demo_dataset_path
from shitu.plugins import reset_host


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    def json_lines(self) -> list:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test downloads published weights: a model name without installed weights is a clear error, never a
    request leaving the machine (tests of the downloader serve files on 127.0.0.1 and lift this)."""
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    monkeypatch.delenv("SHITU_MODEL_MIRROR", raising=False)


@pytest.fixture(autouse=True)
def _fresh_plugin_host():
    reset_host()
    yield
    reset_host()


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """Run the ``shitu`` command in-process: ``cli("check", "--demo")``."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:  # pragma: no cover - main always exits
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled demo dataset."""
    target = tmp_path / "grocery"
    shutil.copytree(demo_dataset_path(), target)
    return target


def write_image(
    path: Path,
    size: tuple[int, int] = (24, 24),
    color: tuple[int, int, int] = (200, 30, 30),
    fmt: str = "JPEG",
    mode: str = "RGB",
) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path, format=fmt)
    return path


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a small synthetic ShiTuRecDataset: ``tiny_dataset(classes=3, per_class=4)``.

    Each class gets ``per_class`` images; lists split them 2 train / 1 gallery / rest query per class.
    """

    def make(classes: int = 3, per_class: int = 4, name: str = "tiny") -> Path:
        root = tmp_path / name
        lines: dict[str, list[str]] = {"train": [], "gallery": [], "query": []}
        for c in range(classes):
            for i in range(per_class):
                rel = f"images/c{c}/img{i}.jpg"
                write_image(root / rel, color=(40 * c % 256, 20 * i % 256, 90))
                split = "train" if i < 2 else "gallery" if i == 2 else "query"
                lines[split].append(f"{rel} {c}")
        for split, content in lines.items():
            (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in content))
        return root

    return make


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below ``root`` and the SHA-256 of its content (to prove nothing changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
