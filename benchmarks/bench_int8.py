"""Reduced precision vs fp32 on the open-set grocery split: Recall@1, Recall@5, mAP and images/s of every path.

The bundled starting weights were trained on 61 Grocery Store products; this evaluates them on the 20 others (the
demo set's products, never seen in training): the demo set's 40-image gallery against its 60 query photos or,
with ``--all-queries``, against every other photo of those 20 products in the Grocery Store dataset (about 790,
found beside the repository in ``../shared/data/grocery`` or at ``--grocery``), which resolves a Recall@1 change
of 0.0013 instead of 0.017.

Paths: shitu JAX fp32 (the reference) and bf16, shitu's exported ONNX graph in ONNX Runtime (fp32, int8) and
OpenVINO (f32, bf16, int8), and, when ``nncf`` is installed, OpenVINO's own post-training quantizer (NNCF,
``nncf.quantize`` on the same ONNX graph) in OpenVINO. int8 is calibrated on the gallery images only, never the
queries, as ``shitu eval --precision int8 --calibration DATASET/gallery.txt`` does. Every path embeds the same
preprocessed images. img/s: the fastest of ``--reps`` calls of 32 preprocessed query images after a warm-up call
(the fastest, because the machine may be shared).

    .venv/bin/python benchmarks/bench_int8.py [--input-size 64] [--all-queries] [--model-dir BUNDLE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parents[1]
GROCERY = ROOT.parent / "shared" / "data" / "grocery"
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
TIMED_BATCH = 32
EMBED_BATCH = 32

Forward = Callable[[np.ndarray], np.ndarray]


def split_lists(dataset: Path, grocery: Path | None) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(gallery, queries) as (image path, label): the demo set's lists, or with ``grocery`` every photo of the
    demo products there that is not a gallery image as a query."""

    def read(name: str) -> list[tuple[Path, int]]:
        rows = [line.rsplit(" ", 1) for line in (dataset / name).read_text().splitlines() if line.strip()]
        return [(dataset / path, int(label)) for path, label in rows]

    gallery = read("gallery.txt")
    if grocery is None:
        return gallery, read("query.txt")
    in_gallery = {path.name for path, _ in gallery}
    products = [line.strip() for line in (dataset / "label.txt").read_text().splitlines() if line.strip()]
    queries = []
    for label, product in enumerate(products):
        for photo in sorted((grocery / "photos" / product).glob("*.jpg")):
            if photo.name not in in_gallery:
                queries.append((photo, label))
    return gallery, queries


def embed_all(forward: Forward, images: np.ndarray) -> np.ndarray:
    parts = [forward(images[i : i + EMBED_BATCH]) for i in range(0, len(images), EMBED_BATCH)]
    features = np.concatenate(parts).astype(np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def images_per_second(forward: Forward, images: np.ndarray, reps: int) -> float:
    forward(images)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        forward(images)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def nncf_forward(recognizer, calibration_images: np.ndarray, folder: Path) -> Forward:
    """OpenVINO running the exported graph quantized by NNCF (defaults: int8 symmetric weights per channel,
    fast bias correction), calibrated on ``calibration_images``."""
    import nncf
    import onnx

    from shitu.export.backends import OpenVinoForward, exported_onnx

    model = onnx.load(exported_onnx(recognizer))
    batches = [{"images": calibration_images[i : i + 16]} for i in range(0, len(calibration_images), 16)]
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(calibration_images))
    target = folder / "nncf.onnx"
    onnx.save(quantized, target)
    return OpenVinoForward(target, precision="fp32")


def main() -> None:
    from shitu.data.demo import demo_dataset_path, demo_start_weights_path
    from shitu.embed.resolve import resolve_model
    from shitu.evaluation.metrics import retrieval_metrics
    from shitu.export.backends import cpu_threads, installed, jax_bf16_available
    from shitu.export.quantize import calibration_set
    from shitu.runtime import configure_jax

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the bundled starting weights")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--all-queries", action="store_true", help="every other photo of the 20 products")
    parser.add_argument("--grocery", type=Path, default=GROCERY, help="the Grocery Store dataset folder")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per path")
    args = parser.parse_args()
    configure_jax()
    bundle = args.model_dir or demo_start_weights_path()
    dataset = demo_dataset_path()
    gallery, queries = split_lists(dataset, args.grocery if args.all_queries else None)
    calibration = calibration_set([str(path) for path, _ in gallery])
    flags = sorted(cpu_flags() & set(SHOWN_FLAGS))
    print(f"CPU: {cpu_model()}, {cpu_threads()} threads; flags {' '.join(flags) or '-'}", flush=True)
    print(
        f"model {bundle}, {args.input_size} px; {len(gallery)} gallery, {len(queries)} query images; "
        f"int8 {calibration.describe()} (the gallery)",
        flush=True,
    )
    reference = resolve_model(bundle, input_size=args.input_size)
    gallery_images = np.stack([reference.preprocess(str(p)) for p, _ in gallery]).astype(np.float32)
    query_images = np.stack([reference.preprocess(str(p)) for p, _ in queries]).astype(np.float32)
    gallery_labels = np.array([label for _, label in gallery])
    query_labels = np.array([label for _, label in queries])
    timed = query_images[:TIMED_BATCH]

    paths: list[tuple[str, str, str]] = [("shitu JAX fp32", "jax", "fp32")]
    if jax_bf16_available()[0]:
        paths.append(("shitu JAX bf16", "jax", "bf16"))
    if installed("onnxruntime"):
        paths += [("ONNX Runtime fp32", "onnxruntime", "fp32"), ("ONNX Runtime int8 (QDQ)", "onnxruntime", "int8")]
    if installed("openvino"):
        paths += [("OpenVINO f32", "openvino", "fp32"), ("OpenVINO bf16", "openvino", "bf16")]
        paths += [("OpenVINO int8 (QDQ)", "openvino", "int8")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("SHITU_CACHE_DIR", str(Path(scratch) / "cache"))
        forwards: list[tuple[str, Callable[[], Forward]]] = []
        for name, backend, precision in paths:
            chosen = calibration if precision == "int8" else None

            def make(backend: str = backend, precision: str = precision, chosen=chosen) -> Forward:
                return resolve_model(
                    bundle, input_size=args.input_size, backend=backend, precision=precision, calibration=chosen
                ).embed_arrays

            forwards.append((name, make))
        if installed("openvino"):
            try:
                import nncf  # noqa: F401

                folder = Path(scratch)
                forwards.append(("OpenVINO int8 (NNCF)", lambda: nncf_forward(reference, gallery_images, folder)))
            except ImportError:
                print("nncf not installed: no NNCF row", flush=True)
        reference_features = None
        for name, make in forwards:
            started = time.perf_counter()
            forward = make()
            ready = time.perf_counter() - started
            features_gallery = embed_all(forward, gallery_images)
            features_query = embed_all(forward, query_images)
            metrics = retrieval_metrics(features_query, query_labels, features_gallery, gallery_labels, topk=(1, 5))
            cosine = 1.0
            if reference_features is None:
                reference_features = features_query
            else:
                cosine = float(np.min(np.sum(features_query * reference_features, axis=1)))
            speed = images_per_second(forward, timed, args.reps)
            rows.append((name, metrics.recall[1], metrics.recall[5], metrics.mAP, cosine, speed, ready))
            print(f"  {name}: Recall@1 {metrics.recall[1]:.4f}, {speed:.1f} img/s", flush=True)
    base_recall, base_map = rows[0][1], rows[0][3]
    print()
    print(
        f"| path | Recall@1 | Δ Recall@1 | Recall@5 | mAP | Δ mAP | min cosine to fp32 | img/s b{TIMED_BATCH} "
        "| set-up s (incl. export/quantize) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, recall1, recall5, mean_ap, cosine, speed, ready in rows:
        print(
            f"| {name} | {recall1:.4f} | {recall1 - base_recall:+.4f} | {recall5:.4f} | {mean_ap:.4f} | "
            f"{mean_ap - base_map:+.4f} | {cosine:.4f} | {speed:.1f} | {ready:.1f} |"
        )


if __name__ == "__main__":
    main()
