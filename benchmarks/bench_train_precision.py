"""fp32 against bf16 mixed-precision training (``Train.precision``): speed and retrieval quality, side by side.

Two parts, each run for both precisions in this one process:

1. **Quality**: ``shitu train`` as ``shitu demo`` (quick budget) runs it: PP-ShiTuV2_rec at half width, 64 px,
   fine-tuned from the bundled starting weights on the demo set's 120 training photos (batch 20, 20 epochs =
   120 steps, same seed, same batches, same augmentation); Recall@1/Recall@5/mAP on the demo gallery/query after
   the last epoch and at the best epoch, and the training images/s (median over the epochs after the first).
2. **Step speed** (``--speed-size``, default 128; 0 skips it): the compiled training step alone (what
   ``shitu train`` runs) of the full-width model on synthetic PK batches of ``--speed-batch``, the two
   precisions interleaved (round-robin) so that the load of a shared machine falls on both alike; medians.

    .venv/bin/python benchmarks/bench_train_precision.py                 # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_train_precision.py --epochs 4 --speed-size 0   # a short check

Prints the machine line (CPU model, bf16 flags), jax and the devices, and Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags, cpu_model

PRECISIONS = ("fp32", "bf16")


def quality(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Train once per precision; ``{precision: summary}``."""
    from shitu.config import load_config
    from shitu.data.demo import demo_dataset_path, demo_start_weights_path
    from shitu.train.trainer import train

    results = {}
    for precision in PRECISIONS:
        config = load_config(
            "PP-ShiTuV2_rec",
            {
                "Train.input_size": args.size,
                "Train.model_scale": 0.5,
                "Train.batch_size": 20,
                "Train.epochs_iters": args.epochs,
                "Train.learning_rate": 0.02,
                "Train.warmup_steps": 1,
                "Train.eval_interval": args.epochs,  # evaluate after the last epoch only (the timing stays clean)
                "Train.precision": precision,
                "Global.device": "cpu",
                "Global.seed": 0,
            },
        )
        started = time.perf_counter()
        result = train(
            config,
            dataset_dir=demo_dataset_path(),
            output=work / precision,
            pretrained=demo_start_weights_path(),
        )
        wall = time.perf_counter() - started
        speeds = [row["images_per_s"] for row in result.history[1:] if row["images_per_s"]]
        last = result.history[-1]
        results[precision] = {
            "compile_s": result.compile_seconds,
            "images_per_s": statistics.median(speeds) if speeds else None,
            "wall_s": wall,
            "steps": result.iterations,
            "first_loss": result.history[0]["loss"],
            "last_loss": last["loss"],
            "recall1": last["recall1"],
            "recall5": last["recall5"],
            "mAP": last["mAP"],
        }
        print(f"# {precision}: {json.dumps(results[precision])}", file=sys.stderr, flush=True)
    return results


def step_speed(args: argparse.Namespace) -> dict[str, dict]:
    """The full-width training step alone, both precisions interleaved; ``{precision: timings}``."""
    from functools import partial

    import jax
    import numpy as np
    from flax import nnx

    from shitu.models import pplcnetv2_recipe
    from shitu.models.pplcnetv2 import build_pp_shituv2_rec
    from shitu.train.optim import make_optimizer, parameter_groups
    from shitu.train.step import TrainStep

    batch, size = args.speed_batch, args.speed_size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = np.repeat(np.arange(batch // 4), 4).astype(np.int32)
    sides = {}
    for precision in PRECISIONS:
        model = build_pp_shituv2_rec(100, rngs=nnx.Rngs(0))
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
        owner = TrainStep(
            model,
            loss_fn=partial(pplcnetv2_recipe.loss, train=True),
            tx=tx,
            schedule=schedule,
            devices=jax.devices()[:1],
            seed=0,
            precision=precision,
        )
        state = owner.initial_state(model)
        compile_s = owner.compile(state, images.shape).seconds
        batch_arrays = owner.shard_batch(images, labels)
        state, metrics = owner(state, *batch_arrays, 0)  # warm-up
        jax.block_until_ready(metrics)
        sides[precision] = {"owner": owner, "state": state, "batch": batch_arrays, "compile_s": compile_s}
        sides[precision].update(s=[], cpu_s=[])
    for round_index in range(args.speed_rounds):
        for precision in PRECISIONS:
            side = sides[precision]
            started, cpu_started = time.perf_counter(), time.process_time()
            side["state"], metrics = side["owner"](side["state"], *side["batch"], round_index + 1)
            jax.block_until_ready(metrics)
            side["s"].append(time.perf_counter() - started)
            side["cpu_s"].append(time.process_time() - cpu_started)
    return {
        p: {
            "compile_s": side["compile_s"],
            "s_per_step": statistics.median(side["s"]),
            "cpu_s_per_step": statistics.median(side["cpu_s"]),
            "runs": side["s"],
        }
        for p, side in sides.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the quality part (6 steps each; 0: skip it)")
    parser.add_argument("--size", type=int, default=64, help="input size of the quality part")
    parser.add_argument("--speed-size", type=int, default=128, help="input size of the step timing (0: skip it)")
    parser.add_argument("--speed-batch", type=int, default=32)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object instead")
    args = parser.parse_args()

    import jax

    from shitu.runtime import configure_jax

    configure_jax()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"})
    machine = f"{cpu_model()}; flags {' '.join(flags)}; Python {platform.python_version()}, jax {jax.__version__}"
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    with tempfile.TemporaryDirectory(prefix="bench_train_precision-") as tmp:
        results = {"machine": machine, "devices": devices, "quality": quality(args, Path(tmp)) if args.epochs else {}}
    if args.speed_size:
        results["speed"] = step_speed(args)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"machine: {machine}\ndevices: {devices}\n")
    if results["quality"]:
        print_quality(args, results["quality"])
    if "speed" in results:
        print_speed(args, results["speed"])
    return 0


def print_quality(args: argparse.Namespace, quality_rows: dict[str, dict]) -> None:
    print(f"Fine-tuning on the demo set ({args.epochs} epochs of 6 steps, batch 20, {args.size} px, half width):\n")
    print("| precision | compile s | images/s | wall s | loss first → last epoch | Recall@1 | Recall@5 | mAP |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for precision, row in quality_rows.items():
        print(
            f"| {precision} | {row['compile_s']:.1f} | {row['images_per_s']:.1f} | {row['wall_s']:.0f} | "
            f"{row['first_loss']:.3f} → {row['last_loss']:.3f} | {row['recall1']:.3f} | {row['recall5']:.3f} | "
            f"{row['mAP']:.3f} |"
        )
    print()


def print_speed(args: argparse.Namespace, speed_rows: dict[str, dict]) -> None:
    size, batch = args.speed_size, args.speed_batch
    print(f"Training step alone, full width, {size} px, batch {batch}, {args.speed_rounds} interleaved rounds:\n")
    print("| precision | compile s | s/step wall (median) | CPU s/step (median) | images/s | speed-up wall, CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    base, base_cpu = speed_rows["fp32"]["s_per_step"], speed_rows["fp32"]["cpu_s_per_step"]
    for precision, row in speed_rows.items():
        s, cpu = row["s_per_step"], row["cpu_s_per_step"]
        print(
            f"| {precision} | {row['compile_s']:.1f} | {s:.2f} | {cpu:.2f} | {batch / s:.1f} | "
            f"{base / s:.2f}×, {base_cpu / cpu:.2f}× |"
        )


if __name__ == "__main__":
    sys.exit(main())
