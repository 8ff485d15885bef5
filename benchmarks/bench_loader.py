"""Training input pipeline speed: :class:`shitu.train.data.TrainLoader` images/s by input size and worker count.

What is timed is what ``shitu train`` consumes: decode (Pillow) → the recipe's train augmentation → normalise →
a float32 NHWC batch, PK-sampled (``--recipe pplcnet``, the default) or shuffled (``--recipe clip``). For each
(size, workers) a fresh loader is built; the first batch is timed apart ("first batch s": worker start-up, which
imports grain and with it jax, plus one batch), then the steady rate over the next ``--batches`` batches.
Also printed: the single-process rate of each stage (decode only; augment + normalise only) at each size.

Data: ``benchmarks/.work/grocery3k`` if it exists (real photos, 348×348 px), else the bundled demo dataset.

Usage: ``.venv/bin/python benchmarks/bench_loader.py [--sizes 224 128] [--workers 0 1 2] [--batch 128]
[--batches 8] [--recipe pplcnet] [--json]``. Prints a machine line and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from _machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
GROCERY = ROOT / "benchmarks" / ".work" / "grocery3k"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def machine_line() -> str:
    import cv2
    import grain
    import PIL

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_model()}, {os.cpu_count()} cores (load average {load:.1f} at start), Python "
        f"{platform.python_version()}, grain {grain.__version__}, Pillow {PIL.__version__}, OpenCV {cv2.__version__}"
    )


def _transform(recipe: str, size: int):
    """The train transform of the "pplcnet" (PP-ShiTuV2_rec) or "clip" (CLIP ViT) recipe."""
    from shitu.models import pplcnetv2_recipe, vit_recipe

    return (pplcnetv2_recipe if recipe == "pplcnet" else vit_recipe).train_transform(size, MEAN, STD)


def stage_rates(samples, recipe: str, size: int, count: int) -> dict:
    """Single-process images/s of decoding alone and of augment + normalise alone (decoded images reused)."""
    import numpy as np

    from shitu.data.transforms import read_image

    paths = samples.paths[:count]
    read_image(paths[0])
    start = time.perf_counter()
    images = [read_image(p) for p in paths]
    decode = len(paths) / (time.perf_counter() - start)
    transform = _transform(recipe, size)
    transform(images[0], np.random.default_rng(0))
    start = time.perf_counter()
    for i, image in enumerate(images):
        transform(image, np.random.default_rng(i))
    augment = len(images) / (time.perf_counter() - start)
    return {"decode_images_per_s": decode, "augment_images_per_s": augment}


def loader_rate(samples, *, recipe: str, size: int, workers: int, batch: int, batches: int) -> dict:
    from shitu.train.data import TrainLoader

    sampler = "pk" if recipe == "pplcnet" else "shuffle"
    with TrainLoader(
        samples,
        transform=_transform(recipe, size),
        input_size=size,
        batch_size=batch,
        sampler=sampler,
        drop_last=sampler == "shuffle",
        num_workers=workers,
        seed=0,
    ) as loader:
        needed = batches + 1
        start = time.perf_counter()
        seen = 0
        first = steady_start = 0.0
        epoch = 0
        while seen < needed:
            for item in loader.epoch(epoch):
                assert item["images"].shape == (batch, size, size, 3)
                seen += 1
                if seen == 1:
                    first = time.perf_counter() - start
                    steady_start = time.perf_counter()
                if seen == needed:
                    break
            epoch += 1
        steady = time.perf_counter() - steady_start
    return {
        "size": size,
        "workers": workers,
        "first_batch_s": first,
        "images_per_s": batches * batch / steady,
        "batch_s": steady / batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--recipe", choices=["pplcnet", "clip"], default="pplcnet")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from shitu.data.demo import demo_dataset_path
    from shitu.train.data import read_train_samples

    dataset = args.dataset or (GROCERY if (GROCERY / "train.txt").is_file() else demo_dataset_path())
    samples = read_train_samples(dataset)
    machine = machine_line()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"machine: {machine}", file=sys.stderr)
    print(
        f"data: {dataset} ({len(samples)} train images, {samples.num_classes} classes), recipe {args.recipe}, "
        f"batch {args.batch}, {args.batches} timed batches after the first; {when}",
        file=sys.stderr,
    )
    stages = {size: stage_rates(samples, args.recipe, size, 64) for size in args.sizes}
    rows = []
    for size in args.sizes:
        for workers in args.workers:
            row = loader_rate(
                samples, recipe=args.recipe, size=size, workers=workers, batch=args.batch, batches=args.batches
            )
            rows.append(row)
            print(
                f"  size {size} workers {workers}: {row['images_per_s']:.0f} images/s "
                f"(first batch {row['first_batch_s']:.1f} s)",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps({"machine": machine, "date": when, "dataset": str(dataset), "stages": stages, "rows": rows}))
        return
    print("\n| input px | workers | images/s | s per batch | first batch s |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['size']} | {row['workers']} | {row['images_per_s']:.0f} | {row['batch_s']:.2f} | "
            f"{row['first_batch_s']:.1f} |"
        )
    print("\n| input px | decode only, images/s | augment + normalise only, images/s |")
    print("|---:|---:|---:|")
    for size, rates in stages.items():
        print(f"| {size} | {rates['decode_images_per_s']:.0f} | {rates['augment_images_per_s']:.0f} |")


if __name__ == "__main__":  # worker processes are spawned: they import this file without running it
    main()
