"""Crash safety of ``shitu convert`` and ``shitu split`` (issue 7): the command is killed with SIGKILL, and
the lists must be entirely the old or entirely the new version (after the roll-forward that every later
command does first), the backups must hold the old lists exactly, and a later run must finish the job.

Two kinds of kill, both on the real command line in a subprocess:

- *stepped*: a wrapper stops the command before each file-system step (``os.replace``, ``os.rename``,
  ``os.fsync``, ``os.unlink``) and the test kills it before step k, for every k: every crash point between
  two I/O calls is tried, deterministically;
- *timed*: a plain ``python -m shitu`` killed after a random delay (spread over a calibrated run).

tests/test_fileio.py has 10 timed kills of ``shitu split``; the loops here are longer (marked slow, run by
``nox -s reliability``) and one short stepped loop runs by default.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import write_image

from shitu.data.formats import SPLITS
from shitu.fileio import JOURNAL_NAME, recover

WRAPPER = """
import os, sys

def stepped(name, real):
    def step(*args, **kwargs):
        sys.stdout.write(name + "\\n")
        sys.stdout.flush()
        if sys.stdin.readline() != "go\\n":
            os._exit(3)
        return real(*args, **kwargs)
    return step

for name in ("replace", "rename", "fsync", "unlink"):
    setattr(os, name, stepped(name, getattr(os, name)))
from shitu.cli import main
main(sys.argv[1:])
"""
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "SHITU_TRACE_PLUGINS": "", "SHITU_DEBUG": ""}

Lists = dict[str, bytes | None]


def lists_of(root: Path) -> Lists:
    return {
        split: (root / f"{split}.txt").read_bytes() if (root / f"{split}.txt").exists() else None for split in SPLITS
    }


@dataclass
class Scenario:
    """A dataset template, the command run on a copy of it, and the lists before and after."""

    template: Path
    args: list[str]
    old: Lists
    new: Lists

    def copy(self, target: Path) -> Path:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.template, target, symlinks=True)
        return target

    def command(self, root: Path) -> list[str]:
        return [arg.replace("{root}", str(root)) for arg in self.args]


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shitu", *args], env=ENV, capture_output=True, text=True, timeout=120, check=False
    )


def labelme_template(root: Path, images: int = 40) -> Path:
    classes = ["apple", "pear", "plum", "fig", "kiwi"]
    (root / "annotations").mkdir(parents=True)
    (root / "label.txt").write_text("".join(f"{c}\n" for c in classes))
    for i in range(images):
        write_image(root / "images" / f"img{i:03d}.jpg", size=(8, 8), color=(i * 6 % 256, 20, 20))
        flags = {c: c == classes[i % len(classes)] for c in classes}
        document = {"imagePath": f"../images/img{i:03d}.jpg", "flags": flags}
        (root / "annotations" / f"img{i:03d}.json").write_text(json.dumps(document))
    return root


def shiturec_template(root: Path, images: int = 120) -> Path:
    lines = [f"images/c{i % 12}/img{i:03d}.jpg {i % 12}\n" for i in range(images)]
    (root / "images").mkdir(parents=True)
    (root / "train.txt").write_text("".join(lines[: images // 2]))
    (root / "gallery.txt").write_text("".join(lines[images // 2 : images * 3 // 4]))
    (root / "query.txt").write_text("".join(lines[images * 3 // 4 :]))
    return root


def make_scenario(base: Path, kind: str) -> Scenario:
    """``convert-first`` (no lists yet), ``convert-again`` (lists and backups exist), ``split``,
    ``split-again`` (older backups hold something else: the new one is numbered)."""
    template = base / f"template-{kind}"
    if kind.startswith("convert"):
        labelme_template(template)
        args = ["convert", "{root}", "--train", "50", "--gallery", "30", "--query", "20", "--seed", "2"]
        if kind == "convert-again":
            assert run_cli(["convert", str(template)]).returncode == 0  # PaddleX's own 50/30/20 in order
    else:
        shiturec_template(template)
        args = ["split", "{root}", "--train", "60", "--gallery", "20", "--query", "20", "--seed", "9"]
        if kind == "split-again":
            assert (
                run_cli(["split", str(template), "--train", "40", "--gallery", "30", "--query", "30"]).returncode == 0
            )
    old = lists_of(template)
    reference = Scenario(template, args, old, {}).copy(base / f"reference-{kind}")
    result = run_cli([a.replace("{root}", str(reference)) for a in args])
    assert result.returncode == 0, result.stderr
    new = lists_of(reference)
    assert new != old and None not in new.values()
    return Scenario(template, args, old, new)


def check_after_kill(scenario: Scenario, root: Path, outcomes: Counter[str]) -> None:
    """The invariants after a kill, then recovery by a later run."""
    before_recovery = lists_of(root)
    pending = (root / JOURNAL_NAME).exists()
    if not pending:  # no roll-forward pending: the lists on disk are one whole version already
        assert before_recovery in (scenario.old, scenario.new), "a mixed set of lists without a journal"
    for split, data in before_recovery.items():  # each file, even mid-commit, is one version or the other
        assert data in (scenario.old[split], scenario.new[split])
    rolled = recover(root)
    state = lists_of(root)
    assert state in (scenario.old, scenario.new), "a mixed set of lists after recovery"
    outcomes["rolled forward" if rolled else ("new" if state == scenario.new else "old")] += 1
    for split in SPLITS:  # a backup, once written, holds an old list exactly
        for backup in root.glob(f"{split}.txt.bak*"):
            if backup.name.startswith(f"{split}.txt.bak") and scenario.old[split] is not None:
                previous = [scenario.old[split], *(p.read_bytes() for p in scenario.template.glob(f"{split}.txt.bak*"))]
                assert backup.read_bytes() in previous, backup
    # A later run finishes the job from whatever the kill left.
    result = run_cli(scenario.command(root))
    assert result.returncode == 0, result.stderr
    assert lists_of(root) == scenario.new
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "leftover temporary files"
    for split in SPLITS:
        if scenario.old[split] is not None and scenario.old[split] != scenario.new[split]:
            backups = [p.read_bytes() for p in root.glob(f"{split}.txt.bak*")]
            assert scenario.old[split] in backups, f"the old {split}.txt was lost"


def start_stepped(scenario: Scenario, root: Path, wrapper: Path) -> subprocess.Popen[str]:
    """The scenario's command under ``wrapper``, which prints a line before each file-system step and waits
    for one on stdin."""
    return subprocess.Popen(
        [sys.executable, str(wrapper), *scenario.command(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )


def count_steps(scenario: Scenario, root: Path, wrapper: Path) -> int:
    process = start_stepped(scenario, root, wrapper)
    steps = 0
    assert process.stdout is not None and process.stdin is not None
    while process.stdout.readline():
        steps += 1
        process.stdin.write("go\n")
        process.stdin.flush()
    assert process.wait(timeout=120) == 0
    assert lists_of(root) == scenario.new
    return steps


def kill_before_step(scenario: Scenario, root: Path, wrapper: Path, step: int) -> None:
    process = start_stepped(scenario, root, wrapper)
    assert process.stdout is not None and process.stdin is not None
    for _ in range(step):
        assert process.stdout.readline()
        process.stdin.write("go\n")
        process.stdin.flush()
    assert process.stdout.readline()  # the command now waits before this step: the kill lands there
    process.kill()  # SIGKILL
    process.wait(timeout=60)
    process.stdin.close()
    process.stdout.close()


def stepped_loop(tmp_path: Path, kind: str, choose: Callable[[int], list[int]]) -> Counter[str]:
    scenario = make_scenario(tmp_path, kind)
    wrapper = tmp_path / "stepped.py"
    wrapper.write_text(WRAPPER)
    steps = count_steps(scenario, scenario.copy(tmp_path / "count"), wrapper)
    assert steps >= 8, steps  # backups, staged lists, journal and renames are all steps
    outcomes: Counter[str] = Counter()
    for step in choose(steps):
        root = scenario.copy(tmp_path / f"step{step}")
        kill_before_step(scenario, root, wrapper, step)
        check_after_kill(scenario, root, outcomes)
        shutil.rmtree(root)
    outcomes["kills"] = len(choose(steps))
    outcomes["steps"] = steps
    return outcomes


def timed_loop(tmp_path: Path, kind: str, kills: int, seed: int) -> Counter[str]:
    scenario = make_scenario(tmp_path, kind)
    calibration = scenario.copy(tmp_path / "calibration")
    started = time.monotonic()
    assert run_cli(scenario.command(calibration)).returncode == 0
    duration = time.monotonic() - started
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    for attempt in range(kills):
        root = scenario.copy(tmp_path / f"try{attempt}")
        process = subprocess.Popen(
            [sys.executable, "-m", "shitu", *scenario.command(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        time.sleep(rng.uniform(0.3, 1.05) * duration)
        process.kill()
        process.wait(timeout=60)
        check_after_kill(scenario, root, outcomes)
        shutil.rmtree(root)
    outcomes["kills"] = kills
    return outcomes


def test_convert_killed_before_and_after_its_commit_point_loses_nothing(tmp_path):
    """The default run's short loop: a re-conversion killed before its first write and before its last
    three steps from the end (the journal written, the renames done; then the journal is removed, the folder
    flushed and the dataset's lock file removed)."""
    outcomes = stepped_loop(tmp_path, "convert-again", lambda n: [0, n - 3])
    assert outcomes["old"] == 1 and outcomes["rolled forward"] == 1, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["convert-first", "convert-again", "split", "split-again"])
def test_killed_before_every_step_loses_nothing(tmp_path, kind):
    outcomes = stepped_loop(tmp_path, kind, lambda n: list(range(n)))
    print(f"{kind}: {dict(outcomes)}")
    assert outcomes["old"] >= 1 and outcomes["rolled forward"] >= 1, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["convert-first", "convert-again", "split-again"])
def test_killed_at_random_moments_loses_nothing(tmp_path, kind):
    outcomes = timed_loop(tmp_path, kind, kills=20, seed=7)
    print(f"{kind}: {dict(outcomes)}")
    assert outcomes["kills"] == 20
