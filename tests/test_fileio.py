"""Crash safety of every write: atomic files, journalled multi-file replacement, recovery, backups."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shitu.fileio as fileio
from shitu.data.formats import SPLITS, SplitOptions
from shitu.data.split import split_dataset
from shitu.fileio import (
    JOURNAL_NAME,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    backup_name,
    recover,
    replace_together,
)

OLD = {"train.txt": b"t1\nt2\n", "gallery.txt": b"g1\n", "query.txt": b"q1\n"}
NEW = {"train.txt": b"t1\ng1\n", "gallery.txt": b"q1\n", "query.txt": b"t2\n"}


class Crash(BaseException):
    """Stands for the process dying at this point (a BaseException, so no 'except Exception' catches it)."""


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def contents(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in OLD}


def stage(tmp_path: Path) -> Path:
    directory = tmp_path / "ds"
    directory.mkdir()
    for name, data in OLD.items():
        (directory / name).write_bytes(data)
    return directory


def new_files(directory: Path) -> dict[Path, bytes]:
    return {directory / name: data for name, data in NEW.items()}


# -- single files --------------------------------------------------------------------------------------


def test_atomic_write_text_replaces_and_keeps_bytes(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "a\r\nb\n")
    assert target.read_bytes() == b"a\r\nb\n"  # line endings as given, folder created
    atomic_write_text(target, "ü\n")
    assert target.read_bytes() == "ü\n".encode()
    assert names(target.parent) == ["f.txt"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_exception_inside_atomic_open_keeps_old_content_and_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(target) as handle:
        handle.write("half of the new")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert names(tmp_path) == ["f.txt"]
    with pytest.raises(KeyboardInterrupt), atomic_open(tmp_path / "g.txt", "wb") as handle:
        handle.write(b"x")
        raise KeyboardInterrupt
    assert names(tmp_path) == ["f.txt"]


def test_bad_mode_leaks_neither_temp_file_nor_descriptor(tmp_path):
    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    with pytest.raises(ValueError), atomic_open(tmp_path / "f.txt", "wz"):
        pass  # pragma: no cover
    assert names(tmp_path) == []
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


def test_atomic_write_json_keeps_unicode(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"name": "苹果"}, indent=None)
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{"name": "苹果"}\n'


# -- backup names --------------------------------------------------------------------------------------


def test_backup_name_numbering(tmp_path):
    f = tmp_path / "train.txt"
    assert backup_name(f) is None  # nothing to keep
    f.write_text("v3")
    assert backup_name(f) == tmp_path / "train.txt.bak"
    (tmp_path / "train.txt.bak").write_text("v3")
    assert backup_name(f) is None  # already kept
    (tmp_path / "train.txt.bak").write_text("v1")
    assert backup_name(f) == tmp_path / "train.txt.bak.1"
    (tmp_path / "train.txt.bak.1").write_text("v2")
    assert backup_name(f) == tmp_path / "train.txt.bak.2"
    (tmp_path / "train.txt.bak.1").write_text("v3")
    assert backup_name(f) is None
    # A gap (bak.1 deleted) never makes an older number hold newer content, and a later match counts.
    (tmp_path / "train.txt.bak.1").unlink()
    (tmp_path / "train.txt.bak.3").write_text("v2")
    assert backup_name(f) == tmp_path / "train.txt.bak.4"
    (tmp_path / "train.txt.bak.3").write_text("v3")
    assert backup_name(f) is None
    # Names that only look like backups are not counted.
    (tmp_path / "train.txt.bak.3").unlink()
    (tmp_path / "train.txt.bak.07").write_text("x")
    (tmp_path / "train.txt.bak.old").write_text("y")
    (tmp_path / "train.txt.bak.9.tmp").write_text("z")
    assert backup_name(f) == tmp_path / "train.txt.bak.1"


# -- replacing files together ----------------------------------------------------------------------------


def test_replace_together_backs_up_and_skips_unchanged(tmp_path):
    directory = stage(tmp_path)
    files = {**new_files(directory), directory / "query.txt": OLD["query.txt"]}  # query.txt unchanged
    inode = (directory / "query.txt").stat().st_ino
    backups = replace_together(files)
    assert backups == [directory / "train.txt.bak", directory / "gallery.txt.bak"]
    assert (directory / "train.txt").read_bytes() == NEW["train.txt"]
    assert (directory / "train.txt.bak").read_bytes() == OLD["train.txt"]
    assert (directory / "query.txt").stat().st_ino == inode  # not even rewritten
    assert replace_together(files) == []
    assert names(directory) == ["gallery.txt", "gallery.txt.bak", "query.txt", "train.txt", "train.txt.bak"]


def test_replace_together_refuses_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="one directory"):
        replace_together({tmp_path / "x": b"1", tmp_path / "a" / "y": b"2"})
    assert replace_together({}) == []


def test_crash_after_journal_is_rolled_forward_by_recover(tmp_path, monkeypatch):
    directory = stage(tmp_path)
    real = fileio._recover_locked
    calls = []

    def crash_on_second_call(path):
        calls.append(path)
        if len(calls) == 2:  # the first call finishes older updates; the second does the renames
            raise Crash
        return real(path)

    monkeypatch.setattr(fileio, "_recover_locked", crash_on_second_call)
    with pytest.raises(Crash):
        replace_together(new_files(directory))
    monkeypatch.undo()
    assert contents(directory) == OLD  # nothing renamed yet
    journal = json.loads((directory / JOURNAL_NAME).read_text())
    assert sorted(journal["rename"].values()) == sorted(OLD)
    assert all((directory / tmp).is_file() for tmp in journal["rename"])

    assert recover(directory) is True
    assert contents(directory) == NEW
    assert names(directory) == sorted([*OLD, *(f"{name}.bak" for name in OLD)])
    assert recover(directory) is False


def test_recover_finishes_a_half_done_rename(tmp_path):
    directory = stage(tmp_path)
    (directory / ".train.txt.aaa.new").write_bytes(NEW["train.txt"])
    (directory / "gallery.txt").write_bytes(NEW["gallery.txt"])  # already renamed before the crash
    (directory / ".query.txt.ccc.new").write_bytes(NEW["query.txt"])
    journal = {
        ".train.txt.aaa.new": "train.txt",
        ".gallery.txt.bbb.new": "gallery.txt",
        ".query.txt.ccc.new": "query.txt",
    }
    (directory / JOURNAL_NAME).write_text(json.dumps({"rename": journal}))
    assert recover(directory) is True
    assert contents(directory) == NEW
    assert names(directory) == sorted(OLD)


def test_crash_before_journal_keeps_old_set_and_next_replace_cleans_up(tmp_path):
    directory = stage(tmp_path)
    # What a kill before the commit point leaves: staged lists, half-written backup and journal temp files.
    leftovers = [".train.txt.k1.new", ".gallery.txt.k2.new", ".train.txt.bak.k3.tmp", f".{JOURNAL_NAME}.k4.tmp"]
    for leftover in leftovers:
        (directory / leftover).write_bytes(b"partial")
    (directory / "notes.new").write_text("mine")  # not ours: must stay
    assert recover(directory) is False  # no journal: nothing to roll forward
    assert contents(directory) == OLD
    replace_together(new_files(directory))
    assert contents(directory) == NEW
    assert not [name for name in names(directory) if name.startswith(".")]
    assert (directory / "notes.new").read_text() == "mine"


def test_exception_while_staging_removes_staged_files(tmp_path, monkeypatch):
    directory = stage(tmp_path)

    def no_journal(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio, "atomic_write_json", no_journal)
    with pytest.raises(OSError, match="no space left on device") as info:  # a StorageError naming the folder
        replace_together(new_files(directory))
    assert info.value.errno == 28 and info.value.path == str(directory)
    assert contents(directory) == OLD
    assert not [name for name in names(directory) if name.startswith(".")]


@pytest.mark.parametrize(
    "renames",
    [
        {"../x": "train.txt"},
        {".train.txt.a.new": "../x"},
        {".train.txt.a.new": "sub/train.txt"},
        {".train.txt.a.new": ""},
        {".train.txt.a.new": "."},
        {".train.txt.a.new": "gallery.txt"},  # a staged file only ever replaces its own target
        {".train.txt.a.new": JOURNAL_NAME},
        {"query.txt": "train.txt"},  # not a staged file
        {str(Path("/abs/.train.txt.a.new")): "train.txt"},
        {".train.txt.a.new": 5},
    ],
)
def test_journal_never_renames_outside_or_foreign_files(tmp_path, renames):
    outside = tmp_path / "x"
    outside.write_bytes(b"outside")
    directory = stage(tmp_path)
    (directory / ".train.txt.a.new").write_bytes(b"staged")
    (directory / JOURNAL_NAME).write_text(json.dumps({"rename": renames}))
    assert recover(directory) is True
    assert outside.read_bytes() == b"outside"
    assert contents(directory) == OLD
    assert (directory / ".train.txt.a.new").read_bytes() == b"staged"
    assert not (directory / JOURNAL_NAME).exists()


@pytest.mark.parametrize("journal", ["not json", "[1, 2]", '{"rename": [1]}', '{"other": {}}'])
def test_foreign_journal_is_dropped_without_touching_data(tmp_path, journal):
    directory = stage(tmp_path)
    (directory / JOURNAL_NAME).write_text(journal)
    assert recover(directory) is True
    assert contents(directory) == OLD
    assert names(directory) == sorted(OLD)


def test_crash_at_every_step_leaves_old_or_new_set(tmp_path, monkeypatch):
    """Fail at each file-system step in turn; after recover the lists are all old or all new, and a
    second replace then completes with every old list kept in a backup."""
    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # still a crash point below, without the disk wait
    budget = [0]

    def counted(real):
        def wrapper(*args, **kwargs):
            if budget[0] == 0:
                raise Crash
            budget[0] -= 1
            return real(*args, **kwargs)

        return wrapper

    step = 0
    while True:
        directory = tmp_path / f"run{step}"
        directory.mkdir()
        for name, data in OLD.items():
            (directory / name).write_bytes(data)
        budget[0] = step
        monkeypatch.setattr(os, "replace", counted(real_replace))
        monkeypatch.setattr(os, "fsync", counted(lambda fd: None))
        try:
            replace_together(new_files(directory))
            finished = True
        except Crash:
            finished = False
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(os, "fsync", lambda fd: None)
        recover(directory)
        state = contents(directory)
        assert state in (OLD, NEW), f"mixed set after a crash at step {step}"
        replace_together(new_files(directory))
        assert contents(directory) == NEW
        kept = {p.read_bytes() for p in directory.glob("*.bak*")}
        assert set(OLD.values()) <= kept, f"an old list was lost after a crash at step {step}"
        assert not [n for n in names(directory) if n.startswith(".")]
        if finished:
            break
        step += 1
    assert step > 10  # every backup, staged file, journal and rename step was a crash point


# -- a real kill -9 ---------------------------------------------------------------------------------------


def _dataset(root: Path, n: int = 200) -> Path:
    lines = [f"images/c{i % 20}/img{i:03d}.jpg {i % 20}\n" for i in range(n)]
    root.mkdir(parents=True)
    (root / "images").mkdir()
    (root / "train.txt").write_text("".join(lines[:120]))
    (root / "gallery.txt").write_text("".join(lines[120:160]))
    (root / "query.txt").write_text("".join(lines[160:]))
    return root


def _lists(root: Path) -> dict[str, bytes]:
    return {split: (root / f"{split}.txt").read_bytes() for split in SPLITS}


def _union(lists: dict[str, bytes]) -> list[bytes]:
    return sorted(line for data in lists.values() for line in data.splitlines())


def test_kill_9_during_split_loses_nothing(tmp_path):
    template = _dataset(tmp_path / "template")
    old = _lists(template)
    reference = tmp_path / "reference"
    shutil.copytree(template, reference)
    split_dataset(reference, SplitOptions(60, 20, 20, seed=9))
    new = _lists(reference)
    assert new != old
    command = [sys.executable, "-m", "shitu", "split", "", "--train", "60", "--gallery", "20", "--query", "20"]
    command += ["--seed", "9"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    def launch(root: Path) -> subprocess.Popen:
        command[4] = str(root)
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    # One full run measures how long a split takes here; the kills then land across that time.
    calibration = tmp_path / "calibration"
    shutil.copytree(template, calibration)
    started = time.monotonic()
    assert launch(calibration).wait(timeout=30) == 0
    duration = time.monotonic() - started
    assert _lists(calibration) == new

    rng = random.Random(20240601)
    for attempt in range(10):
        root = tmp_path / f"try{attempt}"
        shutil.copytree(template, root)
        process = launch(root)
        time.sleep(rng.uniform(0.3, 1.1) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        recover(root)
        state = _lists(root)
        assert state in (old, new), f"try {attempt}: a mixed or partial set of lists"
        assert _union(state) == _union(old)
        assert not (root / JOURNAL_NAME).exists()
        for split in SPLITS:  # whatever backups exist hold the old lists exactly
            backup = root / f"{split}.txt.bak"
            assert not backup.exists() or backup.read_bytes() == old[split]
        # The next split completes the job from whatever the kill left.
        split_dataset(root, SplitOptions(60, 20, 20, seed=9))
        assert _lists(root) == new
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
        assert {split: (root / f"{split}.txt.bak").read_bytes() for split in SPLITS} == old
