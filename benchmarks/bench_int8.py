"""int8 post-training quantization vs fp32: Recall@1 / mAP and images/s on one dataset, side by side.

Every runtime runs shitu's exported ONNX graph (ONNX Runtime and OpenVINO, fp32 and int8; shitu JAX fp32 as
the reference); int8 is calibrated on the dataset's gallery (``gallery.txt``), as
``shitu eval --backend onnxruntime --precision int8 --calibration DATASET/gallery.txt`` does. Default: the
bundled demo set with the bundled starting weights at 64 px.

    .venv/bin/python benchmarks/bench_int8.py [--model-dir BUNDLE] [--dataset DATASET] [--input-size 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_flags, cpu_model

CONFIGS = [
    ("jax", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("openvino", "int8"),
]
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def images_per_second(recognizer, images: np.ndarray, calls: int = 5) -> float:
    """Median images/s of ``calls`` batch calls after one warm-up call."""
    recognizer.embed_arrays(images)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        recognizer.embed_arrays(images)
        times.append(time.perf_counter() - started)
    return len(images) / statistics.median(times)


def main() -> None:
    from shitu.data.demo import demo_dataset_path, demo_start_weights_path
    from shitu.data.inputs import resolve_inputs
    from shitu.embed.resolve import resolve_model
    from shitu.evaluation.evaluate import evaluate_model
    from shitu.export.backends import cpu_threads, inference_backend, installed
    from shitu.export.quantize import calibration_set
    from shitu.runtime import configure_jax

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the bundled starting weights")
    parser.add_argument("--dataset", type=Path, default=None, help="default: the bundled demo set")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="images per timed call")
    args = parser.parse_args()
    configure_jax()
    bundle = args.model_dir or demo_start_weights_path()
    dataset = args.dataset or demo_dataset_path()
    calibration = calibration_set(dataset / "gallery.txt")
    flags = sorted(cpu_flags() & set(SHOWN_FLAGS))
    print(f"CPU: {cpu_model()}, {cpu_threads()} threads; flags {' '.join(flags) or '-'}")
    print(f"model {bundle}, {args.input_size} px; dataset {dataset}; int8 {calibration.describe()}")
    timing_paths = resolve_inputs(dataset / "query.txt", skipped=[])[: args.batch]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("SHITU_CACHE_DIR", str(Path(scratch) / "cache"))
        for backend, precision in CONFIGS:
            if not installed(backend):
                print(f"{backend}: not installed, skipped")
                continue
            chosen = calibration if precision == "int8" else None
            with inference_backend(backend, precision, calibration=chosen):
                started = time.perf_counter()
                recognizer = resolve_model(bundle, input_size=args.input_size)
                ready = time.perf_counter() - started
                images = np.stack([recognizer.preprocess(p) for p in timing_paths])
                speed = images_per_second(recognizer, images)
                evaluation = evaluate_model(
                    bundle, dataset=dataset, output=Path(scratch) / f"{backend}-{precision}", input_size=args.input_size
                )
            metrics = evaluation.result.metrics.headline()
            rows.append((f"{backend} {precision}", metrics["recall1"], metrics["mAP"], speed, ready))
    print()
    print(f"| runtime | Recall@1 | mAP | img/s b{args.batch} | set-up s (incl. export/quantize) |")
    print("|---|---:|---:|---:|---:|")
    for name, recall1, mean_ap, speed, ready in rows:
        print(f"| {name} | {recall1:.4f} | {mean_ap:.4f} | {speed:.1f} | {ready:.1f} |")


if __name__ == "__main__":
    main()
