"""How a CPU is best kept busy: PP-ShiTuV2_rec (random weights) in one process, the variants' calls interleaved
round by round, so that other work on shared cores slows them alike.

JAX rows: shitu's ``Embedder`` as it runs by default (on a CPU, inputs above ``CPU_CHUNK_PIXELS`` pixels cut into
chunks run two at a time) against one compiled call per batch (``cpu_chunk_pixels=None``), at each size and
batch. ONNX Runtime rows (224 px, shitu's exported graph): one session on every core against one thread, two
one-thread sessions on the two halves of the batch, and chunks of 8: how far scheduling alone can take the fp32
graph. Images/s are the fastest round's; prints the CPU model and flags.

    .venv/bin/python benchmarks/bench_cpu_chunks.py                  # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_cpu_chunks.py --sizes 224 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line, random_bundle

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "bench_cpu_chunks"
MODEL = "PP-ShiTuV2_rec"


def interleaved(variants: dict[str, Callable[[], object]], images: int, rounds: int, calls: int) -> dict[str, float]:
    """Images/s of each variant: the fastest of ``rounds`` rounds of ``calls`` calls, variants taking turns."""
    for run in variants.values():
        run()  # compile / warm up
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            best[name] = max(best[name], calls * images / (time.perf_counter() - start))
    return best


def report(title: str, rates: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    print("| variant | images/s | vs " + baseline + " |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / rates[baseline]:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("SHITU_CACHE_DIR", str(WORK / "cache"))
    print(machine_line(), flush=True)

    from shitu.embed.resolve import resolve_model
    from shitu.models.inference import CPU_CHUNK_PIXELS, Embedder
    from shitu.runtime import configure_jax

    configure_jax()
    recognizer = resolve_model(random_bundle(WORK / "bundle", MODEL))
    chunked = recognizer.embedder
    whole = Embedder(recognizer.model, inference_form=True, cpu_chunk_pixels=None)
    print(f"{MODEL}, fp32, random weights; CPU_CHUNK_PIXELS = {CPU_CHUNK_PIXELS}", flush=True)
    rng = np.random.default_rng(0)
    for size in args.sizes:
        for batch in args.batches:
            x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
            calls = max(1, int(48 * (224 / size) ** 2) // batch)
            variants = {"one call per batch": lambda x=x: whole(x), "shitu default": lambda x=x: chunked(x)}
            rates = interleaved(variants, batch, args.rounds, calls)
            step = chunked.chunk_size(size, size)
            report(f"JAX, {size} px, batch {batch} (default: chunks of {step})", rates, "one call per batch")

    from shitu.export.backends import OnnxRuntimeForward, cpu_threads, exported_onnx, installed

    if not installed("onnxruntime"):
        print("\nONNX Runtime not installed: no ONNX Runtime rows")
        return
    graph = exported_onnx(recognizer)
    cores = cpu_threads()
    every_core, one_thread = OnnxRuntimeForward(graph, threads=cores), OnnxRuntimeForward(graph, threads=1)
    singles = [OnnxRuntimeForward(graph, threads=1) for _ in range(cores)]
    pool = ThreadPoolExecutor(cores)

    def split(images: np.ndarray) -> object:
        parts = np.array_split(images, cores)
        return list(pool.map(lambda pair: pair[0](pair[1]), zip(singles, parts, strict=True)))

    size = recognizer.input_size
    for batch in args.batches:
        x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
        variants = {
            f"{cores} threads, whole batch": lambda x=x: every_core(x),
            "1 thread": lambda x=x: one_thread(x),
            f"{cores} one-thread sessions, batch split": lambda x=x: split(x),
        }
        if batch > 8:
            eights = np.split(x, batch // 8)
            variants[f"{cores} threads, chunks of 8"] = lambda eights=eights: [every_core(part) for part in eights]
        rates = interleaved(variants, batch, args.rounds, max(1, 48 // batch))
        report(f"ONNX Runtime, shitu's graph, {size} px, batch {batch}", rates, f"{cores} threads, whole batch")


if __name__ == "__main__":
    main()
