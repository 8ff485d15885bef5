"""Inference of PP-ShiTuV2_rec at 224 px on every runtime side by side: shitu's JAX model (fp32, bf16), shitu's
exported ONNX graph in ONNX Runtime (fp32, int8) and in OpenVINO (f32, bf16, int8) and, when ``.venv-paddle``
exists (paddlepaddle + paddle2onnx, see reference/stack_notes.md), Paddle Inference and paddle2onnx's graph of the
same weights in ONNX Runtime and OpenVINO (f32, bf16).

    .venv/bin/python benchmarks/bench_infer.py            # about 5-10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_infer.py --quick    # fewer repetitions
    .venv/bin/python benchmarks/bench_infer.py --paddle-venv ../export/.venv-paddle --parity ../export/.work/parity
    .venv/bin/python benchmarks/bench_infer.py --only "JAX,Paddle Inference" --repeat 3 --skip-interleaved

int8 rows: ``--precision int8``, the exported graph quantized after training (static QDQ, see
shitu/export/quantize.py) and calibrated on the bundled demo set's 40 gallery photos (real images, preprocessed
as shitu does); the quantized graph is made before the timed processes start, as the fp32 export is.

Weights: PaddleClas' random reference model (``.work/parity/PP-ShiTuV2_rec``, made by
``tests/parity/paddle_reference.py`` with the Paddle environment) imported into a shitu bundle, so every runtime
computes the same features (the table's last column is each one's largest difference to shitu JAX fp32);
without it, a random shitu bundle and no Paddle rows. Each runtime runs in a process of its own (its peak memory
is that process's maximum resident size), on preprocessed random images, with as many threads as the process
may use. img/s and batch-1 latency are the fastest of the timed calls (the 2 cores may be shared with other
work, which only ever makes a call slower). "first call" is setting the runtime up plus the first batch-1 call,
with the ONNX graph already exported (the export time is printed separately). The ratio columns divide by
paddle2onnx's graph in OpenVINO bf16 (the deployment peer). "max diff" / "min cosine": unit features on 4 real
query photos (not calibration images) against shitu JAX fp32. A second table runs the OpenVINO int8 and bf16
paths and the peer in one process, calls interleaved round by round (``--rounds``), so that other work on the
cores slows them alike: the fairer ratio on a shared machine. ``--only`` picks runtimes by parts of their names,
``--repeat N`` measures them N times taking turns and keeps each one's fastest calls (for runtimes that cannot
share a process, such as Paddle Inference and shitu's JAX path). Prints the CPU model and flags, and the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line, peak_rss_mb, random_bundle

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "bench_infer"
PARITY_DEFAULT = ROOT / ".work" / "parity"
PADDLE_VENV_DEFAULT = ROOT / ".venv-paddle"
PEER = "paddle2onnx → OpenVINO bf16"
SIZE = 224
BATCHES = (1, 8, 32)
CHECK_BATCH = 4

RUNTIMES = {
    "shitu JAX fp32": ("shitu", "jax", "fp32"),
    "shitu JAX bf16": ("shitu", "jax", "bf16"),
    "shitu ONNX → ONNX Runtime": ("shitu", "onnxruntime", "fp32"),
    "shitu ONNX → OpenVINO f32": ("shitu", "openvino", "fp32"),
    "shitu ONNX → OpenVINO bf16": ("shitu", "openvino", "bf16"),
    "shitu ONNX → ONNX Runtime int8": ("shitu", "onnxruntime", "int8"),
    "shitu ONNX → OpenVINO int8": ("shitu", "openvino", "int8"),
    "paddle2onnx → ONNX Runtime": ("paddle2onnx", "onnxruntime", "fp32"),
    "paddle2onnx → OpenVINO f32": ("paddle2onnx", "openvino", "fp32"),
    "paddle2onnx → OpenVINO bf16": ("paddle2onnx", "openvino", "bf16"),
}


def _images(batch: int, layout: str, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.0, 1.0, (batch, SIZE, SIZE, 3)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NCHW" else x


def _check_images(layout: str) -> np.ndarray:
    """The feature-check batch: real photos preprocessed by shitu (written by the parent), in ``layout``."""
    x = np.load(WORK / "check.npy")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NCHW" else x


# ------------------------------------------------------------------------------------------ one runtime (child)


def child(args: argparse.Namespace) -> None:
    """Measure one runtime; print one JSON line."""
    source, backend, precision = RUNTIMES[args.child]
    reps = {1: args.reps1, 8: args.reps8, 32: args.reps32}
    started = time.perf_counter()
    if source == "shitu":
        from shitu.embed.resolve import resolve_model
        from shitu.runtime import configure_jax

        configure_jax()
        calibration = calibration_images() if precision == "int8" else None
        recognizer = resolve_model(Path(args.bundle), backend=backend, precision=precision, calibration=calibration)
        forward, layout = recognizer.embed_arrays, "NHWC"
    else:
        from shitu.export.backends import OnnxRuntimeForward, OpenVinoForward

        model_file = Path(args.onnx)
        if backend == "onnxruntime":
            session = OnnxRuntimeForward(model_file)
        else:
            session = OpenVinoForward(model_file, precision=precision)
        forward, layout = session, "NCHW"
    forward(_images(1, layout))
    first = time.perf_counter() - started
    results = {}
    for batch in BATCHES:
        x = _images(batch, layout, seed=batch)
        forward(x)  # warm-up (a new shape compiles in JAX)
        runs = []
        for _ in range(reps[batch]):
            t0 = time.perf_counter()
            forward(x)
            runs.append(time.perf_counter() - t0)
        results[batch] = min(runs)
    features = np.asarray(forward(_check_images(layout)), np.float32)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # Paddle's are not normalised
    np.save(args.features, features)
    print(json.dumps({"first_s": first, "best_s": results, "peak_rss_mb": peak_rss_mb()}))


def head_to_head(args: argparse.Namespace) -> None:
    """The OpenVINO paths in one process, their calls interleaved round by round (so that other work on shared
    cores slows them alike); the fastest call per path and batch, as one JSON line."""
    from shitu.export.backends import OpenVinoForward

    paths = json.loads(args.head_to_head)
    forwards = {
        name: (OpenVinoForward(Path(file), precision=precision), layout) for name, file, precision, layout in paths
    }
    best = {name: dict.fromkeys(BATCHES, float("inf")) for name in forwards}
    calls = {1: 5, 8: 2, 32: 1}
    for round_index in range(args.rounds):
        for batch in BATCHES:
            for name, (forward, layout) in forwards.items():
                x = _images(batch, layout, seed=batch)
                if round_index == 0:
                    forward(x)
                for _ in range(calls[batch]):
                    t0 = time.perf_counter()
                    forward(x)
                    best[name][batch] = min(best[name][batch], time.perf_counter() - t0)
    print(json.dumps(best))


def run_child(name: str, args: argparse.Namespace, bundle: Path, onnx_file: Path | None) -> dict | None:
    features = WORK / f"features-{abs(hash(name))}.npy"
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--bundle",
        str(bundle),
        "--features",
        str(features),
        "--reps1",
        str(args.reps1),
        "--reps8",
        str(args.reps8),
        "--reps32",
        str(args.reps32),
    ]
    if onnx_file is not None:
        command += ["--onnx", str(onnx_file)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"  {name}: failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["features"] = np.load(features)
    return result


# --------------------------------------------------------------------------------------------------- Paddle


def paddle_inference(args: argparse.Namespace) -> dict | None:
    """Paddle Inference (MKLDNN) on the reference export, through benchmarks/_paddle_infer.py."""
    helper = Path(__file__).resolve().parent / "_paddle_infer.py"
    reps = [str(args.reps1), str(args.reps8), str(args.reps32)]
    command = [str(args.paddle_venv / "bin" / "python"), str(helper), "infer"]
    command += ["--model-dir", str(args.parity_model / "inference")]
    command += ["--batches", *map(str, BATCHES), "--reps", *reps, "--size", str(SIZE)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"  Paddle Inference failed: {proc.stderr.strip()[-400:]}", flush=True)
        return None
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    fastest = {r["batch"]: min(r["runs_s"]) for r in doc["results"]}
    first = doc["create_s"] + doc["results"][0]["first_s"]
    return {"first_s": first, "best_s": fastest, "peak_rss_mb": doc.get("peak_rss_mb"), "paddle": doc["paddle"]}


def paddle2onnx_graph(args: argparse.Namespace) -> Path | None:
    target = WORK / "paddle2onnx" / "model.onnx"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [str(args.paddle_venv / "bin" / "paddle2onnx"), "-m", str(args.parity_model / "inference")]
    command += ["-mf", "inference.json"]
    command += ["-pf", "inference.pdiparams", "-s", str(target)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not target.is_file():
        print(f"  paddle2onnx failed: {proc.stderr.strip()[-400:]}", flush=True)
        return None
    return target


# ------------------------------------------------------------------------------------------------------ main


def calibration_images():
    """The images the int8 rows are calibrated on: the bundled demo set's gallery (40 real photos)."""
    from shitu.data.demo import demo_dataset_path
    from shitu.export.quantize import calibration_set

    return calibration_set(demo_dataset_path() / "gallery.txt")


def shitu_bundle(parity_model: Path) -> tuple[Path, str]:
    """The bundle every shitu runtime loads: PaddleClas' reference weights imported, else random weights."""
    bundle = WORK / "bundle"
    if (parity_model / "inference" / "inference.json").is_file():
        if not bundle.is_dir():
            from shitu.weights.importer import import_weights

            import_weights("PP-ShiTuV2_rec", parity_model / "inference", bundle, overwrite=True)
        return bundle, "PaddleClas reference export (random weights), imported"
    return random_bundle(bundle), "random shitu weights (no Paddle reference export)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--bundle")
    parser.add_argument("--onnx")
    parser.add_argument("--features")
    parser.add_argument("--reps1", type=int, default=20)
    parser.add_argument("--reps8", type=int, default=5)
    parser.add_argument("--reps32", type=int, default=3)
    parser.add_argument("--head-to-head", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the interleaved OpenVINO comparison")
    parser.add_argument("--only", help="comma-separated parts of runtime names to measure (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="measure the runtimes this many times, taking turns")
    parser.add_argument("--skip-interleaved", action="store_true", help="leave out the interleaved OpenVINO table")
    parser.add_argument("--paddle-venv", type=Path, default=PADDLE_VENV_DEFAULT, help="paddlepaddle + paddle2onnx")
    parser.add_argument("--parity", type=Path, default=PARITY_DEFAULT, help="tests/parity/paddle_reference.py --out")
    args = parser.parse_args()
    args.parity_model = args.parity.resolve() / "PP-ShiTuV2_rec"
    args.paddle_venv = args.paddle_venv.absolute()
    if args.child:
        child(args)
        return
    if args.head_to_head:
        head_to_head(args)
        return
    if args.quick:
        args.reps1, args.reps8, args.reps32 = 5, 2, 1
    os.environ.setdefault("SHITU_CACHE_DIR", str(WORK / "cache"))
    WORK.mkdir(parents=True, exist_ok=True)
    print(machine_line(), flush=True)
    bundle, weights = shitu_bundle(args.parity_model)
    print(f"weights: {weights}", flush=True)

    from shitu.embed.resolve import resolve_model
    from shitu.export.backends import exported_onnx, jax_bf16_available

    t0 = time.perf_counter()
    recognizer = resolve_model(bundle)
    shitu_fp32 = exported_onnx(recognizer)  # into the cache, so the children measure loading, not exporting
    print(f"shitu ONNX export (jax2onnx + check): {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    calibration = calibration_images()
    shitu_int8 = exported_onnx(recognizer, calibration)
    from shitu.data.demo import demo_dataset_path
    from shitu.data.inputs import resolve_inputs

    queries = resolve_inputs(demo_dataset_path() / "query.txt", skipped=[])[:CHECK_BATCH]  # not calibration images
    np.save(WORK / "check.npy", np.stack([recognizer.preprocess(p) for p in queries]).astype(np.float32))
    print(f"shitu int8 quantization ({calibration.describe()}): {time.perf_counter() - t0:.1f} s", flush=True)
    have_paddle = (args.paddle_venv / "bin" / "python").is_file() and (args.parity_model / "inference").is_dir()
    p2o = paddle2onnx_graph(args) if have_paddle and (args.paddle_venv / "bin" / "paddle2onnx").is_file() else None

    def wanted(name: str) -> bool:
        return not args.only or any(part.strip() and part.strip() in name for part in args.only.split(","))

    def measure_once(name: str, source: str) -> dict | None:
        if source == "paddle":
            return paddle_inference(args)
        return run_child(name, args, bundle, p2o if source == "paddle2onnx" else None)

    plan: list[tuple[str, str]] = []
    for name, (source, backend, precision) in RUNTIMES.items():
        if (source == "paddle2onnx" and p2o is None) or not wanted(name):
            continue
        if backend == "jax" and precision == "bf16" and not jax_bf16_available()[0]:
            print(f"  {name}: skipped ({jax_bf16_available()[1]})", flush=True)
            continue
        plan.append((name, source))
    if have_paddle and wanted("Paddle Inference"):
        plan.append(("Paddle Inference", "paddle"))
    rows: dict[str, dict] = {}
    for repeat in range(args.repeat):
        # With --repeat, the runtimes take turns (the order reversed every other round), and each keeps its
        # fastest call per batch size: the fairer comparison when other work comes and goes on shared cores.
        for name, source in plan if repeat % 2 == 0 else plan[::-1]:
            print(f"{name} ..." + (f" (round {repeat + 1} of {args.repeat})" if args.repeat > 1 else ""), flush=True)
            result = measure_once(name, source)
            if result is None:
                continue
            if source == "paddle":
                name = f"Paddle Inference {result['paddle']} (oneDNN)"
            result["best_s"] = {int(k): v for k, v in result["best_s"].items()}  # JSON made the keys strings
            if name in rows:
                kept = rows[name]
                kept["best_s"] = {b: min(kept["best_s"][b], result["best_s"][b]) for b in kept["best_s"]}
                kept["first_s"] = min(kept["first_s"], result["first_s"])
            else:
                rows[name] = result

    reference = rows.get("shitu JAX fp32", {}).get("features")
    peer = rows.get(PEER, {}).get("best_s", {})
    print()
    print(
        f"| runtime | img/s b1 | img/s b8 | img/s b32 | b1 latency ms | first call s | peak RSS MB | b1 vs {PEER} "
        f"| b32 vs {PEER} | max diff to JAX fp32 | min cosine to JAX fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        m = row["best_s"]
        ratio = " | ".join(f"{peer[b] / m[b]:.2f}×" if b in peer else "-" for b in (1, 32))
        diff = cosine = "-"
        if reference is not None and row.get("features") is not None:
            diff = f"{float(np.abs(row['features'] - reference).max()):.1e}"
            cosine = f"{float(np.min(np.sum(row['features'] * reference, axis=1))):.6f}"
        rss = f"{row['peak_rss_mb']:.0f}" if row.get("peak_rss_mb") else "-"
        print(
            f"| {name} | {1 / m[1]:.1f} | {8 / m[8]:.1f} | {32 / m[32]:.1f} | {1000 * m[1]:.1f} | "
            f"{row['first_s']:.2f} | {rss} | {ratio} | {diff} | {cosine} |"
        )
    if args.skip_interleaved:
        return
    paths = [
        ("shitu ONNX → OpenVINO int8", str(shitu_int8), "int8", "NHWC"),
        ("shitu ONNX → OpenVINO bf16", str(shitu_fp32), "bf16", "NHWC"),
    ]
    if p2o is not None:
        paths.append((PEER, str(p2o), "bf16", "NCHW"))
    print(f"\nOpenVINO paths interleaved in one process ({args.rounds} rounds) ...", flush=True)
    command = [sys.executable, __file__, "--head-to-head", json.dumps(paths), "--rounds", str(args.rounds)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"  failed: {proc.stderr.strip()[-400:]}", flush=True)
        return
    best = {name: {int(b): t for b, t in row.items()} for name, row in json.loads(proc.stdout.splitlines()[-1]).items()}
    peer = best.get(PEER, {})
    print(f"| runtime (interleaved) | img/s b1 | img/s b8 | img/s b32 | b1 latency ms | b1 vs {PEER} | b32 vs {PEER} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in best.items():
        ratio = " | ".join(f"{peer[b] / m[b]:.2f}×" if b in peer else "-" for b in (1, 32))
        print(f"| {name} | {1 / m[1]:.1f} | {8 / m[8]:.1f} | {32 / m[32]:.1f} | {1000 * m[1]:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
