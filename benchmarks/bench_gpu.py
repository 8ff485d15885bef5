"""Inference speed on every backend this machine has, fp32 against bf16 (and int8 where a backend runs it).

One command, a few minutes on a GPU machine; it runs anywhere (what is not there is skipped with the reason):

- JAX on each platform it sees (``gpu``, ``cpu``): fp32, and bf16 where there is a bf16 path (any GPU; a CPU
  with AVX-512 BF16 or AMX);
- ONNX Runtime with each provider present of TensorRT, CUDA and CPU, on shitu's exported graph: fp32; fp16 on
  TensorRT; int8 (the calibrated QDQ graph) on the CPU provider;
- OpenVINO on each device it lists: f32, bf16 where the device reports it, int8 (the same QDQ graph).

For each row: the first call (setting the runtime up plus one batch-1 call; the ONNX export and int8 calibration
are done once beforehand and not counted), images/s at each ``--batches`` size (median of ``--reps`` calls after a
warm-up call), the batch-1 latency (median) and the cosine of its features to JAX fp32's on the same images (the
smallest over a batch of 4). Weights are random (seed 0): PP-ShiTuV2_rec by default at 224 px (the published
size), CLIP ViT-B/16 with ``--clip``.

    .venv/bin/python benchmarks/bench_gpu.py               # PP-ShiTuV2_rec, 224 px, batches 1/8/32
    .venv/bin/python benchmarks/bench_gpu.py --clip        # the CLIP ViT-B/16 recognizer
    .venv/bin/python benchmarks/bench_gpu.py --tiny        # 32 px, width 0.25, two reps: a check in seconds
    nox -s gpu                                             # the full-size run

Prints the machine line (CPU model and flags, accelerators) and a Markdown table, or with ``--json`` one JSON
object (``machine``, ``settings``, ``rows``, ``skipped``) alone on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags, cpu_model

REC = "PP-ShiTuV2_rec"
CLIP = "PP-ShiTuV2_rec_CLIP_vit_base"  # CLIP ViT-B/16
CHECK_BATCH = 4
ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

Forward = Callable[[np.ndarray], np.ndarray]


@dataclass
class Row:
    backend: str
    device: str
    precision: str
    first_call_s: float
    images_per_s: dict[int, float]
    latency_ms: float
    cosine_to_fp32: float | None = None


@dataclass
class Plan:
    model: str
    size: int
    batches: tuple[int, ...]
    reps: int
    arch: dict = field(default_factory=dict)
    calibration_images: int = 32


def _images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def measure(
    plan: Plan, backend: str, device: str, precision: str, make: Callable[[], Forward]
) -> tuple[Row, np.ndarray]:
    """Time ``make()`` and the forward it returns; the row and the features of the check batch."""
    started = time.perf_counter()
    forward = make()
    forward(_images(1, plan.size, seed=1))
    first = time.perf_counter() - started
    speeds: dict[int, float] = {}
    latency = 0.0
    for batch in plan.batches:
        x = _images(batch, plan.size, seed=batch)
        forward(x)  # warm-up: a new shape compiles in JAX and TensorRT
        runs = []
        for _ in range(plan.reps):
            t0 = time.perf_counter()
            forward(x)
            runs.append(time.perf_counter() - t0)
        median = statistics.median(runs)
        speeds[batch] = batch / median
        if batch == 1:
            latency = 1000.0 * median
    if 1 not in plan.batches:
        runs = []
        for _ in range(plan.reps):
            t0 = time.perf_counter()
            forward(_images(1, plan.size, seed=1))
            runs.append(time.perf_counter() - t0)
        latency = 1000.0 * statistics.median(runs)
    features = np.asarray(forward(_images(CHECK_BATCH, plan.size, seed=99)), np.float32)
    return Row(backend, device, precision, first, speeds, latency), features


# ----------------------------------------------------------------------------------------------- the backends


def jax_candidates(recognizer_of: Callable[[], object]) -> tuple[list, list[str]]:
    """``(backend, device, precision, make)`` for JAX on each platform, and the skipped combinations."""
    import jax

    from shitu.export.backends import make_forward

    runs, skipped = [], []
    platforms = []
    for name in ("gpu", "cpu"):
        try:
            platforms.append((name, jax.devices(name)[0]))
        except RuntimeError:
            skipped.append(f"jax {name}: no such device")
    for name, device in platforms:
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and name == "cpu":
                ok, why = _cpu_bf16()
                if not ok:
                    skipped.append(f"jax cpu bf16: {why}")
                    continue

            def make(device=device, precision=precision) -> Forward:
                forward, _ = make_forward(recognizer_of(), "jax", precision)  # an Embedder either way
                forward.to_device(device)
                return forward

            runs.append(("jax", f"{name} ({device.device_kind})", precision, make))
    return runs, skipped


def _cpu_bf16() -> tuple[bool, str]:
    """Whether XLA:CPU has a bf16 path here (as :func:`shitu.export.backends.jax_bf16_available` decides when the
    CPU is JAX's default backend; here the CPU may sit beside a GPU)."""
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return True, ""
    return False, "this CPU has neither AVX-512 BF16 nor AMX (JAX would emulate bf16)"


def onnxruntime_candidates(onnx_file: Path, int8_file: Path | None) -> tuple[list, list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [], ["onnxruntime: not installed (pip install 'shitu[onnx]')"]
    from shitu.export.backends import cpu_threads

    available = set(ort.get_available_providers())
    runs, skipped = [], []
    for provider in ORT_PROVIDERS:
        short = {"TensorrtExecutionProvider": "TensorRT"}.get(provider, provider.removesuffix("ExecutionProvider"))
        if provider not in available:
            skipped.append(f"onnxruntime {short}: provider not available")
            continue
        precisions = {"fp32": (onnx_file, {})}
        if provider == "TensorrtExecutionProvider":
            precisions["fp16"] = (onnx_file, {"trt_fp16_enable": True})
        if provider == "CPUExecutionProvider":
            if int8_file is not None:
                precisions["int8"] = (int8_file, {})
            skipped.append("onnxruntime CPU bf16: no bf16 kernels for an fp32 graph")
        elif provider == "CUDAExecutionProvider":
            skipped.append("onnxruntime CUDA bf16/int8: runs fp32 graphs in fp32")
        for precision, (model_file, options) in precisions.items():

            def make(provider=provider, model_file=model_file, options=options) -> Forward:
                session_options = ort.SessionOptions()
                session_options.intra_op_num_threads = cpu_threads()
                session_options.log_severity_level = 3
                session = ort.InferenceSession(str(model_file), session_options, providers=[(provider, options)])
                actual = session.get_providers()[0]
                if actual != provider:
                    raise RuntimeError(f"{provider} fell back to {actual}")
                name = session.get_inputs()[0].name

                def call(images: np.ndarray) -> np.ndarray:
                    return np.asarray(session.run(None, {name: np.ascontiguousarray(images)})[0], np.float32)

                return call

            runs.append(("onnxruntime", short, precision, make))
    return runs, skipped


def openvino_candidates(onnx_file: Path, int8_file: Path | None) -> tuple[list, list[str]]:
    from shitu.export.backends import import_openvino

    try:
        ov = import_openvino()
    except ImportError:
        return [], ["openvino: not installed (pip install 'shitu[openvino]')"]
    from shitu.export.backends import cpu_threads

    core = ov.Core()
    runs, skipped = [], []
    for device in core.available_devices:
        capabilities = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        precisions = {"fp32": (onnx_file, "f32")}
        if "BF16" in capabilities:
            precisions["bf16"] = (onnx_file, "bf16")
        else:
            skipped.append(f"openvino {device} bf16: the device reports no BF16")
        if int8_file is not None and "INT8" in capabilities:
            precisions["int8"] = (int8_file, "f32")
        for precision, (model_file, hint) in precisions.items():

            def make(device=device, model_file=model_file, hint=hint) -> Forward:
                config = {"INFERENCE_PRECISION_HINT": hint}
                if device == "CPU":
                    config["INFERENCE_NUM_THREADS"] = cpu_threads()
                compiled = core.compile_model(str(model_file), device, config)
                request = compiled.create_infer_request()
                output = compiled.output(0)

                def call(images: np.ndarray) -> np.ndarray:
                    return np.array(request.infer({0: np.ascontiguousarray(images)})[output], np.float32)

                return call

            runs.append(("openvino", device, precision, make))
    return runs, skipped


# ------------------------------------------------------------------------------------------------------- run


def machine_line() -> str:
    import jax

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"})
    accelerators = sorted({d.device_kind for d in jax.devices() if d.platform != "cpu"})
    return (
        f"{cpu_model()}; flags {' '.join(flags) or 'none of avx2/avx512'}; "
        f"accelerators: {', '.join(accelerators) or 'none'}; Python {platform.python_version()}, jax {jax.__version__}"
    )


def run(plan: Plan, work: Path, *, int8: bool = True) -> dict:
    """Every backend × precision that is there; ``{"machine", "settings", "rows", "skipped"}``."""
    from shitu.embed.resolve import resolve_model
    from shitu.export.backends import exported_onnx
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model(plan.model)
    bundle = work / "bundle"
    save_bundle(bundle, spec=spec, model=spec.build(1, seed=0, **plan.arch), num_classes=1, arch=plan.arch)

    def recognizer_of():
        return resolve_model(bundle, input_size=plan.size)

    skipped: list[str] = []
    onnx_file = int8_file = None
    try:
        onnx_file = exported_onnx(recognizer_of())
        if int8:
            from shitu.data.demo import demo_dataset_path
            from shitu.export.quantize import calibration_set

            calibration = calibration_set(demo_dataset_path() / "gallery.txt", limit=plan.calibration_images)
            int8_file = exported_onnx(recognizer_of(), calibration)
    except ImportError as exc:
        skipped.append(f"ONNX export: {exc}")

    candidates, skips = jax_candidates(recognizer_of)
    skipped += skips
    if onnx_file is not None:
        for finder in (onnxruntime_candidates, openvino_candidates):
            found, skips = finder(onnx_file, int8_file)
            candidates += found
            skipped += skips

    rows: list[Row] = []
    reference: np.ndarray | None = None
    for backend, device, precision, make in candidates:
        try:
            row, features = measure(plan, backend, device, precision, make)
        except Exception as exc:  # one runtime failing (a provider without its libraries) must not stop the rest
            skipped.append(f"{backend} {device} {precision}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if reference is None and backend == "jax" and precision == "fp32":
            reference = features
        if reference is not None:
            a = features / np.linalg.norm(features, axis=1, keepdims=True)
            b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
            row.cosine_to_fp32 = float(np.min(np.sum(a * b, axis=1)))
        rows.append(row)
        print(f"# {backend} {device} {precision}: done", file=sys.stderr, flush=True)
    return {
        "machine": machine_line(),
        "settings": {**asdict(plan), "batches": list(plan.batches)},
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
    }


def markdown(result: dict) -> str:
    settings = result["settings"]
    batches = settings["batches"]
    lines = [
        f"machine: {result['machine']}",
        f"model: {settings['model']} (random weights{', arch ' + str(settings['arch']) if settings['arch'] else ''}), "
        f"{settings['size']} px, median of {settings['reps']} calls",
        "",
        "| backend | device | precision | first call s | "
        + " | ".join(f"images/s b{b}" for b in batches)
        + " | latency b1 ms | cosine to JAX fp32 |",
        "|---|---|---|---:|" + "---:|" * len(batches) + "---:|---:|",
    ]
    for row in result["rows"]:
        cosine = "" if row["cosine_to_fp32"] is None else f"{row['cosine_to_fp32']:.5f}"
        speeds = " | ".join(f"{row['images_per_s'][b]:.1f}" for b in batches)
        lines.append(
            f"| {row['backend']} | {row['device']} | {row['precision']} | {row['first_call_s']:.2f} | {speeds} | "
            f"{row['latency_ms']:.2f} | {cosine} |"
        )
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"]) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", action="store_true", help="CLIP ViT-B/16 instead of PP-ShiTuV2_rec")
    parser.add_argument("--size", type=int, default=None, help="input size in pixels (default 224; --tiny: 32)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 (--tiny: 1 8)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per batch size (default 20; --tiny: 2)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 rows (and their calibration)")
    parser.add_argument("--tiny", action="store_true", help="32 px, a quarter-width model, 2 reps: a quick check")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    args = parser.parse_args(argv)

    # JAX takes most of a GPU's memory up front by default; ONNX Runtime's CUDA provider runs in this process too.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from shitu.runtime import configure_jax

    configure_jax()
    arch: dict = {}
    if args.tiny:
        arch = {"scale": 0.25} if not args.clip else {"depth": 2, "embed_dim": 64, "num_heads": 4}
    plan = Plan(
        model=CLIP if args.clip else REC,
        size=args.size or (32 if args.tiny else 224),
        batches=tuple(args.batches or ((1, 8) if args.tiny else (1, 8, 32))),
        reps=args.reps or (2 if args.tiny else 20),
        arch=arch,
        calibration_images=4 if args.tiny else 32,
    )
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        result = run(plan, Path(tmp), int8=not args.no_int8)
    if args.json:
        print(json.dumps(result))
    else:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
