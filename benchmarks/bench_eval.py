#!/usr/bin/env python3
"""Speed and memory of ``shitu.evaluation.metrics.retrieval_metrics`` (exact mode) on synthetic features, side by
side with the bare similarity matmul it cannot avoid.

Every case runs in its own child process (fresh memory accounting): the child makes the features, times the bare
float32 ``Q @ G.T`` in the very blocks the engine uses (``similarity_block_rows``), then resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``), times the metric computation alone, and reports both times, their
ratio, and the peak RSS reached during the metrics next to the RSS held before (the features themselves). With
``--repeats n`` the two are timed alternately n times and the fastest of each is kept (the machine may be shared).

Cases (512-d float32 unit vectors, 4 gallery images per class, queries of random classes, 5% of the query
classes absent from the gallery):

- ``shitu`` at N queries x N gallery (default 100,000; ``--size 0`` skips it), "planted" features: each image is
  its class centre plus noise (same-class cosine about 0.18, near the best of 100k random neighbours), like a
  trained model;
- ``shitu`` and the naive full-matrix numpy at 20,000 x 20,000 (one q·gᵀ matrix, one stable argsort of every
  row), side by side, with the ratio; both must give the same numbers (``--no-naive`` skips the naive one);
- ``shitu`` at 20,000 x 20,000 on "no-signal" features (pure noise, an untrained model): the costly case for
  exact mAP, where most of every row outranks some positive.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_eval.py                # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_eval.py --size 0 --naive-size 20000 --no-naive   # quick, 20k only

The markdown table goes to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_flags, cpu_model

DIM = 512
PER_CLASS = 4
ABSENT_FRACTION = 0.05
NOISE = 0.094  # per-dimension noise: same-class cosine ~ 1 / (1 + 512·σ²) ≈ 0.18
TOPK = (1, 5, 10)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_line() -> str:
    import numpy as np

    flags = cpu_flags()
    model = cpu_model("unknown CPU")
    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    blas = "?"
    try:
        config = np.show_config(mode="dicts")
        info = config["Build Dependencies"]["blas"]
        blas = f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception:  # numpy < 1.25 or an unusual build: only the name is lost
        pass
    avx = ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in ("avx2", "avx512f"))
    return (
        f"{model}, {usable} usable cores ({logical} logical), {avx}, Python {platform.python_version()}, "
        f"numpy {np.__version__} ({blas}), {platform.system()} {platform.release()}"
    )


# ------------------------------------------------------------------------------------------------ child side


def make_features(n_query: int, n_gallery: int, *, signal: bool, seed: int = 0):
    """Unit float32 features and int64 labels, made in chunks so no float64 copy of the data ever exists."""
    import numpy as np

    rng = np.random.default_rng(seed)
    classes = max(1, n_gallery // PER_CLASS)
    absent = max(1, round(classes * ABSENT_FRACTION / (1 - ABSENT_FRACTION)))
    centres = rng.standard_normal((classes + absent, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery_labels = np.arange(n_gallery, dtype=np.int64) % classes
    query_labels = rng.integers(0, classes + absent, n_query)

    def build(labels: np.ndarray) -> np.ndarray:
        out = np.empty((len(labels), DIM), np.float32)
        for start in range(0, len(labels), 8192):
            part = rng.standard_normal((min(8192, len(labels) - start), DIM), dtype=np.float32)
            if signal:
                part *= np.float32(NOISE)
                part += centres[labels[start : start + len(part)]]
            part /= np.linalg.norm(part, axis=1, keepdims=True)
            out[start : start + len(part)] = part
        return out

    return build(query_labels), query_labels, build(gallery_labels), gallery_labels


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def naive_metrics(q, ql, g, gl, topk):
    """The obvious implementation: the whole similarity matrix and a full stable sort of every row."""
    import numpy as np

    sims = q @ g.T
    np.negative(sims, out=sims)
    order = np.argsort(sims, axis=1, kind="stable")
    del sims
    hits = gl.astype(np.int32)[order] == ql.astype(np.int32)[:, None]
    del order
    rows, positions = np.nonzero(hits)  # row-major: each row's hits in rank order
    del hits
    positions = positions + 1
    counts = np.bincount(rows, minlength=len(q))
    first_of_row = np.cumsum(counts) - counts
    found = np.arange(len(rows)) - first_of_row[rows] + 1
    relevant = counts > 0
    ap = np.zeros(len(q))
    np.add.at(ap, rows, found / positions)
    ap[relevant] /= counts[relevant]
    first = np.zeros(len(q), np.int64)
    first[relevant] = positions[first_of_row[relevant]]
    n = int(relevant.sum())
    result = {f"recall{k}": float(((first > 0) & (first <= k)).sum() / n) for k in topk}
    result["mAP"] = float(ap[relevant].mean())
    return result


def bare_matmul(q, g) -> None:
    """The float32 ``q @ g.T`` in the engine's own similarity blocks, and nothing else."""
    import numpy as np

    from shitu.evaluation.metrics import similarity_block_rows

    rows = similarity_block_rows(len(g))
    block = np.empty((min(rows, len(q)), len(g)), np.float32)
    for start in range(0, len(q), rows):
        part = q[start : start + rows]
        np.matmul(part, g.T, out=block[: len(part)])


def timed(function) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``function()``."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    function()
    return time.perf_counter() - started, time.process_time() - cpu_started


def child(case: str, n: int, repeats: int) -> None:
    import numpy as np

    from shitu.evaluation.metrics import retrieval_metrics, similarity_block_rows

    signal = case != "shitu-nosignal"
    started = time.perf_counter()
    q, ql, g, gl = make_features(n, n, signal=signal)
    made = time.perf_counter() - started
    before = _rss_kib("VmRSS")
    outcome: dict = {}

    def evaluate() -> None:
        if case == "naive":
            outcome["metrics"] = naive_metrics(q, ql, g, gl, TOPK)
            outcome["without"] = int((~np.isin(ql, gl)).sum())
        else:
            result = retrieval_metrics(q, ql, g, gl, topk=TOPK)
            outcome["metrics"] = result.headline()
            outcome["without"] = result.num_queries_without_positive

    matmul_runs: list[tuple[float, float]] = []
    metric_runs: list[tuple[float, float]] = []
    exact_peak = False
    for _ in range(1 if case == "naive" else repeats):
        if case != "naive":
            matmul_runs.append(timed(lambda: bare_matmul(q, g)))
        exact_peak = _reset_peak()
        metric_runs.append(timed(evaluate))
    peak = _rss_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, cpu = min(metric_runs)
    matmul_seconds, matmul_cpu = min(matmul_runs) if matmul_runs else (None, None)
    print(
        json.dumps(
            {
                "case": case,
                "n": n,
                "block_rows": similarity_block_rows(n),
                "seconds": seconds,
                "cpu_seconds": cpu,
                "matmul_seconds": matmul_seconds,
                "matmul_cpu_seconds": matmul_cpu,
                "all_seconds": [run[0] for run in metric_runs],
                "all_matmul_seconds": [run[0] for run in matmul_runs],
                "make_seconds": made,
                "rss_before_mib": (before or 0) / 1024,
                "peak_rss_mib": (peak or 0) / 1024,
                "peak_is_during_metrics": exact_peak,
                "metrics": outcome["metrics"],
                "queries_without_positive": outcome["without"],
            }
        )
    )


# ------------------------------------------------------------------------------------------------ parent side


def run_case(case: str, n: int, repeats: int) -> dict:
    log(f"running {case} at {n:,} x {n:,} ...")
    done = subprocess.run(
        [sys.executable, __file__, "--child", case, "--size", str(n), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{case} at {n} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    matmul = f", bare matmul {result['matmul_seconds']:.1f} s" if result["matmul_seconds"] is not None else ""
    log(f"  {result['seconds']:.1f} s{matmul}, peak RSS {result['peak_rss_mib']:.0f} MiB ({result['metrics']})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=100_000, help="queries = gallery images of the large case")
    parser.add_argument("--naive-size", type=int, default=20_000, help="size of the side-by-side cases")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive full-matrix reference")
    parser.add_argument("--repeats", type=int, default=2, help="alternate matmul/metrics runs per side-by-side case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, max(1, args.repeats))
        return

    log(machine_line())
    load_before = os.getloadavg()
    rows = []
    if args.size:
        rows.append(("shitu exact", run_case("shitu", args.size, 1), "planted"))
    small = run_case("shitu", args.naive_size, args.repeats)
    rows.append(("shitu exact", small, "planted"))
    naive = None if args.no_naive else run_case("naive", args.naive_size, 1)
    if naive is not None:
        rows.append(("naive full matrix + full sort", naive, "planted"))
    rows.append(("shitu exact", run_case("shitu-nosignal", args.naive_size, args.repeats), "no signal"))
    load_after = os.getloadavg()

    print(f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"- Machine: {machine_line()}")
    print(f"- Load average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in load_after)}")  # fmt: skip
    print()
    print(
        "| case | queries x gallery | features | rows per block | bare matmul s | metric s | metric / matmul | "
        "matmul CPU s | metric CPU s | RSS before (features) MiB | peak RSS MiB | recall@1 | recall@5 | mAP |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r, kind in rows:
        m = {key: f"{value:.5f}" for key, value in r["metrics"].items()}
        has_matmul = r["matmul_seconds"] is not None
        matmul = f"{r['matmul_seconds']:.1f}" if has_matmul else ""
        ratio = f"{r['seconds'] / r['matmul_seconds']:.2f}x" if has_matmul else ""
        matmul_cpu = f"{r['matmul_cpu_seconds']:.1f}" if has_matmul else ""
        print(
            f"| {name} | {r['n']:,} x {r['n']:,} | {kind} | {r['block_rows'] if has_matmul else 'all'} | {matmul} | "
            f"{r['seconds']:.1f} | {ratio} | {matmul_cpu} | {r['cpu_seconds']:.1f} | {r['rss_before_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {m['recall1']} | {m['recall5']} | {m['mAP']} |"
        )
    print()
    if naive is not None:
        same = all(abs(small["metrics"][k] - naive["metrics"][k]) <= 1e-9 for k in naive["metrics"])
        print(
            f"At {args.naive_size:,} x {args.naive_size:,}: shitu {small['seconds']:.1f} s vs naive "
            f"{naive['seconds']:.1f} s = {naive['seconds'] / small['seconds']:.1f}x faster; peak RSS "
            f"{small['peak_rss_mib']:.0f} vs {naive['peak_rss_mib']:.0f} MiB; same metrics: {'yes' if same else 'NO'}."
        )


if __name__ == "__main__":
    main()
