"""Two processes on this machine, one job: JAX's distributed runtime with Gloo's CPU collectives.

Each case starts real processes (``python -m shitu ... --coordinator 127.0.0.1:PORT --num-processes 2
--process-id I``, one CPU device each) and compares with one process:

- training: 20 steps on 2 processes give the parameters of 1 process with 2 devices (the same global batch
  over the same mesh shape) — the multi-process plumbing adds nothing; that the device count does not change
  the result is tests/test_train.py's check;
- a stop that reaches one process only (SIGTERM to process 0) stops both at the same step with a checkpoint,
  and ``--resume`` on 2 processes ends with the weights of the uninterrupted run;
- both processes killed with SIGKILL after the first checkpoint: ``--resume`` on 2 processes finishes the run
  with the weights of the uninterrupted run;
- ``shitu eval`` and ``shitu index build`` over 2 processes give the metrics and the index of 1 process.

Slow (each process imports JAX and compiles; ~1 min per case on 2 cores): run by ``nox -s distributed``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import pytest

from shitu.data.demo import demo_dataset_path

pytestmark = pytest.mark.slow

CLASSES = tuple(range(8))
TRAIN_PER_CLASS = 4  # 32 images: 4 batches of 8 per epoch
EPOCHS = 5  # 20 steps
TINY = {
    "Train.model_scale": 0.5,
    "Train.input_size": 32,
    "Train.batch_size": 8,
    "Train.epochs_iters": EPOCHS,
    "Train.warmup_steps": 1,
    "Train.learning_rate": 0.01,
    "Train.eval_interval": EPOCHS,
    "Train.save_interval": EPOCHS,
    "Evaluate.batch_size": 16,
    "Global.device": "cpu",
    "Train.pretrain_weight_path": None,  # random weights: the published ones are not downloaded in tests
}
TINY_CLI = [arg for key, value in TINY.items() for arg in ("-o", f"{key}={'null' if value is None else value}")]
TIMEOUT_S = 900


def _subset(root: Path) -> Path:
    """The demo dataset cut down to :data:`CLASSES` (training: 4 images each; gallery and query: all)."""
    shutil.copytree(demo_dataset_path(), root)
    for split in ("train", "gallery", "query"):
        kept, seen = [], {}
        for line in (root / f"{split}.txt").read_text().splitlines():
            label = int(line.rsplit(" ", 1)[1])
            seen[label] = seen.get(label, 0) + 1
            if label in CLASSES and not (split == "train" and seen[label] > TRAIN_PER_CLASS):
                kept.append(line)
        (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in kept))
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(devices: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHITU_COORDINATOR", "SHITU_NUM", "SHITU_PROC"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _processes(commands: list[list[object]], *, devices: int = 1, flags: bool = True) -> list[CompletedProcess]:
    """Run ``commands`` at once, one process each, and return their results in process order. ``{port}`` and
    ``{index}`` in an argument become the coordinator's port and the process index; with ``flags`` and several
    commands each also gets ``--coordinator --num-processes --process-id``. Output goes to files (a full pipe
    would stall a process, and with it the collectives of the others); every process is killed if one
    outlives :data:`TIMEOUT_S`."""
    port = str(_free_port())
    with tempfile.TemporaryDirectory() as logs:
        started = []
        for index, command in enumerate(commands):
            args = [str(a).replace("{port}", port).replace("{index}", str(index)) for a in command]
            if flags and len(commands) > 1:
                args += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(len(commands))]
                args += ["--process-id", str(index)]
            out, err = Path(logs, f"{index}.out"), Path(logs, f"{index}.err")
            with out.open("w") as stdout, err.open("w") as stderr:
                started.append((subprocess.Popen(args, stdout=stdout, stderr=stderr, env=_env(devices)), out, err))
        try:
            for process, _, _ in started:
                process.wait(timeout=TIMEOUT_S)
        finally:
            for process, _, _ in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return [
            CompletedProcess(process.args, process.returncode, out.read_text(), err.read_text())
            for process, out, err in started
        ]


def _shitu(*args: object) -> list[str]:
    return [sys.executable, "-m", "shitu", *(str(a) for a in args)]


def _params(bundle: Path) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    from shitu.models.bundle import load_bundle

    state = nnx.state(load_bundle(bundle).model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _ok(results: list[CompletedProcess]) -> None:
    """Every process exited 0; else the command and each process's last stderr lines."""
    if any(done.returncode != 0 for done in results):
        report = [" ".join(str(a) for a in results[0].args[2:8])]
        for index, done in enumerate(results):
            lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line]
            report.append(f"--- process {index} (exit {done.returncode}):\n" + "\n".join(lines[-25:])[-2500:])
        pytest.fail("\n".join(report))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _subset(tmp_path_factory.mktemp("mp") / "grocery8")


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, Any]:
    """The reference run (1 process, 2 devices) and the same run on 2 processes, both through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    train = ["train", "--dataset", dataset, "--json", *TINY_CLI]
    (one,) = _processes([_shitu(*train, "--output", root / "one")], devices=2)
    _ok([one])
    two = _processes([_shitu(*train, "--output", root / "two")] * 2)
    _ok(two)
    return {"one": root / "one", "two": root / "two", "stdout0": two[0].stdout, "stdout1": two[1].stdout}


def test_two_processes_train_as_one_process(runs):
    one, two = runs["one"], runs["two"]
    lines = [json.loads(line) for line in runs["stdout0"].splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["epoch"] * EPOCHS + ["done"]
    assert runs["stdout1"] == ""  # process 1 prints nothing
    assert lines[-1]["iterations"] == 20
    diff = _max_diff(_params(two / "latest_model"), _params(one / "latest_model"))
    assert diff <= 1e-5, diff
    assert _max_diff(_params(two / "latest_model"), _params(two / "best_model")) == 0.0
    history = [json.loads((run / "train_result.json").read_text())["history"] for run in (one, two)]
    assert [row["loss"] for row in history[1]] == pytest.approx([row["loss"] for row in history[0]], rel=1e-5)
    assert history[1][-1]["recall1"] == pytest.approx(history[0][-1]["recall1"], abs=1e-6)
    log = (two / "train.log").read_text()
    assert log.count("Start training") == 1 and "2 cpu device(s)" in log  # one writer, one global mesh
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["20"]


DRIVER = r"""
import json, os, signal, sys
from shitu.runtime import distributed
from shitu.config import load_config
from shitu.train.trainer import TrainingInterrupted, train

port, index, dataset, output, tiny = sys.argv[1:6]
info = distributed.initialize(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=int(index))

def stop_process_0(kind, data):
    if kind == "step" and data["iteration"] == 6 and info.process_index == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # only process 0 is told to stop

try:
    train(load_config("PP-ShiTuV2_rec", json.loads(tiny)), dataset_dir=dataset, output=output,
          on_event=stop_process_0)
except TrainingInterrupted as exc:
    print(json.dumps({"epoch": exc.epoch, "step": exc.step, "checkpoint": str(exc.checkpoint)}))
"""


def test_a_stop_in_one_process_stops_both_and_resume_finishes_the_run(runs, dataset, tmp_path):
    output = tmp_path / "stopped"
    driver = [sys.executable, "-c", DRIVER, "{port}", "{index}", dataset, output, json.dumps(TINY)]
    stopped = _processes([driver] * 2, flags=False)
    _ok(stopped)
    for done in stopped:
        assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2  # both: epoch 2, step 2 = iteration 6
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["6"]
    assert json.loads((output / "train_result.json").read_text())["done_flag"] is False

    resumed = _processes([_shitu("train", "--resume", "--output", output, "--json")] * 2)
    _ok(resumed)
    assert resumed[1].stdout == ""
    lines = [json.loads(line) for line in resumed[0].stdout.splitlines() if line.strip()]
    assert [line["epoch"] for line in lines if line["event"] == "epoch"] == [2, 3, 4, 5]
    assert _max_diff(_params(output / "latest_model"), _params(runs["two"] / "latest_model")) == 0.0
    assert "Resume training" in (output / "train.log").read_text()


def test_eval_and_index_build_over_two_processes_match_one(runs, dataset, tmp_path):
    bundle = runs["two"] / "best_model"
    evaluate = ["eval", "--model-dir", bundle, "--dataset", dataset, "--json", "--batch-size", "4"]
    build = ["index", "build", "--model-dir", bundle, "--gallery", dataset / "gallery.txt", "--json"]
    (one_eval,) = _processes([_shitu(*evaluate, "--output", tmp_path / "eval1")])
    two_eval = _processes([_shitu(*evaluate, "--output", tmp_path / "eval2")] * 2)
    (one_index,) = _processes([_shitu(*build, "--output", tmp_path / "index1")])
    two_index = _processes([_shitu(*build, "--output", tmp_path / "index2")] * 2)
    _ok([one_eval, *two_eval, one_index, *two_index])

    assert two_eval[1].stdout == "" and two_index[1].stdout == ""
    details = [json.loads(done.stdout)["details"] for done in (one_eval, two_eval[0])]
    assert (details[1]["num_gallery"], details[1]["num_query"]) == (8 * 2, 8 * 3)
    headline = [{k: d["metrics"][k] for k in ("recall1", "recall5", "mAP", "num_queries")} for d in details]
    assert headline[1] == pytest.approx(headline[0], abs=1e-6)
    assert (tmp_path / "eval2" / "evaluate_result.json").is_file()

    from shitu.index import open_index

    indexes = [open_index(tmp_path / name) for name in ("index1", "index2")]
    assert [(i.key, i.label, i.path) for i in indexes[1].items] == [(i.key, i.label, i.path) for i in indexes[0].items]
    assert len(indexes[1]) == 8 * 2
    vectors = np.stack([indexes[0]._index.get(item.key) for item in indexes[0].items])
    for item, hits in zip(indexes[0].items, indexes[1].search(vectors, 1, exact=True), strict=True):
        assert hits[0].key == item.key and hits[0].score == pytest.approx(1.0, abs=1e-5)  # the same vectors


def test_a_killed_two_process_run_resumes(runs, dataset, tmp_path):
    """SIGKILL both processes (as a scheduler ending the job does) once the first checkpoint exists;
    ``--resume`` on 2 processes then ends with the weights of the uninterrupted run."""
    import signal
    import time

    output = tmp_path / "killed"
    port = str(_free_port())
    every_epoch = [a.replace(f"Train.save_interval={EPOCHS}", "Train.save_interval=1") for a in map(str, TINY_CLI)]
    command = _shitu("train", "--dataset", dataset, "--output", output, "--json", *every_epoch)
    started = []
    with tempfile.TemporaryDirectory() as logs:
        for index in range(2):
            flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(index)]
            with Path(logs, f"{index}.err").open("w") as err:
                started.append(subprocess.Popen([*command, *flags], stdout=subprocess.DEVNULL, stderr=err, env=_env()))
        try:
            deadline = time.monotonic() + TIMEOUT_S
            checkpoints = output / "checkpoints"
            while time.monotonic() < deadline and all(p.poll() is None for p in started):
                if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
                    break
                time.sleep(0.2)
            time.sleep(1.5)  # land somewhere after the first checkpoint: mid-epoch or mid-save
            assert all(p.poll() is None for p in started), "the run ended before it could be killed"
        finally:
            for process in started:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                process.wait()
    assert all(p.returncode == -signal.SIGKILL for p in started)
    assert json.loads((output / "train_result.json").read_text())["done_flag"] is False

    resumed = _processes([_shitu("train", "--resume", "--output", output, "--json")] * 2)
    _ok(resumed)
    lines = [json.loads(line) for line in resumed[0].stdout.splitlines() if line.strip()]
    assert lines[-1]["event"] == "done" and lines[-1]["iterations"] == 20
    assert "Resume training" in (output / "train.log").read_text()
    assert _max_diff(_params(output / "latest_model"), _params(runs["two"] / "latest_model")) == 0.0
