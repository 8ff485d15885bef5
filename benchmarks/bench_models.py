"""Model inference speed: JAX (shitu) against Paddle Inference and Paddle dygraph, side by side, at 224 px.

Run from the repository root::

    .venv/bin/python benchmarks/bench_models.py [--quick] [--skip-vit]

JAX side (this process): each exported Paddle inference folder is imported with
``shitu.weights.importer.import_weights`` into a temporary bundle and loaded back
with ``shitu.models.bundle.load_bundle``
(what ``shitu import-weights`` + ``shitu embed`` do). PP-ShiTuV2_rec is measured in three forms: as loaded
(deploy form, BatchNorms separate), ``fold_batchnorm(...)`` of it, and ``shitu.models.inference.Embedder``
on the loaded model (adds the L2 normalisation and bucket padding, the production path). Each form is an
eval-mode forward under ``jax.jit``; the first call (compile) is reported separately, then batch-1 latency
(median of the runs) and batch-32 throughput (median run time → images/s). Achieved GFLOP/s uses the FLOP
count from XLA's cost analysis, set against a measured fp32 matmul peak (2048³ sgemm, numpy and jax.jit).

Paddle side (subprocesses with ``.venv-paddle``, see ``benchmarks/_paddle_infer.py``): Paddle Inference on
the same exported files (MKLDNN on, 2 threads, OMP_NUM_THREADS=2), same batch sizes and repetitions, and
PaddleClas' dygraph ``RecModel`` in eval mode at batch 32 only. The runs go one after another, never in
parallel.
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

import numpy as np
from _machine import cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / ".work" / "parity"
PADDLE_PY = ROOT / ".venv-paddle" / "bin" / "python"
HELPER = Path(__file__).resolve().parent / "_paddle_infer.py"
SIZE = 224


# ------------------------------------------------------------------------------------------------ machine


def cpu_info() -> dict:
    model, flags = cpu_model(), cpu_flags()
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    return {
        "model": model,
        "usable_cores": len(os.sched_getaffinity(0)),
        "logical_cpus": os.cpu_count(),
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512": avx512,
    }


def paddle_version() -> str:
    out = subprocess.run(
        [str(PADDLE_PY), "-c", "import paddle; print(paddle.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "unavailable"


def matmul_peak(reps: int) -> dict:
    """fp32 2048³ matmul GFLOP/s (median of ``reps``) with numpy and with jax.jit."""
    import jax
    import jax.numpy as jnp

    n = 2048
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    np_runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        np_runs.append(time.perf_counter() - t0)
    f = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f(ja, jb).block_until_ready()
    jx_runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(ja, jb).block_until_ready()
        jx_runs.append(time.perf_counter() - t0)
    return {
        "numpy": flops / statistics.median(np_runs) / 1e9,
        "jax": flops / statistics.median(jx_runs) / 1e9,
    }


# ------------------------------------------------------------------------------------------------ JAX side


def import_and_load(model_name: str, folder: Path, tmp: Path):
    from shitu.models.bundle import load_bundle
    from shitu.weights.importer import import_weights

    target = tmp / model_name
    t0 = time.perf_counter()
    import_weights(model_name, folder, target)
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle = load_bundle(target)
    loaded = time.perf_counter() - t0
    print(f"  {model_name}: import {imported:.1f} s, load {loaded:.1f} s", flush=True)
    return bundle.model


def jitted_forward(model):
    """Eval-mode forward under jax.jit, split once (no per-call NNX overhead); returns (call, flops/image)."""
    import jax
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    def call(x: np.ndarray) -> np.ndarray:
        return np.asarray(forward(state, x))

    def flops_per_image(batch: int) -> float | None:
        try:
            x = jax.ShapeDtypeStruct((batch, SIZE, SIZE, 3), np.float32)
            cost = forward.lower(state, x).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            return float(cost["flops"]) / batch
        except Exception:  # cost analysis is best-effort
            return None

    return call, flops_per_image


def time_calls(call, x: np.ndarray, reps: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    call(x)
    first = time.perf_counter() - t0
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call(x)
        runs.append(time.perf_counter() - t0)
    return first, runs


def bench_jax(label: str, call, batches: list[int], reps: list[int]) -> dict:
    rng = np.random.default_rng(0)
    out = {"label": label, "results": {}}
    for batch, n in zip(batches, reps, strict=True):
        x = rng.standard_normal((batch, SIZE, SIZE, 3)).astype(np.float32)
        first, runs = time_calls(call, x, n)
        out["results"][batch] = {"first_s": first, "runs_s": runs, "median_s": statistics.median(runs)}
        print(
            f"  {label} batch {batch}: first call {first:.2f} s, median {statistics.median(runs) * 1e3:.1f} ms "
            f"({batch / statistics.median(runs):.1f} images/s, {n} runs)",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------------ Paddle side


def run_paddle(args: list[str], timeout: float) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS="2", GLOG_minloglevel="2", FLAGS_call_stack_level="0")
    try:
        proc = subprocess.run(
            [str(PADDLE_PY), str(HELPER), *args], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        print(f"  paddle {args[0]}: timed out after {timeout:.0f} s", flush=True)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  paddle {args[0]} failed (rc {proc.returncode}): {proc.stderr[-800:]}", flush=True)
        return None
    out = json.loads(lines[-1])
    out["results"] = {r["batch"]: r for r in out["results"]}
    for batch, r in out["results"].items():
        print(
            f"  paddle {args[0]} batch {batch}: first call {r['first_s']:.2f} s, median {r['median_s'] * 1e3:.1f} ms "
            f"({batch / r['median_s']:.1f} images/s, {len(r['runs_s'])} runs)",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------------ report


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (20 × batch 1, 5 × batch 32)")
    parser.add_argument("--skip-vit", action="store_true", help="leave out CLIP ViT base")
    args = parser.parse_args()

    reps1, reps32 = (20, 5) if args.quick else (50, 10)
    peak_reps = 5 if args.quick else 10

    import flax
    import jax

    import shitu
    from shitu.models.inference import Embedder
    from shitu.models.pplcnetv2 import fold_batchnorm
    from shitu.runtime import configure_jax

    configure_jax()
    cpu = cpu_info()
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    pversion = paddle_version()
    avx512 = "yes (" + " ".join(cpu["avx512"]) + ")" if cpu["avx512"] else "no"
    machine = (
        f"{cpu['model']}, {cpu['usable_cores']} usable cores ({cpu['logical_cpus']} logical), "
        f"AVX2 {'yes' if cpu['avx2'] else 'no'}, AVX-512 {avx512}, "
        f"Python {platform.python_version()}, jax/jaxlib {jax.__version__}, flax {flax.__version__}, "
        f"shitu {getattr(shitu, '__version__', '?')}, paddlepaddle {pversion}, Linux {platform.release()}"
    )
    print(f"Machine: {machine}")
    print(f"Date: {started:%Y-%m-%d %H:%M} UTC; load average before: {' '.join(f'{v:.2f}' for v in load_before)}")
    print(f"Repetitions: batch 1 × {reps1}, batch 32 × {reps32} (first call excluded)", flush=True)

    peak = matmul_peak(peak_reps)
    print(f"fp32 matmul peak (2048³): numpy {peak['numpy']:.0f} GFLOP/s, jax.jit {peak['jax']:.0f} GFLOP/s", flush=True)

    rec_dir = PARITY / "PP-ShiTuV2_rec" / "inference"
    vit_dir = PARITY / "PP-ShiTuV2_rec_CLIP_vit_base" / "inference"
    rows = []  # (model, runtime, b1 median s, b32 median s, first call s, gflop/image)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("JAX PP-ShiTuV2_rec", flush=True)
        model = import_and_load("PP-ShiTuV2_rec", rec_dir, tmp)
        forms = []
        call, flops = jitted_forward(model)
        forms.append(("JAX, as loaded (deploy)", call, flops))
        call, flops = jitted_forward(fold_batchnorm(model))
        forms.append(("JAX, fold_batchnorm", call, flops))
        embedder = Embedder(model)
        forms.append(("JAX, Embedder (as loaded + L2 norm)", embedder, None))
        gflop = None
        for label, call, flops in forms:
            res = bench_jax(label, call, [1, 32], [reps1, reps32])
            per_image = flops(32) if flops is not None else None
            gflop = gflop or (per_image / 1e9 if per_image else None)
            rows.append(
                (
                    "PP-ShiTuV2_rec",
                    label,
                    res["results"][1]["median_s"],
                    res["results"][32]["median_s"],
                    res["results"][1]["first_s"] + res["results"][32]["first_s"],
                    per_image / 1e9 if per_image else gflop,
                )
            )
        del forms, embedder

        vit_rows = []
        if not args.skip_vit:
            print("JAX PP-ShiTuV2_rec_CLIP_vit_base", flush=True)
            vit = import_and_load("PP-ShiTuV2_rec_CLIP_vit_base", vit_dir, tmp)
            call, flops = jitted_forward(vit)
            res = bench_jax("JAX, as loaded", call, [1, 32], [max(5, reps1 // 2), 2])
            per_image = flops(1)
            vit_rows.append(
                (
                    "PP-ShiTuV2_rec_CLIP_vit_base",
                    "JAX, as loaded",
                    res["results"][1]["median_s"],
                    res["results"][32]["median_s"],
                    res["results"][1]["first_s"] + res["results"][32]["first_s"],
                    per_image / 1e9 if per_image else None,
                )
            )
            del vit, call

    print("Paddle Inference PP-ShiTuV2_rec (MKLDNN, 2 threads)", flush=True)
    pinf = run_paddle(
        ["infer", "--model-dir", str(rec_dir), "--batches", "1", "32", "--reps", str(reps1), str(reps32)], 900
    )
    if pinf:
        rows.append(
            (
                "PP-ShiTuV2_rec",
                "Paddle Inference (MKLDNN, 2 threads)",
                pinf["results"][1]["median_s"],
                pinf["results"][32]["median_s"],
                pinf["results"][1]["first_s"] + pinf["results"][32]["first_s"],
                gflop,
            )
        )
    print("Paddle dygraph PP-ShiTuV2_rec (RecModel, eval, batch 32)", flush=True)
    pdy = run_paddle(
        ["dygraph", "--name", "PP-ShiTuV2_rec", "--batches", "32", "--reps", "2" if args.quick else "3"], 900
    )
    if pdy:
        rows.append(
            (
                "PP-ShiTuV2_rec",
                "Paddle dygraph (RecModel, eval)",
                None,
                pdy["results"][32]["median_s"],
                pdy["results"][32]["first_s"],
                gflop,
            )
        )
    if not args.skip_vit:
        print("Paddle Inference PP-ShiTuV2_rec_CLIP_vit_base batch 1", flush=True)
        pvit = run_paddle(["infer", "--model-dir", str(vit_dir), "--batches", "1", "--reps", "5"], 600)
        if pvit:
            vit_rows.append(
                (
                    "PP-ShiTuV2_rec_CLIP_vit_base",
                    "Paddle Inference (MKLDNN, 2 threads)",
                    pvit["results"][1]["median_s"],
                    None,
                    pvit["results"][1]["first_s"],
                    vit_rows[0][5] if vit_rows else None,
                )
            )
    load_after = os.getloadavg()

    ref = pinf["results"] if pinf else None
    pvit_ref = vit_rows[-1] if (not args.skip_vit and len(vit_rows) > 1) else None
    print()
    print(f"Machine: {machine}")
    print(
        f"Load average before: {' '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {' '.join(f'{v:.2f}' for v in load_after)}"
    )
    print(f"fp32 matmul peak (2048³ sgemm): numpy {peak['numpy']:.0f} GFLOP/s, jax.jit {peak['jax']:.0f} GFLOP/s")
    if gflop:
        print(f"PP-ShiTuV2_rec: {gflop:.2f} GFLOP/image (XLA cost analysis, deploy form)")
    print()
    print(
        "| model | runtime | batch-1 latency ms (median) | batch-32 images/s (median) | first calls s (b1 + b32) "
        "| batch-32 GFLOP/s | % of numpy peak | throughput vs Paddle Inference | latency vs Paddle Inference |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model_name, label, b1, b32, first, gf in rows + vit_rows:
        ips = 32 / b32 if b32 else None
        achieved = gf * ips if (gf and ips) else None
        if model_name == "PP-ShiTuV2_rec" and ref:
            tr = ips / (32 / ref[32]["median_s"]) if ips else None
            lr = b1 / ref[1]["median_s"] if b1 else None
        elif model_name != "PP-ShiTuV2_rec" and pvit_ref:
            tr = None
            lr = b1 / pvit_ref[2] if b1 else None
        else:
            tr = lr = None
        print(
            f"| {model_name} | {label} | {fmt(b1 * 1e3 if b1 else None, '.1f')} | {fmt(ips, '.1f')} "
            f"| {fmt(first, '.2f')} "
            f"| {fmt(achieved, '.0f')} | {fmt(achieved / peak['numpy'] * 100 if achieved else None, '.0f')} "
            f"| {fmt(tr, '.2f') + ('×' if tr else '')} | {fmt(lr, '.2f') + ('×' if lr else '')} |"
        )
    print()
    print(
        "Ratios: throughput = JAX images/s ÷ Paddle Inference images/s (higher is better); latency = JAX ms ÷ "
        "Paddle Inference ms (lower is better). Target: throughput ≥ 1.20× and latency ≤ 1.00× for PP-ShiTuV2_rec."
    )
    if ref:
        best_tp = max(32 / r[3] for r in rows if r[1].startswith("JAX") and r[3]) / (32 / ref[32]["median_s"])
        best_lat = min(r[2] for r in rows if r[1].startswith("JAX") and r[2]) / ref[1]["median_s"]
        met = best_tp >= 1.2 and best_lat <= 1.0
        print(
            f"Best JAX form: throughput {best_tp:.2f}×, latency {best_lat:.2f}× → target {'met' if met else 'NOT met'}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
