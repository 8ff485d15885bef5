"""Paddle side of ``bench_train.py``; run with the Paddle environment (``.venv-paddle/bin/python``).

PaddlePaddle dygraph training of PaddleClas' own ``RecModel`` for PP-ShiTuV2_rec (built from the ``Arch`` of
reference/ppshitu_spec.md §2 by ``tests/parity/paddle_reference.py``; PaddleClas' random init), in train mode:
forward → CELoss(ε 0.1) + TripletAngularMarginLoss → backward → Momentum(0.9) with L2 1e-5 → clear_grad.
The paddleclas wheel ships ``ppcls.arch`` but not ``ppcls.loss``, so the two losses are written here from
spec §3 (same arithmetic as PaddleClas' ``celoss.py`` / ``tripletangularmarginloss.py``).

Batches are synthetic (random normal images, PK labels: batch/4 identities × 4), so only the training step is
timed — as on the JAX side. Prints one JSON object on its last stdout line; with ``--serve``, runs steps on
request (``run N`` lines on stdin) so that ``bench_train.py`` can interleave both frameworks' steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or "2"

import numpy as np

THREADS = 2


def ce_loss(logits, labels, num_classes: int, epsilon: float = 0.1):
    import paddle
    import paddle.nn.functional as F

    one_hot = F.one_hot(labels, num_classes)
    target = one_hot * (1.0 - epsilon) + epsilon / num_classes
    return paddle.mean(paddle.sum(-F.log_softmax(logits, axis=-1) * target, axis=-1))


def triplet_angular_margin_loss(features, labels, margin=0.5, ap_value=0.8, an_value=0.4, weight=0.1):
    import paddle
    import paddle.nn.functional as F

    batch = features.shape[0]
    f = features / paddle.linalg.norm(features, p=2, axis=1, keepdim=True)
    sim = paddle.matmul(f, f, transpose_y=True)
    is_pos = paddle.expand(labels, (batch, batch)).equal(paddle.expand(labels, (batch, batch)).t())
    is_neg = paddle.logical_not(is_pos)
    dist_ap = paddle.min(paddle.reshape(paddle.masked_select(sim, is_pos), (batch, -1)), axis=1, keepdim=True)
    dist_an = paddle.max(paddle.reshape(paddle.masked_select(sim, is_neg), (batch, -1)), axis=1, keepdim=True)
    rank = paddle.mean(F.relu(dist_an - dist_ap + margin))
    abs_ap = F.relu(ap_value - dist_ap)
    abs_an = paddle.where(dist_an - an_value > 0, dist_an - an_value, paddle.ones_like(dist_an))
    return weight * (paddle.mean(abs_an) + paddle.mean(abs_ap)) + rank


def build_step(batch: int, size: int, num_classes: int):
    """PaddleClas' RecModel in train mode and one training step on a synthetic PK batch (alternating between
    two batches); returns ``step(i) -> loss``."""
    import paddle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))
    import paddle_reference
    from paddle_reference import arch_config

    paddle.set_device("cpu")
    paddle_reference.NUM_CLASSES = num_classes
    from paddleclas.ppcls.arch import build_model

    model = build_model({"Arch": arch_config("PP-ShiTuV2_rec", tiny=False)})
    model.train()
    optimizer = paddle.optimizer.Momentum(
        learning_rate=0.01,
        momentum=0.9,
        parameters=model.parameters(),
        weight_decay=paddle.regularizer.L2Decay(1e-5),
    )
    rng = np.random.default_rng(0)
    labels = paddle.to_tensor(np.repeat(np.arange(batch // 4), 4).astype(np.int64))
    images = [paddle.to_tensor(rng.standard_normal((batch, 3, size, size)).astype(np.float32)) for _ in range(2)]

    def step(i: int) -> float:
        out = model(images[i % 2], labels)
        loss = ce_loss(out["logits"], labels, num_classes) + triplet_angular_margin_loss(out["features"], labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    return step


def timed(step, first: int, count: int) -> dict:
    """Run ``count`` steps; wall and process CPU seconds of each."""
    walls, cpus, losses = [], [], []
    for i in range(first, first + count):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(i))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": walls, "cpu_s": cpus, "losses": losses}


def bench(batch: int, size: int, steps: int, warmup: int, num_classes: int) -> dict:
    import paddle

    step = build_step(batch, size, num_classes)
    t0 = time.perf_counter()
    step(0)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step(i)
    runs = timed(step, warmup, steps)
    median = statistics.median(runs["wall_s"])
    return {
        "paddle": paddle.__version__,
        "batch": batch,
        "size": size,
        "first_s": first,
        **runs,
        "median_s": median,
        "images_per_s": batch / median,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def serve(batch: int, size: int, num_classes: int) -> None:
    """Build, run one warm-up step, print ``{"ready": ...}``; then for each stdin line ``run N`` print the
    timings of N more steps as one JSON line; ``quit`` (or end of input) exits. Lets the caller interleave
    Paddle's steps with its own, so both sides are measured under the same machine load."""
    import paddle

    step = build_step(batch, size, num_classes)
    t0 = time.perf_counter()
    step(0)
    print(json.dumps({"ready": True, "paddle": paddle.__version__, "first_s": time.perf_counter() - t0}), flush=True)
    done = 1
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        count = int(words[1])
        print(json.dumps(timed(step, done, count)), flush=True)
        done += count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--serve", action="store_true", help="interleaved mode (see serve())")
    args = parser.parse_args()
    if args.serve:
        serve(args.batch, args.size, args.num_classes)
    else:
        print(json.dumps(bench(args.batch, args.size, args.steps, args.warmup, args.num_classes)))


if __name__ == "__main__":
    main()
