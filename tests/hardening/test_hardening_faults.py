"""Faults of the machine while a command writes: disk full (ENOSPC), a read-only file system (EROFS), permission
denied (EACCES), a folder gone (ENOENT). See docs/RELIABILITY.md, "Faults of the machine".

Two ways in:

- injection (every test here but the last): the file-system calls a command makes in the test's folder
  (``os.open`` and ``open`` for writing, ``os.mkdir``, ``os.replace``, ``os.rename``, ``os.fsync``, ``os.write``)
  are counted, and the N-th raises the fault, for N = 1, 2, ... (every N for the quick commands; a spread of
  them for the ones that load a model, all of them with ``-m slow``). The tests run as root, which ignores
  permissions, so EACCES and EROFS are injected too rather than made with chmod. Writes done by C++ libraries
  (TensorStore under Orbax, usearch) are not seen by the injection: the tmpfs test covers those.
- a real small file system (a 3 MB tmpfs, where ``mount`` is permitted; skipped otherwise) that training fills.

Each failed run must be one ``error:`` line naming a path in the test's folder and what to do, exit 1, leave
every file either as it was or as the clean run writes it (nothing half-written, no ``.tmp``/``.new``/``.bak``
/staging/journal/lock left), and the same command again (without the fault) must finish like the clean run.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import write_image

from shitu.data.demo import demo_dataset_path

FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: What a failed command must not leave behind (hidden staging entries, journals, locks, Orbax's temporaries).
LEFTOVER = re.compile(r"(^\..*\.(tmp|old|new)$)|(\.shitu-journal\.json)|(shitu-lock$)|(orbax-checkpoint-tmp)")


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below ``root`` and the SHA-256 of its content with ``root`` itself written as ``{root}`` (a
    report that names its folder is the same report in another folder)."""
    marker = os.fsencode(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes().replace(marker, b"{root}")).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Injector:
    """Counts the write calls under ``root`` and makes call number ``fail_at`` (1-based) raise ``code``."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.fail_at: int | None = None
        self.code = errno.ENOSPC
        self.calls: list[str] = []
        self.fired: str | None = None

    def _ours(self, path: object) -> bool:
        try:
            return os.fsdecode(os.path.abspath(os.fsdecode(path))).startswith(self.root)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def _step(self, name: str, path: object) -> None:
        if not self._ours(path):
            return
        self.calls.append(name)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            self.fired = f"{name} {path}"
            raise OSError(self.code, os.strerror(self.code), os.fsdecode(path))  # type: ignore[arg-type]

    @staticmethod
    def _fd_path(fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    @contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Injector]:
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
        real_replace, real_rename, real_fsync, real_write = os.replace, os.rename, os.fsync, os.write

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                self._step("open", file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS:
                self._step("os.open", path)
            return real_os_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            self._step("os.mkdir", path)
            return real_mkdir(path, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            self._step("os.replace", dst)
            return real_replace(src, dst, *args, **kwargs)

        def rename(src, dst, *args, **kwargs):
            self._step("os.rename", dst)
            return real_rename(src, dst, *args, **kwargs)

        def fsync(fd):
            self._step("os.fsync", self._fd_path(fd))
            return real_fsync(fd)

        def write(fd, data):
            self._step("os.write", self._fd_path(fd))
            return real_write(fd, data)

        with monkeypatch.context() as patch:
            patch.setattr(builtins, "open", open_)
            patch.setattr(os, "open", os_open)
            patch.setattr(os, "mkdir", mkdir)
            patch.setattr(os, "replace", replace)
            patch.setattr(os, "rename", rename)
            patch.setattr(os, "fsync", fsync)
            patch.setattr(os, "write", write)
            yield self


@dataclass
class Case:
    """A command (``{root}`` stands for the test's folder), how to lay out its inputs, and how its outcome is
    compared (``digest``: the files under ``root``; a command whose output carries times compares less)."""

    args: list[str]
    prepare: Callable[[Path], None]
    outcome: Callable[[Path], object] = tree_digest


def _run_with_fault(cli, injector: Injector, monkeypatch, args: list[str], fail_at: int, code: int):
    injector.calls.clear()
    injector.fail_at, injector.code, injector.fired = fail_at, code, None
    with injector.active(monkeypatch):
        return cli(*args)


def _one_error_line(result) -> str:
    """Exit 1, nothing on stdout, no traceback, and one ``error:`` line, the last on stderr (a command may
    have said what it loaded before)."""
    assert result.code == 1, (result.code, result.stderr)
    assert result.stdout == "", result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return errors[0]


def _bundle_info(folder: Path) -> object:
    """A bundle's description (its parameters' checksum included), or None when there is none."""
    file = folder / "shitu_model.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if LEFTOVER.search(p.name))


def _fault_loop(cli, monkeypatch, tmp_path: Path, case: Case, *, points: Callable[[list[str]], list[int]]) -> Counter:
    """The command clean (counting its write calls), then once per chosen call number with each fault: one
    line, nothing half-written, and the command again finishes as the clean run did."""
    reference_root = tmp_path / "reference"
    case.prepare(reference_root)
    before_reference = tree_digest(reference_root)
    before_outcome = case.outcome(reference_root) if case.outcome is not tree_digest else None
    injector = Injector(reference_root)
    args = [a.replace("{root}", str(reference_root)) for a in case.args]
    clean = _run_with_fault(cli, injector, monkeypatch, args, fail_at=0, code=errno.ENOSPC)
    assert clean.code == 0, clean.stderr
    total = len(injector.calls)
    assert total >= 1
    after_reference = tree_digest(reference_root)
    expected = case.outcome(reference_root)
    outcomes: Counter[str] = Counter()
    for number, fail_at in enumerate(points(list(injector.calls))):
        code = list(FAULTS)[number % len(FAULTS)]
        root = tmp_path / f"fault{fail_at}"
        case.prepare(root)
        injector.root = str(root)
        args = [a.replace("{root}", str(root)) for a in case.args]
        result = _run_with_fault(cli, injector, monkeypatch, args, fail_at=fail_at, code=code)
        where = f"{errno.errorcode[code]} at call {fail_at}/{total} ({injector.fired})"
        if result.code == 0:  # a call whose failure is harmless (a lock's PID note, a cache)
            outcomes["harmless"] += 1
            outcomes[f"harmless {injector.fired.split()[0]}"] += 1  # type: ignore[union-attr]
        else:
            line = _one_error_line(result)
            assert FAULTS[code] in line and str(root) in line, (where, line)
            assert "run the same command again" in line or "--resume" in line or "--overwrite" in line, line
            outcomes[errno.errorcode[code]] += 1
        left = _leftovers(root)
        if any(name.endswith(".shitu-journal.json") for name in left):  # past the commit point of a list update
            assert all(re.search(r"(\.new|\.shitu-journal\.json)$", name) for name in left), (where, left)
            outcomes["journal"] += 1  # (the next command that reads the lists finishes the renames)
        else:
            assert left == [], (where, left)
        if case.outcome is tree_digest:  # each file as it was or as the clean run writes it, never half
            for name, digest in tree_digest(root).items():
                if LEFTOVER.search(Path(name).name):
                    continue  # a staged list of the journal (checked above)
                assert digest in (before_reference.get(name), after_reference.get(name)), (where, name)
        else:  # the whole result (e.g. the index, which must open) as it was or as the clean run leaves it
            assert _relocated(case.outcome(root), root, reference_root) in (before_outcome, expected), where
        if result.code != 0:  # the same command again finishes the job
            again = cli(*args)
            assert again.code == 0, (where, again.stderr)
        assert _relocated(case.outcome(root), root, reference_root) == expected, where
        assert _leftovers(root) == [], (where, _leftovers(root))
        shutil.rmtree(root)
    outcomes["calls"] = total
    return outcomes


def _relocated(outcome: object, old: Path, new: Path) -> object:
    """An outcome that names paths under ``old`` with them under ``new`` (e.g. index items)."""
    if isinstance(outcome, str):
        return outcome.replace(str(old), str(new))
    if isinstance(outcome, dict):
        return {_relocated(k, old, new): _relocated(v, old, new) for k, v in outcome.items()}
    if isinstance(outcome, (list, tuple)):
        return type(outcome)(_relocated(v, old, new) for v in outcome)
    return outcome


def every(calls: list[str]) -> list[int]:
    return list(range(1, len(calls) + 1))


def spread(count: int) -> Callable[[list[str]], list[int]]:
    """The first and the last call of each kind (``os.open``, ``os.replace``, ...), and ``count`` more spread
    over the run."""

    def choose(calls: list[str]) -> list[int]:
        total = len(calls)
        chosen = {1 + round(i * (total - 1) / max(1, count - 1)) for i in range(count)}
        for kind in set(calls):
            numbers = [n for n, name in enumerate(calls, 1) if name == kind]
            chosen.update((numbers[0], numbers[-1]))
        return sorted(chosen)

    return choose


# -- the commands --------------------------------------------------------------------------------------------


def _demo_dataset(root: Path) -> None:
    shutil.copytree(demo_dataset_path(), root / "ds")


def _small_dataset(root: Path) -> None:
    """3 classes × 4 images of 24 px: train 2, gallery 1, query 1 each."""
    lines: dict[str, list[str]] = {"train": [], "gallery": [], "query": []}
    for c in range(3):
        for i in range(4):
            rel = f"images/c{c}/img{i}.jpg"
            write_image(root / "ds" / rel, color=(70 * c, 50 * i, 90))
            lines["train" if i < 2 else "gallery" if i == 2 else "query"].append(f"{rel} {c}\n")
    for split, content in lines.items():
        (root / "ds" / f"{split}.txt").write_text("".join(content))


def _labelme(root: Path) -> None:
    folder = root / "lm"
    (folder / "annotations").mkdir(parents=True)
    (folder / "label.txt").write_text("cat\ndog\n")
    for i, label in enumerate(["cat", "dog", "cat", "dog", "cat"]):
        write_image(folder / "images" / f"i{i}.jpg", size=(8, 8))
        document = {"imagePath": f"../images/i{i}.jpg", "flags": {"cat": label == "cat", "dog": label == "dog"}}
        (folder / "annotations" / f"i{i}.json").write_text(json.dumps(document))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny PP-ShiTuV2_rec bundle (×0.25, 32 px), outside the folders the faults are injected in."""
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    arch = {"scale": 0.25}
    return save_bundle(
        tmp_path_factory.mktemp("faults-bundle") / "bundle", spec=spec, model=spec.build(3, seed=0, **arch),
        num_classes=3, arch=arch, extra={"input_size": 32},
    )  # fmt: skip


def _index_items(root: Path) -> list[tuple[int, int, str]]:
    from shitu.index.core import open_index

    return [(item.key, item.label, item.path) for item in open_index(root / "idx").items]


def _with_index(bundle: Path) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        from shitu.index.core import build_index

        _small_dataset(root)
        paths = [
            str(root / "ds" / line.split(" ")[0])
            for line in (root / "ds" / "gallery.txt").read_text().split("\n")
            if line
        ]
        import numpy as np

        features = np.random.default_rng(0).standard_normal((len(paths), 512)).astype(np.float32)
        info = {"model": "PP-ShiTuV2_rec", "embedding_size": 512, "input_size": 32, "bundle": str(bundle)}
        build_index(features, [0, 1, 2], paths, output=root / "idx", recognizer_info=info)

    return prepare


def test_split_every_call_fails_cleanly(cli, monkeypatch, tmp_path):
    case = Case(
        ["split", "{root}/ds", "--train", "50", "--gallery", "25", "--query", "25", "--seed", "1"], _small_dataset
    )
    outcomes = _fault_loop(cli, monkeypatch, tmp_path, case, points=every)
    print(f"split: {dict(outcomes)}")
    assert outcomes["calls"] >= 10 and sum(outcomes[errno.errorcode[c]] for c in FAULTS) >= 10


def test_convert_every_call_fails_cleanly(cli, monkeypatch, tmp_path):
    outcomes = _fault_loop(cli, monkeypatch, tmp_path, Case(["convert", "{root}/lm"], _labelme), points=every)
    print(f"convert: {dict(outcomes)}")
    assert sum(outcomes[errno.errorcode[c]] for c in FAULTS) >= 8


@pytest.mark.parametrize("points", [spread(3), pytest.param(every, marks=pytest.mark.slow)], ids=["spread", "every"])
def test_check_fails_cleanly(cli, monkeypatch, tmp_path, points):
    case = Case(["check", "{root}/ds", "--output", "{root}/out"], _demo_dataset)
    outcomes = _fault_loop(cli, monkeypatch, tmp_path, case, points=points)
    print(f"check: {dict(outcomes)}")
    assert sum(outcomes[errno.errorcode[c]] for c in FAULTS) >= 3


@pytest.mark.parametrize("points", [spread(2), pytest.param(every, marks=pytest.mark.slow)], ids=["spread", "every"])
def test_index_remove_fails_cleanly(cli, monkeypatch, tmp_path, bundle, points):
    case = Case(["index", "remove", "--index", "{root}/idx", "0"], _with_index(bundle), outcome=_index_items)
    outcomes = _fault_loop(cli, monkeypatch, tmp_path, case, points=points)
    print(f"index remove: {dict(outcomes)}")
    assert sum(outcomes[errno.errorcode[c]] for c in FAULTS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["index build", "index add", "eval", "predict", "import-weights"],
)
def test_model_commands_fail_cleanly(cli, monkeypatch, tmp_path, bundle, name):
    rec = Path(__file__).parents[1] / "fixtures" / "paddle" / "PP-ShiTuV2_rec" / "PP-ShiTuV2_rec.pdparams"
    cases = {
        "index build": Case(
            ["index", "build", "--model-dir", str(bundle), "--gallery", "{root}/ds/gallery.txt", "--output",
             "{root}/idx", "--overwrite"], _with_index(bundle), outcome=_index_items,
        ),
        "index add": Case(
            ["index", "add", "--index", "{root}/idx", "--model-dir", str(bundle), "--label", "0",
             "{root}/ds/images/c0/img0.jpg"],
            _with_index(bundle), outcome=_index_items,
        ),
        "eval": Case(
            ["eval", "--model-dir", str(bundle), "--dataset", "{root}/ds", "--output", "{root}/out"], _small_dataset,
            outcome=lambda root: _names_in(root / "out"),
        ),
        "predict": Case(
            ["predict", "{root}/ds/images/c1", "--model-dir", str(bundle), "--save-dir", "{root}/res", "--npy",
             "{root}/feat.npy"], _small_dataset,
        ),
        "import-weights": Case(
            ["import-weights", str(rec), "-m", "PP-ShiTuV2_rec", "--output", "{root}/b", "--overwrite"],
            lambda root: root.mkdir(parents=True),
            outcome=lambda root: _bundle_info(root / "b"),
        ),
    }  # fmt: skip
    outcomes = _fault_loop(cli, monkeypatch, tmp_path, cases[name], points=spread(8))
    print(f"{name}: {dict(outcomes)}")
    assert sum(outcomes[errno.errorcode[c]] for c in FAULTS) >= 3


# -- a real full disk --------------------------------------------------------------------------------------


@contextmanager
def _small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_resumable(tmp_path):
    """``shitu train`` into a 3 MB tmpfs: the first checkpoint (or bundle) does not fit. One line naming the
    path (Orbax's asyncio tracebacks are gone), no Orbax temporary or staging folder, and after more space
    the hint's command finishes the run."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_train import TINY_CLI, _subset

    dataset = _subset(tmp_path / "ds")
    with _small_tmpfs(tmp_path / "disk", "3m") as disk:
        output = disk / "run"
        command = [sys.executable, "-m", "shitu", "train", "--dataset", str(dataset), "--output", str(output)]
        done = subprocess.run([*command, *TINY_CLI], capture_output=True, text=True, timeout=900)
        assert done.returncode == 1, done.stderr
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
        assert "no space left on device" in errors[0] and str(output) in errors[0], errors[0]
        assert _leftovers(output) == [], _leftovers(output)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        hint = re.search(r"with --overwrite|--resume", errors[0])
        assert hint is not None, errors[0]
        again = (
            [*command, "--overwrite"]
            if hint.group(0) == "with --overwrite"
            else [*command[:4], "--resume", "--output", str(output)]
        )
        finished = subprocess.run([*again, *TINY_CLI], capture_output=True, text=True, timeout=900)
        assert finished.returncode == 0, finished.stderr
        assert (output / "best_model").is_dir() and (output / "latest_model").is_dir()
        assert _leftovers(output) == [], _leftovers(output)
