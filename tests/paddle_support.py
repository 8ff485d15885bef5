"""Where tests that compare with PaddleClas' own code find PaddlePaddle and PaddleClas' sources.

The comparisons run PaddleClas' files (losses, optimizer, metrics) with the Python of a separate environment
that has PaddlePaddle (``.venv-paddle``, see ``nox -s parity``); they are skipped where either is missing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The Python of the environment with PaddlePaddle and paddleclas installed: ``$SHITU_PADDLE_PYTHON``, else
#: ``.venv-paddle`` (a nox session that installs both sides in one environment points it at its own Python).
PADDLE_PYTHON = Path(os.environ.get("SHITU_PADDLE_PYTHON") or ROOT / ".venv-paddle" / "bin" / "python")


def paddleclas_source(files: Sequence[str], tmp_path: Path) -> Path | None:
    """A folder holding every one of ``files`` (paths inside PaddleClas, e.g. ``ppcls/loss/celoss.py``).

    Looked for in ``$SHITU_PADDLECLAS_SRC`` (a PaddleClas checkout) and ``.work/paddleclas_src``; else
    extracted into ``tmp_path`` from the git directory ``$SHITU_PADDLECLAS_GIT`` (a PaddleClas clone or mirror,
    at HEAD). None when none of them has the files.
    """
    candidates = [Path(p) for p in (os.environ.get("SHITU_PADDLECLAS_SRC"),) if p]
    candidates.append(ROOT / ".work" / "paddleclas_src")
    for folder in candidates:
        if all((folder / name).is_file() for name in files):
            return folder
    git_dir = os.environ.get("SHITU_PADDLECLAS_GIT")
    if not git_dir or not Path(git_dir).is_dir():
        return None
    for name in files:
        shown = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{name}"], capture_output=True, check=False)
        if shown.returncode != 0:
            return None
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(shown.stdout)
    return tmp_path / "src"


def require_paddleclas(files: Sequence[str], tmp_path: Path) -> Path:
    """:func:`paddleclas_source`, skipping the test where PaddlePaddle's environment or the files are missing."""
    if not PADDLE_PYTHON.is_file():
        pytest.skip("no Paddle environment at .venv-paddle")
    source = paddleclas_source(files, tmp_path)
    if source is None:
        pytest.skip("PaddleClas sources not found (set SHITU_PADDLECLAS_SRC to a PaddleClas checkout)")
    return source
