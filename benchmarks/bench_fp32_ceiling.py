"""How close each fp32 path runs to this CPU's float32 matmul rate, which bounds every fp32 path.

PP-ShiTuV2_rec's work is multiply-adds (MACs) in its convolutions, 96% of them in 1×1 and dense convolutions,
i.e. matmuls; they are counted from shitu's exported ONNX graph. The script measures the machine's fp32 MAC rate
on the model's own largest matmul shapes, as ONNX Runtime runs them (a 1×1 ``Conv`` on NCHW, as the exported
graph has it) and as XLA:CPU runs them (a dot on NHWC rows), on one thread and on every core. It then runs the
whole model, random weights at 224 px, in ONNX Runtime (shitu's exported graph) and through shitu's JAX
``Embedder``, calls interleaved round by round, and prints each path's MACs per second as a share of the best
all-core matmul rate: an fp32 path 1.2× the fastest one would need 1.2 times its share. Prints the CPU model
and flags.

    .venv/bin/python benchmarks/bench_fp32_ceiling.py              # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_fp32_ceiling.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line, random_bundle

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "bench_fp32_ceiling"
MODEL = "PP-ShiTuV2_rec"
SIZE = 224
BATCHES = (1, 8, 32)
#: (spatial side, input channels, output channels) of the model's largest 1×1 convolutions at 224 px.
MATMULS = ((14, 1024, 1024), (14, 512, 1024), (14, 256, 512), (28, 256, 256), (56, 128, 128))


def graph_macs(onnx_file: Path) -> tuple[int, int]:
    """Multiply-adds per image of the graph's convolutions and matmuls at ``SIZE`` px: (all, non-depthwise)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_file))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[:1]:
        dim.dim_value = 1  # one image; the spatial sizes are fixed by the export
    model = shape_inference.infer_shapes(model)
    values = list(model.graph.value_info) + list(model.graph.output)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    weights = {w.name: tuple(w.dims) for w in model.graph.initializer}
    total = dense = 0
    for node in model.graph.node:
        kernel = weights.get(node.input[1]) if len(node.input) > 1 else None
        if kernel is None:
            continue
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            macs = out[2] * out[3] * int(np.prod(kernel))
            total += macs
            dense += macs if kernel[1] > 1 else 0
        elif node.op_type in ("MatMul", "Gemm"):
            total += int(np.prod(kernel))
            dense += int(np.prod(kernel))
    return total, dense


def best_seconds(calls: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, float]:
    """The fastest per-call time of each callable over ``rounds`` rounds of ``repeat`` calls, taking turns. A
    round waits for its last result only (``block_until_ready`` where it has one), so JAX's calls follow one
    another as the ops of a model do, without waking its threads each time."""
    import jax

    for call in calls.values():
        jax.block_until_ready(call())
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeat):
                result = call()
            jax.block_until_ready(result)
            best[name] = min(best[name], (time.perf_counter() - start) / repeat)
    return best


def matmul_rates(threads: int, rounds: int, *, with_jax: bool) -> dict[tuple[int, int, int], dict[str, float]]:
    """GMAC/s of each MATMULS shape in ONNX Runtime (a 1×1 Conv on ``threads`` threads) and, ``with_jax``, in
    JAX (a dot, on every core: XLA:CPU's thread count is the process's)."""
    import jax
    import jax.numpy as jnp
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    rates = {}
    for side, cin, cout in MATMULS:
        x = rng.standard_normal((1, cin, side, side)).astype(np.float32)
        kernel = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"])],
            "conv1x1",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(kernel, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        calls: dict[str, Callable[[], object]] = {"onnxruntime": lambda s=session, x=x: s.run(None, {"x": x})}
        if with_jax:
            rows = jnp.asarray(x.reshape(cin, side * side).T.copy())
            matrix = jnp.asarray(kernel[:, :, 0, 0].T.copy())
            calls["jax"] = lambda r=rows, m=matrix: dot(r, m)
        macs = side * side * cin * cout
        seconds = best_seconds(calls, rounds, repeat=max(4, int(1e9 // macs)))
        rates[(side, cin, cout)] = {name: macs / s / 1e9 for name, s in seconds.items()}
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("SHITU_CACHE_DIR", str(WORK / "cache"))
    cores = len(os.sched_getaffinity(0))
    print(machine_line(), flush=True)

    from shitu.embed.resolve import resolve_model
    from shitu.export.backends import OnnxRuntimeForward, exported_onnx
    from shitu.runtime import configure_jax

    configure_jax()
    recognizer = resolve_model(random_bundle(WORK / "bundle", MODEL))
    graph = exported_onnx(recognizer)
    total, dense = graph_macs(graph)
    share = dense / total
    print(f"{MODEL} at {SIZE} px: {total / 1e6:.1f} M multiply-adds per image, {share:.0%} in dense convolutions")

    one = matmul_rates(1, args.rounds, with_jax=False)
    every = matmul_rates(cores, args.rounds, with_jax=True)
    print("\nfp32 matmul rate on the model's largest 1×1 convolutions, GMAC/s (fastest of the rounds)")
    print("| M × K × N | ONNX Runtime, 1 thread | JAX, every core | ONNX Runtime, every core |")
    print("|---|---:|---:|---:|")
    for (side, cin, cout), rate in every.items():
        single_thread, jax_rate, ort_rate = one[(side, cin, cout)]["onnxruntime"], rate["jax"], rate["onnxruntime"]
        print(f"| {side * side} × {cin} × {cout} | {single_thread:.1f} | {jax_rate:.1f} | {ort_rate:.1f} |")
    peak = max(max(rate.values()) for rate in every.values())
    single = max(rate["onnxruntime"] for rate in one.values())
    print(f"best: {single:.1f} GMAC/s on one thread, {peak:.1f} on {cores} cores ({peak / single:.2f}×)")
    ideal = cores * single  # every core at the best one-thread rate, no time lost to threading

    ort_model = OnnxRuntimeForward(graph, threads=cores)
    embed = recognizer.embedder
    rng = np.random.default_rng(1)
    rows = []
    for batch in BATCHES:
        nhwc = rng.standard_normal((batch, SIZE, SIZE, 3)).astype(np.float32)
        calls = {"ONNX Runtime (shitu's graph)": lambda x=nhwc: ort_model(x), "shitu JAX fp32": lambda x=nhwc: embed(x)}
        for name, seconds in best_seconds(calls, args.rounds, repeat=max(1, 16 // batch)).items():
            rows.append((name, batch, batch / seconds, batch * total / seconds / 1e9))
    print("\nWhole model, fp32, interleaved (fastest round)")
    print(f"| path | batch | images/s | GMAC/s | of the best {cores}-core matmul rate | of {cores} × one thread's |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, batch, images, gmacs in rows:
        print(f"| {name} | {batch} | {images:.1f} | {gmacs:.1f} | {gmacs / peak:.0%} | {gmacs / ideal:.0%} |")
    fastest = max(gmacs for _, _, _, gmacs in rows)
    print(
        f"An fp32 path 1.2× the fastest here would run at {1.2 * fastest:.1f} GMAC/s: {1.2 * fastest / peak:.0%} of "
        f"the best {cores}-core matmul rate, {1.2 * fastest / ideal:.0%} of {cores} cores each at the best one-thread "
        "rate."
    )


if __name__ == "__main__":
    main()
