"""``shitu train`` killed at any moment and resumed, and two trainings on one folder (see docs/RELIABILITY.md).

The run is tests/test_train.py's tiny one (PP-ShiTuV2_rec at width 0.25, 32 px, 4 classes × 4 training images,
batches of 8, 4 epochs, a checkpoint every epoch, an evaluation every second), with the same settings, so
the persistent JAX compilation cache serves both. The kill loop runs ``python -m shitu train`` and kills it
with SIGKILL, half the time at a random moment of a calibrated run and half the time just after an epoch
ended (in the checkpoint, evaluation and bundle writes); the next command is ``--resume`` (or, when the run
has no checkpoint yet, a fresh start with ``--overwrite``), until the run finishes. Every finished run must
equal an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hardening_support import assert_cli_failed_cleanly
from test_train import CLASSES, EPOCHS, TINY, TINY_CLI  # the same tiny run: one compiled step for both

from shitu.data.demo import demo_dataset_path

ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "SHITU_DEBUG": ""}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The demo dataset cut down to 4 classes, 4 training images each (2 batches of 8 per epoch)."""
    root = tmp_path_factory.mktemp("train") / "grocery4"
    shutil.copytree(demo_dataset_path(), root)
    for split in ("train", "gallery", "query"):
        kept, seen = [], Counter()
        for line in (root / f"{split}.txt").read_text().splitlines():
            label = int(line.rsplit(" ", 1)[1])
            seen[label] += 1
            if label in CLASSES and (split != "train" or seen[label] <= 4):
                kept.append(line)
        (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in kept))
    return root


class Training:
    """``python -m shitu train ... --json`` in a subprocess; its epoch lines are read as they come."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.epochs: list[dict] = []
        self.new_epoch = threading.Event()
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shitu", "train", *args, "--json"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=ENV,
                cwd=log.parent,  # every path is absolute; and `-m` then imports shitu as installed
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip():
                row = json.loads(line)
                if row.get("event") == "epoch":
                    self.epochs.append(row)
                    self.new_epoch.set()
        self.new_epoch.set()

    def finished(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; whether it ended by itself."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def close(self) -> int | None:
        if self.process.poll() is None:
            self.kill()
        self.reader.join(timeout=30)
        self.process.stdout.close()
        return self.process.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _params(bundle: Path) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    from shitu.models.bundle import load_bundle

    state = nnx.state(load_bundle(bundle).model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _check_files_whole(output: Path) -> None:
    """What a kill may leave: every JSON and YAML shitu writes is whole (written atomically), or absent."""
    from shitu.config import load_config

    if (output / "train_result.json").exists():
        json.loads((output / "train_result.json").read_text())
    if (output / "config.yaml").exists():
        load_config(output / "config.yaml")


#: What a kill can leave until the next run of the folder removes it (the two tests below check that it
#: does); counted, not failed: the temporary file or staging folder of a file or bundle being written
#: (``fileio.atomic_open``, ``atomic_directory``: ``.NAME.<8 characters>.tmp``), and an earlier run that
#: ``--overwrite`` moved aside when the new run was killed before its first checkpoint (or just after it).
STAGING = re.compile(r"\..+\.[a-z0-9_]{8}\.(tmp|old)")
PREVIOUS = re.compile(r"\.previous-run\.[0-9]{8}-[0-9]{6}\.[0-9]+")


def _check_finished(output: Path, reference: Path) -> list[str]:
    """A finished run is sound: done, its bundles load, and it equals the uninterrupted ``reference``.
    Returns the known leftovers (STAGING, PREVIOUS) in the folder; anything else left over fails."""
    doc = json.loads((output / "train_result.json").read_text())
    want = json.loads((reference / "train_result.json").read_text())
    assert doc["done_flag"] is True
    assert [row["epoch"] for row in doc["history"]] == list(range(1, EPOCHS + 1))
    for row, expected in zip(doc["history"], want["history"], strict=True):
        for key, value in expected.items():
            if key not in ("images_per_s", "seconds"):
                assert row[key] == (value if value is None else pytest.approx(value, rel=1e-5)), (row["epoch"], key)
    assert doc["models"]["best"]["score"] == pytest.approx(want["models"]["best"]["score"], rel=1e-5)
    for name in ("best_model", "latest_model"):
        got, expected = _params(output / name), _params(reference / name)
        assert got.keys() == expected.keys()
        assert max(float(np.max(np.abs(got[k] - expected[k]))) for k in got) <= 1e-5, name
    leftovers = [p.name for p in output.iterdir() if p.name.startswith(".") and p.name != ".shitu-train.lock"]
    assert all(STAGING.fullmatch(name) or PREVIOUS.fullmatch(name) for name in leftovers), leftovers
    return leftovers


def _next_command(output: Path, dataset: Path) -> tuple[list[str], str]:
    """``--resume`` when the run has a checkpoint to resume from, else a fresh start over what is there;
    no command when train_result.json already says done (killed while it was ending: ``--resume`` refuses a
    complete run)."""
    result = output / "train_result.json"
    if result.is_file() and json.loads(result.read_text())["done_flag"] is True:
        return [], "killed after done"
    checkpoints = output / "checkpoints"
    if (
        (output / "config.yaml").is_file()
        and checkpoints.is_dir()
        and any(p.name.isdigit() for p in checkpoints.iterdir())
    ):
        return ["--resume", "--output", str(output)], "resumed"
    return ["--dataset", str(dataset), "--output", str(output), "--overwrite", *TINY_CLI], "started again"


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_and_finishes_as_if_never_killed(dataset, tmp_path):
    rng = random.Random(11)
    reference = tmp_path / "reference"
    started = time.monotonic()
    straight = Training(["--dataset", str(dataset), "--output", str(reference), *TINY_CLI], tmp_path / "ref.log")
    assert straight.finished(timeout=900) and straight.close() == 0, straight.stderr()
    duration = time.monotonic() - started
    outcomes: Counter[str] = Counter()
    rounds = 0
    while outcomes["kills"] < 20:
        rounds += 1
        output = tmp_path / f"run{rounds}"
        args = ["--dataset", str(dataset), "--output", str(output), *TINY_CLI]
        how = "started"
        while True:
            run = Training(args, tmp_path / f"run{rounds}.log")
            if rng.random() < 0.5:  # at a random moment of a whole run
                done = run.finished(timeout=rng.uniform(0.2, 1.0) * duration)
            else:  # just after an epoch: in the checkpoint, the evaluation, the bundles, train_result.json
                seen = len(run.epochs)
                while len(run.epochs) == seen and run.process.poll() is None:
                    run.new_epoch.wait(timeout=1)
                    run.new_epoch.clear()
                done = run.finished(timeout=rng.uniform(0.0, 1.5))
            if done:
                code = run.close()
                if code == 0:
                    outcomes["finished before the kill"] += 1
                    break
                pytest.fail(f"`shitu train` ({how}) failed by itself (exit {code}):\n{run.stderr()[-3000:]}")
            run.kill()
            run.close()
            outcomes["kills"] += 1
            _check_files_whole(output)
            args, how = _next_command(output, dataset)
            outcomes[how] += 1
            if not args:
                break
        for name in _check_finished(output, reference):
            outcomes["left: temporary file or folder" if STAGING.fullmatch(name) else "left: previous run"] += 1
        outcomes["runs finished"] += 1
        shutil.rmtree(output)
    print(f"train kill loop: {dict(outcomes)}, one run {duration:.0f} s")
    assert outcomes["resumed"] >= 10, outcomes  # most kills came after a checkpoint


def test_second_training_on_the_same_folder_is_refused(dataset, tmp_path, cli):
    """A real ``shitu train`` holds the folder's lock: a second one on the same folder fails at once with one
    clear line, and leaves the first run's files alone."""
    output = tmp_path / "run"
    first = Training(["--dataset", str(dataset), "--output", str(output), *TINY_CLI], tmp_path / "first.log")
    try:
        lock = output / ".shitu-train.lock"
        deadline = time.monotonic() + 300
        while not (lock.is_file() and lock.read_text().strip() == str(first.process.pid)):  # written once locked
            assert first.process.poll() is None, first.stderr()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = sorted(p.name for p in output.iterdir())
        started = time.monotonic()
        second = cli("train", "--dataset", dataset, "--output", output, *TINY_CLI, "--json")
        assert time.monotonic() - started < 30  # before any compile
        message = assert_cli_failed_cleanly(second, code=1)
        assert "another 'shitu train' is running with this output folder" in message and str(output) in message
        resumed = cli("train", "--resume", "--output", output, "--json")  # a resume is no different
        if (output / "config.yaml").is_file():
            assert "another 'shitu train' is running" in assert_cli_failed_cleanly(resumed, code=1)
        assert first.process.poll() is None, first.stderr()  # the first one goes on
        assert set(before) <= {p.name for p in output.iterdir()}
    finally:
        first.close()  # SIGKILL


@pytest.mark.slow
def test_resume_removes_what_a_killed_bundle_save_left(dataset, tmp_path):
    from shitu.config import load_config
    from shitu.train.trainer import TrainingInterrupted, train

    output = tmp_path / "run"
    config = load_config("PP-ShiTuV2_rec", TINY)
    with pytest.raises(TrainingInterrupted):
        train(config, dataset_dir=dataset, output=output, max_steps=2)  # stops after epoch 1, checkpointed
    staging = output / ".latest_model.ab12cd34.tmp"  # as a kill inside atomic_directory leaves it
    staging.mkdir()
    (staging / "shitu_model.json").write_text("{")
    train(None, output=output, resume=True)
    assert not staging.exists()


@pytest.mark.slow
def test_overwrite_removes_every_previous_run_once_it_has_a_checkpoint(dataset, tmp_path):
    from shitu.config import load_config
    from shitu.train.trainer import TrainingInterrupted, train

    output = tmp_path / "run"
    earlier = output / ".previous-run.20260101-000000.12345"  # as a killed --overwrite leaves it
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "train_result.json").write_text("{}")
    (output / "train.log").write_text("a start killed before its first checkpoint\n")
    with pytest.raises(TrainingInterrupted):
        train(load_config("PP-ShiTuV2_rec", TINY), dataset_dir=dataset, output=output, overwrite=True, max_steps=2)
    assert (output / "checkpoints").is_dir()
    assert not [p.name for p in output.iterdir() if PREVIOUS.fullmatch(p.name)]
