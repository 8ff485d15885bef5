"""Training speed of PP-ShiTuV2_rec: shitu's compiled JAX step against PaddlePaddle dygraph, same model and batch.

Both sides train the full-width PP-ShiTuV2_rec (PPLCNetV2_base_ShiTu + BNNeck + FC head) in train mode with the
PP-ShiTuV2 recipe: CE (label smoothing 0.1) + TripletAngularMarginLoss, Momentum 0.9 with L2 weight decay. Batches
are synthetic (random images, PK labels: batch/4 identities × 4 images), so only the training step is timed.

- shitu: :class:`shitu.train.step.TrainStep` with PP-ShiTuV2_rec's recipe loss and ``make_optimizer`` — exactly what
  ``shitu train`` runs; compile time is measured apart, then one warm-up step;
- Paddle: ``benchmarks/_paddle_train.py --serve`` in ``.venv-paddle`` (PaddleClas' RecModel, dygraph,
  OMP_NUM_THREADS=2), one warm-up step.

The two run *interleaved* (``--rounds`` × (``--steps`` shitu steps, then as many Paddle steps), both processes
alive), so a busy shared machine slows both alike; each step's wall time and process CPU time are recorded and
the medians reported (CPU time is the steadier measure when other work competes for the cores).

``--trainer`` also times ``shitu train`` end to end (decoding, augmentation, the step) on the demo dataset.

Usage: ``.venv/bin/python benchmarks/bench_train.py [--sizes 128 224] [--batch 32] [--rounds 3] [--steps 2]``.
Prints a machine line and a Markdown table (``--json``: also one JSON document with every sample).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
PADDLE_PY = ROOT / ".venv-paddle" / "bin" / "python"
NUM_CLASSES = 100


class JaxSide:
    """shitu's training step (exactly what ``shitu train`` runs) on synthetic PK batches."""

    def __init__(self, batch: int, size: int, device: str) -> None:
        from functools import partial

        import jax
        import numpy as np
        from flax import nnx

        from shitu.models import pplcnetv2_recipe
        from shitu.models.pplcnetv2 import build_pp_shituv2_rec
        from shitu.runtime import configure_jax
        from shitu.train.devices import select_devices
        from shitu.train.optim import make_optimizer, parameter_groups
        from shitu.train.step import TrainStep

        configure_jax()
        model = build_pp_shituv2_rec(NUM_CLASSES, rngs=nnx.Rngs(0))
        recipe = pplcnetv2_recipe.RECIPE
        tx, schedule = make_optimizer(
            model,
            learning_rate=0.01,
            epochs=10,
            warmup_epochs=1,
            steps_per_epoch=100,
            weight_decay=recipe.weight_decay,
            groups=parameter_groups(model, recipe),
        )
        self.owner = TrainStep(
            model,
            loss_fn=partial(pplcnetv2_recipe.loss, train=True),
            tx=tx,
            schedule=schedule,
            devices=select_devices(device)[:1],
            seed=0,
        )
        self.state = self.owner.initial_state(model)
        self.compile_s = self.owner.compile(self.state, (batch, size, size, 3)).seconds
        rng = np.random.default_rng(0)
        labels = np.repeat(np.arange(batch // 4), 4).astype(np.int32)
        self.batches = [
            self.owner.shard_batch(rng.standard_normal((batch, size, size, 3)).astype(np.float32), labels)
            for _ in range(2)
        ]
        self.device = str(jax.devices(self.owner.mesh.devices.flat[0].platform)[0].device_kind)
        self.done = 0
        t0 = time.perf_counter()
        self.step()
        self.first_s = time.perf_counter() - t0

    def step(self) -> float:
        import jax

        self.state, metrics = self.owner(self.state, *self.batches[self.done % 2], self.done)
        self.done += 1
        return float(jax.device_get(metrics["loss"]))

    def timed(self, count: int) -> dict:
        walls, cpus, losses = [], [], []
        for _ in range(count):
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(self.step())
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        return {"wall_s": walls, "cpu_s": cpus, "losses": losses}


class PaddleSide:
    """``_paddle_train.py --serve`` in the Paddle environment: it runs steps when asked."""

    def __init__(self, batch: int, size: int) -> None:
        command = [
            str(PADDLE_PY),
            str(ROOT / "benchmarks" / "_paddle_train.py"),
            "--serve",
            "--batch",
            str(batch),
            "--size",
            str(size),
            "--num-classes",
            str(NUM_CLASSES),
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="2"),
        )
        ready = self._read()
        self.first_s = ready["first_s"]
        self.version = ready["paddle"]

    def _read(self) -> dict:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the Paddle side ended early (run benchmarks/_paddle_train.py to see why)")
            if line.startswith("{"):
                return json.loads(line)

    def timed(self, count: int) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(f"run {count}\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait(timeout=120)


def measure(batch: int, size: int, steps: int, rounds: int, device: str, paddle: bool) -> dict:
    """Interleaved: ``rounds`` × (``steps`` shitu steps, then ``steps`` Paddle steps)."""
    jax_side = JaxSide(batch, size, device)
    paddle_side = PaddleSide(batch, size) if paddle else None
    sides: dict[str, object] = {"jax": jax_side, "paddle": paddle_side}
    samples = {name: {"wall_s": [], "cpu_s": []} for name in sides}
    try:
        for _ in range(rounds):
            for name, side in sides.items():
                if side is not None:
                    runs = side.timed(steps)  # type: ignore[attr-defined]
                    samples[name]["wall_s"] += runs["wall_s"]
                    samples[name]["cpu_s"] += runs["cpu_s"]
    finally:
        if paddle_side is not None:
            paddle_side.close()
    row: dict = {
        "batch": batch,
        "size": size,
        "jax": {"device": jax_side.device, "compile_s": jax_side.compile_s, "first_s": jax_side.first_s},
    }
    if paddle_side is not None:
        row["paddle"] = {"version": paddle_side.version, "first_s": paddle_side.first_s}
    for name in row.keys() & {"jax", "paddle"}:
        side = row[name]
        side.update(samples[name])
        side["median_wall_s"] = statistics.median(side["wall_s"])
        side["median_cpu_s"] = statistics.median(side["cpu_s"])
        side["images_per_s"] = batch / side["median_wall_s"]
    return row


def trainer_rate(batch: int, size: int, epochs: int, device: str) -> dict:
    """End-to-end ``shitu train`` on the demo dataset (120 training images): images/s of the training steps
    with decoding and augmentation in the loop (median over the epochs after the first)."""
    from shitu.config import load_config
    from shitu.data.demo import demo_dataset_path
    from shitu.train.trainer import train

    config = load_config(
        "PP-ShiTuV2_rec",
        {
            "Train.batch_size": batch,
            "Train.input_size": size,
            "Train.epochs_iters": epochs,
            "Train.eval_interval": epochs,
            "Train.pretrain_weight_path": None,
            "Global.device": device,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train(config, dataset_dir=demo_dataset_path(), output=Path(tmp) / "run")
    rates = [row["images_per_s"] for row in result.history if row["images_per_s"]]
    return {
        "compile_s": result.compile_seconds,
        "epochs": [{k: row[k] for k in ("epoch", "images_per_s", "seconds", "recall1")} for row in result.history],
        "images_per_s": statistics.median(rates[1:] or rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-paddle", action="store_true")
    parser.add_argument("--trainer", action="store_true", help="also time shitu train end to end (demo dataset)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import flax
    import jax

    started = datetime.datetime.now(datetime.UTC)
    machine = (
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, Python {platform.python_version()}, "
        f"jax {jax.__version__}, flax {flax.__version__}, Linux {platform.release()}"
    )
    print(f"Machine: {machine}")
    print(f"Date: {started:%Y-%m-%d %H:%M} UTC; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    for size in args.sizes:
        row = measure(args.batch, size, args.steps, args.rounds, args.device, not args.no_paddle)
        if args.trainer:
            row["trainer"] = trainer_rate(args.batch, size, 3, args.device)
        rows.append(row)
        print(f"  measured {size} px", file=sys.stderr)
    print(f"Load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"shitu device: {rows[0]['jax']['device']}; Paddle: {rows[0].get('paddle', {}).get('version', 'not run')}")
    print()
    print(
        "| input | batch | shitu compile s | shitu s/step (wall, CPU) | shitu images/s | "
        "Paddle s/step (wall, CPU) | Paddle images/s | speed-up (wall, CPU) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        j, p = row["jax"], row.get("paddle")
        if p is not None:
            paddle_cells = f"{p['median_wall_s']:.2f}, {p['median_cpu_s']:.2f} | {p['images_per_s']:.2f}"
            ratio = f"{p['median_wall_s'] / j['median_wall_s']:.2f}×, {p['median_cpu_s'] / j['median_cpu_s']:.2f}×"
        else:
            paddle_cells, ratio = "not run | n/a", "n/a"
        print(
            f"| {row['size']} | {row['batch']} | {j['compile_s']:.1f} | {j['median_wall_s']:.2f}, "
            f"{j['median_cpu_s']:.2f} | {j['images_per_s']:.2f} | {paddle_cells} | {ratio} |"
        )
    if args.trainer:
        print()
        for row in rows:
            t = row["trainer"]
            print(f"shitu train end to end at {row['size']} px, batch {row['batch']}: {t['images_per_s']:.2f} images/s")
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}))


if __name__ == "__main__":
    main()
