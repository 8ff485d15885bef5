"""Paddle side of ``bench_models.py``; run with the Paddle environment (``.venv-paddle/bin/python``).

Prints one JSON object on its last stdout line. Modes:

- ``infer``: Paddle Inference on an exported ``inference.json`` + ``inference.pdiparams`` folder, MKLDNN on,
  2 math threads (``enable_memory_optim`` stays off: it breaks ``inference.json`` models in Paddle 3.3.1);
- ``dygraph``: PaddleClas' ``RecModel`` (built as ``tests/parity/paddle_reference.py`` builds it, PaddleClas'
  own random init) in eval mode under ``paddle.no_grad()``.
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
from _machine import peak_rss_mb

THREADS = 2


def _times(fn, reps: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    fn()  # first call: MKLDNN primitive creation / program preparation for this shape
    first = time.perf_counter() - t0
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, runs


def bench_infer(model_dir: Path, batches: list[int], reps: list[int], size: int) -> dict:
    import paddle
    from paddle import inference

    config = inference.Config(str(model_dir / "inference.json"), str(model_dir / "inference.pdiparams"))
    config.disable_gpu()
    config.enable_mkldnn()
    config.set_cpu_math_library_num_threads(THREADS)
    t0 = time.perf_counter()
    predictor = inference.create_predictor(config)
    create_s = time.perf_counter() - t0
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    output = predictor.get_output_handle(predictor.get_output_names()[0])
    rng = np.random.default_rng(0)
    results = []
    for batch, n in zip(batches, reps, strict=True):
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)

        def run(x=x):
            handle.reshape(list(x.shape))
            handle.copy_from_cpu(x)
            predictor.run()
            return output.copy_to_cpu()

        first, runs = _times(run, n)
        results.append({"batch": batch, "first_s": first, "runs_s": runs, "median_s": statistics.median(runs)})
    return {"paddle": paddle.__version__, "create_s": create_s, "results": results}


def bench_dygraph(name: str, batches: list[int], reps: list[int], size: int) -> dict:
    import paddle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))
    from paddle_reference import build, set_vit_globals

    paddle.set_device("cpu")
    paddle.set_num_threads(THREADS) if hasattr(paddle, "set_num_threads") else None
    model = build(name, tiny=False)
    model.eval()
    rng = np.random.default_rng(0)
    results = []
    for batch, n in zip(batches, reps, strict=True):
        x = paddle.to_tensor(rng.standard_normal((batch, 3, size, size)).astype(np.float32))

        def run(x=x):
            set_vit_globals(name)
            with paddle.no_grad():
                return model(x)["features"].numpy()

        first, runs = _times(run, n)
        results.append({"batch": batch, "first_s": first, "runs_s": runs, "median_s": statistics.median(runs)})
    return {"paddle": paddle.__version__, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["infer", "dygraph"])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--name", default="PP-ShiTuV2_rec")
    parser.add_argument("--batches", type=int, nargs="+", required=True)
    parser.add_argument("--reps", type=int, nargs="+", required=True)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    if args.mode == "infer":
        out = bench_infer(args.model_dir, args.batches, args.reps, args.size)
    else:
        out = bench_dygraph(args.name, args.batches, args.reps, args.size)
    out["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
