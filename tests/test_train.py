"""Training: outputs as PaddleX, exact resume (after a stop and after kill -9), data-parallel equality, refusals.

Small on purpose: PP-ShiTuV2_rec at width scale 0.25, 32 px inputs, batches of 8 (K=4 → 2 identities), a demo
subset of 4 classes × 4 training images (2 iterations per epoch), gallery/query of the same 4 classes. The first
compile of the training step is slow (~1 min on 2 cores) but lands in the persistent compilation cache (configured
here as the CLI configures it), and the runs of this module share their compiled steps (:data:`COMPILED`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shitu import hookimpl
from shitu.data.demo import demo_dataset_path
from shitu.errors import ShituError
from shitu.train.compiled import CompiledSteps

#: Compiled steps shared by the runs of this module (identical shapes: a later run skips compiling).
COMPILED = CompiledSteps()

CLASSES = (0, 1, 2, 3)
TRAIN_PER_CLASS = 4
EPOCHS = 4
TINY = {
    "Train.model_scale": 0.25,
    "Train.input_size": 32,
    "Train.batch_size": 8,
    "Train.epochs_iters": EPOCHS,
    "Train.warmup_steps": 1,
    "Train.learning_rate": 0.01,
    "Train.eval_interval": 2,
    "Evaluate.batch_size": 32,
    "Global.device": "cpu",
    "Train.pretrain_weight_path": None,  # random weights: the published ones are not downloaded in tests
}
TINY_CLI = [arg for key, value in TINY.items() for arg in ("-o", f"{key}={'null' if value is None else value}")]


def _subset(root: Path) -> Path:
    """The demo dataset cut down to :data:`CLASSES`, 4 training images each (16 → 2 batches of 8)."""
    shutil.copytree(demo_dataset_path(), root)
    for split in ("train", "gallery", "query"):
        lines = (root / f"{split}.txt").read_text().splitlines()
        kept, seen = [], {}
        for line in lines:
            label = int(line.rsplit(" ", 1)[1])
            if label not in CLASSES:
                continue
            seen[label] = seen.get(label, 0) + 1
            if split == "train" and seen[label] > TRAIN_PER_CLASS:
                continue
            kept.append(line)
        (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in kept))
    return root


def _config(**overrides):
    from shitu.config import load_config

    return load_config("PP-ShiTuV2_rec", {**TINY, **overrides})


def _bundle_params(path: Path) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    from shitu.models.bundle import load_bundle

    state = nnx.state(load_bundle(path).model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _assert_same_history(history: list[dict], reference: list[dict]) -> None:
    """The per-epoch records agree (to float32 rounding), timing fields (which differ run to run) aside."""
    assert len(history) == len(reference)
    for row, want in zip(history, reference, strict=True):
        assert row.keys() == want.keys()
        for key, value in want.items():
            if key not in ("images_per_s", "seconds"):
                assert row[key] == (value if value is None else pytest.approx(value, rel=1e-6)), (row["epoch"], key)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from shitu.runtime import configure_jax

    configure_jax()  # the persistent compilation cache, as the CLI has it
    return _subset(tmp_path_factory.mktemp("train") / "grocery4")


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """One uninterrupted 4-epoch run (the reference of the resume tests)."""
    from shitu.train.trainer import train

    events: list[tuple[str, dict]] = []
    output = tmp_path_factory.mktemp("straight") / "run"
    result = train(
        _config(), dataset_dir=dataset, output=output, on_event=lambda k, d: events.append((k, d)), compiled=COMPILED
    )
    return result, events


def test_run_writes_paddlex_outputs(straight, dataset, cli):
    result, events = straight
    out = result.output
    for name in ("train_result.json", "train.log", "config.yaml", "label_dict.txt", "train_curves.png"):
        assert (out / name).is_file(), name
    assert (out / "best_model" / "shitu_model.json").is_file()
    assert (out / "latest_model" / "shitu_model.json").is_file()
    doc = json.loads((out / "train_result.json").read_text())
    assert doc["model_name"] == "PP-ShiTuV2_rec" and doc["done_flag"] is True
    assert (doc["config"], doc["train_log"], doc["label_dict"], doc["visualdl_log"]) == (
        "config.yaml",
        "train.log",
        "label_dict.txt",
        "",
    )
    assert set(doc["models"]) == {"last_1", "last_2", "last_3", "last_4", "last_5", "best"}
    best = doc["models"]["best"]
    assert best["pdparams"] == "best_model/params" and best["inference_config"] == "best_model/shitu_model.json"
    assert best["score"] == result.best["recall1"] and best["epoch"] == result.best["epoch"]
    last = doc["models"]["last_1"]
    assert last["bundle"] == "latest_model" and last["epoch"] == EPOCHS and (out / last["pdopt"]).is_dir()
    assert [doc["models"][f"last_{k}"]["epoch"] for k in (1, 2, 3)] == [4, 3, 2]  # checkpoints_to_keep: 3
    assert doc["models"]["last_2"]["score"] == ""  # epoch 3 was not evaluated
    assert doc["models"]["last_3"]["score"] == result.history[1]["recall1"]
    assert doc["models"]["last_4"]["pdparams"] == ""  # PaddleX's empty entry
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6", "8"]  # iterations

    # the per-epoch records: every term; metrics in [0, 1] on the evaluated epochs (eval_interval 2), else None
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    for row in result.history:
        assert {"loss", "CELoss", "TripletAngularMarginLoss", "lr", "images_per_s", "seconds"} <= row.keys()
        assert row["loss"] == pytest.approx(row["CELoss"] + row["TripletAngularMarginLoss"], rel=1e-5)
        if row["epoch"] % 2:
            assert row["recall1"] is row["recall5"] is row["mAP"] is None
            continue
        for key in ("recall1", "recall5", "mAP"):
            assert 0.0 <= row[key] <= 1.0
        assert row["recall5"] >= row["recall1"]
    assert result.history[-1]["lr"] < result.history[1]["lr"]  # cosine decay after the 1-epoch warm-up
    evaluated = [row for row in result.history if row["recall1"] is not None]
    assert result.best["recall1"] == max(row["recall1"] for row in evaluated)
    assert result.best["epoch"] == next(r["epoch"] for r in evaluated if r["recall1"] == result.best["recall1"])

    # train.log has PaddleX's lines; the label dict maps class index → original label
    log = (out / "train.log").read_text()
    assert "[Train][Epoch 1/4][Iter: 0/2]lr(Cosine): " in log and "ips: " in log
    assert f"[Eval][Epoch 4][Avg]recall1: {result.history[-1]['recall1']:.5f}, recall5: " in log
    assert (out / "label_dict.txt").read_text() == "0 0\n1 1\n2 2\n3 3\n"
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["start", "compiled"] and kinds[-1] == "done"
    assert kinds.count("step") == EPOCHS * 2 and kinds.count("epoch") == EPOCHS

    # best_model is a bundle that `shitu eval` takes, at the training input size, with the same numbers
    info = json.loads((out / "best_model" / "shitu_model.json").read_text())
    assert info["extra"]["input_size"] == 32 and info["arch"] == {"scale": 0.25} and info["num_classes"] == 4
    done = cli("eval", "--model-dir", out / "best_model", "--dataset", dataset, "--output", out / "eval", "--json")
    assert done.code == 0, done.stderr
    metrics = done.json()["metrics"]
    for key in ("recall1", "recall5", "mAP"):
        assert metrics[key] == pytest.approx(result.best[key], abs=1e-6)


def test_stop_and_resume_equals_straight(straight, dataset, tmp_path):
    """Ctrl-C in the middle of epoch 2 saves a checkpoint there; resuming gives the same weights and metrics."""
    from shitu.train.trainer import TrainingInterrupted, train

    reference, _ = straight
    output = tmp_path / "run"

    def press_ctrl_c(kind: str, data: dict) -> None:
        if kind == "step" and data["iteration"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: stop after this step

    with pytest.raises(TrainingInterrupted) as stopped:
        train(_config(), dataset_dir=dataset, output=output, on_event=press_ctrl_c, compiled=COMPILED)
    assert (stopped.value.epoch, stopped.value.step) == (2, 1)
    assert (output / "checkpoints" / "3").is_dir()
    assert json.loads((output / "train_result.json").read_text())["done_flag"] is False
    resumed = train(None, output=output, resume=True, compiled=COMPILED)
    assert _max_diff(_bundle_params(resumed.latest_model), _bundle_params(reference.latest_model)) <= 1e-6
    _assert_same_history(resumed.history, reference.history)
    assert resumed.best == pytest.approx(reference.best, rel=1e-6)
    assert "Resume training" in (output / "train.log").read_text()
    with pytest.raises(ShituError, match="complete"):
        train(None, output=output, resume=True, compiled=COMPILED)


@pytest.mark.slow
def test_kill_then_resume_equals_straight(straight, dataset, tmp_path, cli):
    """``shitu train --json`` killed with SIGKILL after its first checkpoint, then ``--resume``: same result."""
    reference, _ = straight
    output = tmp_path / "run"
    command = [sys.executable, "-m", "shitu", "train", "--dataset", str(dataset), "--output", str(output), "--json"]
    process = subprocess.Popen([*command, *TINY_CLI], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (output / "checkpoints").is_dir() or not any(
            p.name.isdigit() for p in (output / "checkpoints").iterdir()
        ):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    first_lines = [json.loads(line) for line in process.stdout.read().decode().splitlines() if line.strip()]
    assert all(line["event"] == "epoch" for line in first_lines)
    resumed = cli("train", "--resume", "--output", output, "--json")
    assert resumed.code == 0, resumed.stderr
    lines = resumed.json_lines()
    assert lines[-1]["event"] == "done"
    epochs = [line for line in lines if line["event"] == "epoch"]
    assert [line["epoch"] for line in epochs] == list(range(epochs[0]["epoch"], EPOCHS + 1))
    assert epochs[0]["epoch"] >= 2  # it resumed after the first checkpoint (epoch 1), not from scratch
    wanted = {"epoch", "loss", "CELoss", "lr", "images_per_s", "recall1", "recall5", "mAP", "seconds"}
    assert wanted <= epochs[-1].keys()
    assert _max_diff(_bundle_params(output / "latest_model"), _bundle_params(reference.latest_model)) <= 1e-6
    doc = json.loads((output / "train_result.json").read_text())
    _assert_same_history(doc["history"], reference.history)


MULTI_DEVICE_SCRIPT = r"""
import json, sys
from functools import partial
import jax, numpy as np
from flax import nnx
from shitu.models.vit import build_clip_vit
from shitu.models import pplcnetv2_recipe
from shitu.runtime import configure_jax
from shitu.train.optim import make_optimizer
from shitu.train.step import TrainStep

def run(devices):
    model = build_clip_vit(4, rngs=nnx.Rngs(0), embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=32,
                           remove_cls_token=True)
    tx, schedule = make_optimizer(model, learning_rate=0.05, epochs=2, warmup_epochs=0, steps_per_epoch=2,
                                  weight_decay=pplcnetv2_recipe.WEIGHT_DECAY)
    owner = TrainStep(model, loss_fn=partial(pplcnetv2_recipe.loss, train=True), tx=tx, schedule=schedule,
                      devices=devices, seed=0)
    state = owner.initial_state(model)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(2), 4).astype(np.int32)
    before = [np.asarray(a) for a in jax.tree.leaves(jax.device_get(state["params"]))]
    state, metrics = owner(state, *owner.shard_batch(images, labels), 0)
    after = [np.asarray(a) for a in jax.tree.leaves(jax.device_get(state["params"]))]
    return before, after, {k: float(v) for k, v in jax.device_get(metrics).items()}

configure_jax()
assert jax.device_count() == 4
b1, a1, m1 = run(jax.devices()[:1])
b4, a4, m4 = run(jax.devices())
print(json.dumps({
    "max_diff": max(float(np.max(np.abs(x - y))) for x, y in zip(a1, a4)),
    "max_update": max(float(np.max(np.abs(x - y))) for x, y in zip(a1, b1)),
    "loss": [m1["loss"], m4["loss"]],
}))
"""


def test_four_devices_equal_one():
    """One step data-parallel over 4 (forced host) devices updates the parameters as on 1 device.

    (A tiny CLIP ViT under the PP-ShiTuV2 loss — CE + the triplet loss over the *global* batch — and
    optimizer, so the check compiles in seconds; the step code is the same for every model.)"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_update"] > 1e-4  # the step really changed the weights
    assert result["max_diff"] <= 1e-5
    assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-6)


TRAINER_DEVICES_SCRIPT = r"""
import json, sys
import jax, numpy as np
import orbax.checkpoint as ocp
from shitu.config import load_config
from shitu.train.trainer import TrainingInterrupted, train

dataset, root, tiny = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
params = {}
for device in ("cpu:0", "cpu"):
    config = load_config("PP-ShiTuV2_rec", {**tiny, "Global.device": device, "Train.warmup_steps": 0})
    output = f"{root}/{device.replace(':', '-')}"
    try:
        train(config, dataset_dir=dataset, output=output, max_steps=1)
    except TrainingInterrupted:
        pass
    # the saved state is packed as one float32 vector; its layout (in the metadata) locates the parameters
    packed = np.asarray(ocp.StandardCheckpointer().restore(f"{output}/checkpoints/1/state")["float32"])
    layout = json.load(open(f"{output}/checkpoints/1/meta/metadata"))["state_layout"]
    sizes = [int(np.prod(shape)) for _, shape, _ in layout]
    starts = np.cumsum([0] + sizes)
    params[device] = np.concatenate(
        [packed[a:a + n] for (path, _, _), a, n in zip(layout, starts, sizes) if path.startswith("['params']")]
    )
diff = float(np.max(np.abs(params["cpu:0"] - params["cpu"])))
print(json.dumps({"max_diff": diff, "devices": jax.device_count()}))
"""


@pytest.mark.slow
def test_trainer_on_four_devices_equals_one(dataset, tmp_path):
    """The whole trainer (PP-ShiTuV2_rec with its BatchNorms, the sharded loader batches): one step on 4
    forced host devices gives the parameters of one step on 1 device.

    To float32 rounding: at 32 px the last stages are 1×1 maps, so BatchNorm normalises over 8 values and
    amplifies the different summation order of the sharded reductions (measured: gradients differ by ~1e-4
    relative, the parameters by ~3e-5 after a step of lr 0.01 — while the float32 gradient itself differs from
    a float64 one by ~1e-2 relative here). The tiny-ViT test above checks the step code itself to 1e-5."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", TRAINER_DEVICES_SCRIPT, str(dataset), str(tmp_path), json.dumps(TINY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["max_diff"] <= 1e-4


# ------------------------------------------------------------------------------------------------ refusals


def test_refuses_folder_with_another_run(dataset, tmp_path, cli):
    output = tmp_path / "run"
    output.mkdir()
    (output / "train_result.json").write_text("{}")
    done = cli("train", "--dataset", dataset, "--output", output, *TINY_CLI)
    assert done.code == 1
    assert "holds another training run" in done.stderr and "--overwrite" in done.stderr
    assert (output / "train_result.json").read_text() == "{}"


def test_refuses_batch_not_multiple_of_k(dataset, tmp_path, cli):
    done = cli("train", "--dataset", dataset, "--output", tmp_path / "run", *TINY_CLI, "-o", "Train.batch_size=6")
    assert done.code == 1 and "6" in done.stderr and "4" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_refuses_too_few_identities(dataset, tmp_path, cli):
    one_class = tmp_path / "one"
    shutil.copytree(dataset, one_class)
    lines = [line for line in (one_class / "train.txt").read_text().splitlines() if line.endswith(" 0")]
    (one_class / "train.txt").write_text("".join(f"{line}\n" for line in lines))
    done = cli("train", "--dataset", one_class, "--output", tmp_path / "run", *TINY_CLI)
    assert done.code == 1 and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "run").exists()


def test_refuses_dataset_that_fails_the_check(dataset, tmp_path, cli):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    first = (broken / "train.txt").read_text().splitlines()[0].split(" ")[0]
    (broken / first).unlink()
    done = cli("train", "--dataset", broken, "--output", tmp_path / "run", *TINY_CLI)
    assert done.code == 1 and "does not pass the check" in done.stderr and "image not found" in done.stderr
    assert not (tmp_path / "run").exists()


def test_refuses_second_concurrent_run(dataset, tmp_path, cli):
    output = tmp_path / "run"
    output.mkdir()
    with open(output / ".shitu-train.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running 'shitu train' holds it
        started = time.monotonic()
        done = cli("train", "--dataset", dataset, "--output", output, *TINY_CLI)
    assert done.code == 1 and "another 'shitu train' is running" in done.stderr
    assert time.monotonic() - started < 30  # at once, before any compile
    assert sorted(p.name for p in output.iterdir()) == [".shitu-train.lock"]


def test_refuses_resume_without_run_and_changed_config(dataset, tmp_path, straight, cli):
    done = cli("train", "--resume", "--output", tmp_path / "empty")
    assert done.code == 1 and "nothing to resume" in done.stderr
    reference, _ = straight
    copy = tmp_path / "copy"
    shutil.copytree(reference.output, copy, ignore=shutil.ignore_patterns(".shitu-train.lock"))
    done = cli("train", "--resume", "--output", copy, "-o", "Train.batch_size=16")
    assert done.code == 1 and "Train.batch_size" in done.stderr and "keeps its config" in done.stderr


def test_overwrite_replaces_the_old_run_only_once_the_new_one_has_a_checkpoint(straight, dataset, tmp_path):
    from shitu.train.trainer import TrainingInterrupted, train

    reference, _ = straight
    output = tmp_path / "run"
    shutil.copytree(reference.output, output, ignore=shutil.ignore_patterns(".shitu-train.lock"))
    seen: list[list[str]] = []

    def watch(kind: str, data: dict) -> None:
        if kind == "compiled":  # the new run started: the old one is aside, not deleted yet
            seen.append(sorted(p.name for p in output.iterdir() if p.name.startswith(".previous-run.")))

    with pytest.raises(TrainingInterrupted):
        train(
            _config(),
            dataset_dir=dataset,
            output=output,
            overwrite=True,
            max_steps=1,
            on_event=watch,
            compiled=COMPILED,
        )
    assert len(seen) == 1 and len(seen[0]) == 1
    assert not any(p.name.startswith(".previous-run.") for p in output.iterdir())
    assert not (output / "best_model").exists() and not (output / "latest_model").exists()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["1"]
    assert json.loads((output / "train_result.json").read_text())["done_flag"] is False


def test_pretrained_bundle_skips_a_head_of_another_size(straight, dataset, tmp_path):
    """--pretrained from a best_model trained on 4 classes, into a 5-class training: everything but the
    head is copied; the head starts afresh, with a warning."""
    from flax import nnx

    from shitu.plugins import get_host
    from shitu.weights.pretrained import load_pretrained

    reference, _ = straight
    spec = get_host().model("PP-ShiTuV2_rec")
    model = spec.build(5, seed=3, scale=0.25)
    warnings: list[str] = []
    load_pretrained(model, reference.best_model, spec=spec, emit=lambda kind, data: warnings.append(data["message"]))
    source = _bundle_params(reference.best_model)
    import jax

    loaded = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    }
    body = [k for k in source if not k.startswith("['head']")]
    assert body and all(np.array_equal(loaded[k], source[k]) for k in body)
    head = next(k for k in loaded if k.startswith("['head']"))
    assert loaded[head].shape == (512, 5)
    assert len(warnings) == 1 and "4 classes" in warnings[0] and "5" in warnings[0]


def test_embedder_set_state_swaps_weights_without_recompiling():
    from flax import nnx

    from shitu.models.inference import Embedder
    from shitu.models.vit import build_clip_vit

    def tiny(seed: int, depth: int = 1):
        return build_clip_vit(
            3,
            rngs=nnx.Rngs(seed),
            embed_dim=16,
            depth=depth,
            num_heads=2,
            patch_size=8,
            img_size=16,
            remove_cls_token=True,
        )

    images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    first, second = tiny(0), tiny(1)
    embedder = Embedder(first, buckets=(4,))
    before = embedder(images)
    expected = Embedder(second, buckets=(4,))(images)
    assert np.max(np.abs(before - expected)) > 1e-3
    second.eval()
    embedder.set_state(nnx.state(second))
    np.testing.assert_allclose(embedder(images), expected, rtol=1e-6, atol=1e-6)
    assert embedder.compiled_shapes() == 1
    other = tiny(2, depth=2)
    other.eval()
    with pytest.raises(ValueError, match="does not match"):
        embedder.set_state(nnx.state(other))


# ------------------------------------------------------------------------------------------ a plugin's own model

TINY_MODEL = "TinyNet-inline"


def build_tiny(num_classes: int, *, rngs, width: int = 8, **arch):
    """The module contract on a few layers: conv → mean pool → 16-d features; FC head with a bias."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self) -> None:
            self.num_classes = num_classes
            self.conv = nnx.Conv(3, width, (3, 3), strides=(2, 2), rngs=rngs)
            self.embed = nnx.Linear(width, 16, rngs=rngs)
            self.head = nnx.Linear(16, num_classes, rngs=rngs)

        def __call__(self, x):
            return self.embed(nnx.relu(self.conv(x)).mean(axis=(1, 2)))

        def logits(self, features, labels=None):
            return self.head(features)

    return Net()


def tiny_loss(model, images, labels, *, train: bool):
    """Plain CE plus a small feature-norm term: two terms no built-in recipe has."""
    import jax.numpy as jnp

    from shitu.train.losses import cross_entropy, features_and_logits

    features, logits, labels = features_and_logits(model, images, labels)
    ce = cross_entropy(logits, labels)
    norm = 1e-3 * jnp.mean(jnp.square(features))
    total = ce + norm
    return total, {"loss": total, "TinyCE": ce, "TinyNorm": norm}


class TinyTransform:
    """Resize, random horizontal flip, normalise (picklable: plain attributes)."""

    def __init__(self, size: int, mean: tuple, std: tuple) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image, rng):
        from shitu.data.transforms import resize
        from shitu.train.augment import normalize_hwc, random_hflip

        return normalize_hwc(random_hflip(resize(image, self.size, "bilinear"), rng), self.mean, self.std)


def tiny_transform(size: int, mean: tuple, std: tuple) -> TinyTransform:
    return TinyTransform(size, mean, std)


def tiny_groups(model):
    """No L2 on the conv kernel; the head's bias frozen."""
    return {("conv", "kernel")}, {("head", "bias")}


class TinyPlugin:
    """Registers :data:`TINY_MODEL` with the given recipe (None: not trainable)."""

    def __init__(self, recipe) -> None:
        self.recipe = recipe

    @hookimpl
    def register_models(self, register):
        from shitu.models.spec import ModelSpec

        register(
            ModelSpec(
                name=TINY_MODEL,
                description="an inline test network",
                builder=f"{__name__}:build_tiny",
                config="PP-ShiTuV2_rec",
                recipe=self.recipe,
                embedding_size=16,
                input_size=32,
            )
        )


def _tiny_recipe():
    from shitu.models.spec import TrainingRecipe

    return TrainingRecipe(
        loss=f"{__name__}:tiny_loss",
        train_transform=f"{__name__}:tiny_transform",
        parameter_groups=f"{__name__}:tiny_groups",
        weight_decay=1e-4,
        sampler="shuffle",
    )


def _register_tiny(recipe):
    from shitu.plugins import get_host

    info = get_host().register(TinyPlugin(recipe), name="tiny-inline")
    assert info.ok and info.models == [TINY_MODEL], info.errors
    return get_host()


def test_a_plugin_model_trains_with_its_own_recipe(dataset, tmp_path):
    """A model registered inline trains through ``train`` with its own loss, transform and parameter groups."""
    import jax
    from flax import nnx

    from shitu.config import load_config
    from shitu.train.trainer import train

    host = _register_tiny(_tiny_recipe())
    try:
        # the model's config: its spec names the built-in PP-ShiTuV2_rec file, loaded for this model
        config = load_config(TINY_MODEL, {**TINY, "Train.model_scale": 1.0, "Train.epochs_iters": 3})
        assert config.get("Global.model") == TINY_MODEL
        result = train(config, dataset_dir=dataset, output=tmp_path / "run", overrides=["Train.learning_rate=0.1"])
        initial = nnx.state(host.model(TINY_MODEL).build(4, seed=0), nnx.Param)
        trained = _bundle_params(result.latest_model)  # loading a bundle needs its model registered
    finally:
        host.unregister("tiny-inline")

    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    for row in result.history:
        assert {"TinyCE", "TinyNorm"} <= row.keys() and "TripletAngularMarginLoss" not in row
        assert row["loss"] == pytest.approx(row["TinyCE"] + row["TinyNorm"], rel=1e-5)
    assert result.history[-1]["TinyCE"] < result.history[0]["TinyCE"]
    log = (result.output / "train.log").read_text()
    assert "TinyCE: " in log and "TinyNorm: " in log
    start = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(initial)}
    assert trained.keys() == start.keys()

    def moved(layer: str, name: str) -> float:
        key = next(k for k in start if k.startswith(f"['{layer}']['{name}']"))
        return float(np.abs(trained[key] - start[key]).max())

    assert moved("conv", "kernel") > 1e-4 and moved("head", "kernel") > 1e-4
    assert moved("head", "bias") == 0.0  # frozen by the recipe
    assert load_config(result.output / "config.yaml").get("Global.model") == TINY_MODEL


def test_a_model_without_a_recipe_is_refused_before_any_work(dataset, tmp_path, cli):
    _register_tiny(None)
    try:
        done = cli("train", "--model", TINY_MODEL, "--dataset", dataset, "--output", tmp_path / "run", *TINY_CLI)
    finally:
        from shitu.plugins import get_host

        get_host().unregister("tiny-inline")
    assert done.code == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"model {TINY_MODEL} cannot be trained" in done.stderr
    assert not (tmp_path / "run").exists()


def test_settings_take_the_recipe_defaults_and_the_config_overrides(dataset, tmp_path):
    from shitu.config import load_config
    from shitu.train.settings import TrainSettings

    def settings(model: str, **overrides):
        config = load_config(model, {"Train.pretrain_weight_path": None, **overrides})
        return TrainSettings.from_config(config, output=tmp_path / "run", dataset_dir=dataset)

    rec = settings("PP-ShiTuV2_rec")
    assert (rec.weight_decay, rec.sampler, rec.arch) == (1e-5, "pk", {})
    assert settings("PP-ShiTuV2_rec_CLIP_vit_base").weight_decay == 2e-5
    tuned = settings("PP-ShiTuV2_rec", **{"Train.weight_decay": 0.5, "Train.model_scale": 0.5})
    assert (tuned.weight_decay, tuned.arch) == (0.5, {"scale": 0.5})
    assert tuned.config.get("Global.dataset_dir") == str(dataset) and tuned.dataset_dir == dataset
    for overrides, message in (
        ({"Train.weight_decay": -1.0}, "Train.weight_decay"),
        ({"Train.sampler": "random"}, "unknown sampler"),
        ({"Train.epochs_iters": 0}, "Train.epochs_iters"),
        ({"Train.model_scale": 5.0}, "Train.model_scale"),
    ):
        with pytest.raises(ShituError, match=message):
            settings("PP-ShiTuV2_rec", **overrides)
    assert not (tmp_path / "run").exists()
