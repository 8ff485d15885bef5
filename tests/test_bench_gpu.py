"""``benchmarks/bench_gpu.py --tiny`` on this machine's CPU: the GPU benchmark keeps working until a GPU runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    import os

    env = dict(os.environ, SHITU_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_tiny_run_measures_every_cpu_backend(tiny_result):
    from shitu.export.backends import jax_bf16_available

    rows = {(r["backend"], r["device"].split(" ")[0], r["precision"]): r for r in tiny_result["rows"]}
    expected = {("jax", "cpu", "fp32"), ("onnxruntime", "CPU", "fp32"), ("onnxruntime", "CPU", "int8")}
    expected |= {("openvino", "CPU", "fp32"), ("openvino", "CPU", "int8")}
    if jax_bf16_available()[0]:
        expected.add(("jax", "cpu", "bf16"))
    assert expected <= rows.keys(), (sorted(rows), tiny_result["skipped"])
    assert tiny_result["settings"]["size"] == 32 and tiny_result["settings"]["batches"] == [1, 8]
    for row in rows.values():
        assert row["first_call_s"] > 0 and row["latency_ms"] > 0
        assert set(row["images_per_s"]) == {"1", "8"} and all(v > 0 for v in row["images_per_s"].values())
    assert rows[("jax", "cpu", "fp32")]["cosine_to_fp32"] == pytest.approx(1.0, abs=1e-6)
    assert rows[("onnxruntime", "CPU", "fp32")]["cosine_to_fp32"] > 0.9999  # the same graph, exported
    for key, row in rows.items():
        if key[2] == "bf16":
            assert row["cosine_to_fp32"] > 0.99, key
        elif key[2] == "int8":
            assert row["cosine_to_fp32"] > 0.8, key
    assert "CUDA" in " ".join(tiny_result["skipped"]) or any(k[1] == "CUDA" for k in rows)
    assert tiny_result["machine"].count(";") >= 2 and "accelerators:" in tiny_result["machine"]


def test_markdown_table_has_a_row_per_measurement(tiny_result):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    result = json.loads(json.dumps(tiny_result))
    for row in result["rows"]:  # JSON keys are text; the table reads them as the batch sizes
        row["images_per_s"] = {int(k): v for k, v in row["images_per_s"].items()}
    table = bench_gpu.markdown(result)
    assert table.startswith("machine: ")
    assert "| backend | device | precision | first call s | images/s b1 | images/s b8 |" in table
    assert sum(line.startswith("| jax ") or line.startswith("| onnx") or line.startswith("| openvino ")
               for line in table.splitlines()) == len(result["rows"])  # fmt: skip
