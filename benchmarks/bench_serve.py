"""``shitu serve`` under load, on loopback only: dynamic batching against offline batched embedding.

The load comes from ``wrk`` (a C load generator, ``apt-get install wrk``) replaying prepared JSON bodies with
Base64 images, so the clients take little of the CPU the server and the offline run are measured on.
Measures, on one machine and one model (PP-ShiTuV2_rec, random weights, ``--size`` px):

- offline: ``Recognizer.embed`` over the images at batch 32 (decode included), and batch-1 latency of
  ``create_model(...).predict`` on one image;
- the server: ``--clients`` connections posting one image each to /v1/embed (throughput, p50/p95/p99, and the
  CPU seconds the server and wrk used per image), and one connection alone (batch-1 latency);
- search on a gallery of ``--gallery`` synthetic unit vectors (built in a separate process, seeded through
  ``--index``) by ``--clients`` connections, alone and with one more connection adding images at the same time.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--size 64] [--gallery 100000] [--seconds 8]
[--server-args "--max-batch 32 --max-wait-ms 5"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "grocery" / "photos"

# wrk replays the prepared bodies (one file each, read once in init) round-robin on every connection, and
# prints its counters and latency percentiles as one JSON line when done. Latencies are in microseconds.
WRK_SCRIPT = r"""
local bodies = {}
local next_body = 1
function init(args)
  for i = 1, #args do
    local file = assert(io.open(args[i], "rb"))
    bodies[#bodies + 1] = file:read("*a")
    file:close()
  end
  next_body = math.random(#bodies)
end
function request()
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "seconds": %.6f, "p50": %d, "p95": %d, "p99": %d, "max": %d, ' ..
    '"status_errors": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def _images(count: int) -> list[bytes]:
    from serve_support import png_bytes

    found = sorted(PHOTOS.glob("*/*.jpg"))[:count] if PHOTOS.is_dir() else []
    if len(found) >= count:
        return [p.read_bytes() for p in found]
    return [png_bytes(seed, size=(348, 348)) for seed in range(count)]


def _bodies(folder: Path, documents: list[dict]) -> list[Path]:
    """Each JSON document written to its own file under ``folder`` (what the wrk script replays)."""
    folder.mkdir(parents=True)
    paths = []
    for n, document in enumerate(documents):
        paths.append(folder / f"{n}.json")
        paths[-1].write_text(json.dumps(document))
    return paths


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_wrk(url: str, script: Path, bodies: list[Path], connections: int, seconds: float) -> subprocess.Popen:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script), url]
    return subprocess.Popen([*command, "--", *map(str, bodies)], stdout=subprocess.PIPE, text=True)


def _finish_wrk(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {out}")
    found = [line for line in out.splitlines() if line.startswith("WRK_JSON ")]
    if not found:
        raise RuntimeError(f"wrk printed no summary: {out}")
    result = json.loads(found[0].removeprefix("WRK_JSON "))
    if result["status_errors"] or result["socket_errors"]:
        raise RuntimeError(f"the server answered with errors under load: {result}")
    return result


def _latency(result: dict) -> str:
    return f"{result['p50'] / 1000:.1f} / {result['p95'] / 1000:.1f} / {result['p99'] / 1000:.1f}"


def main() -> None:
    from _machine import cpu_flags, cpu_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--server-args", default="--max-batch 32 --max-wait-ms 5", help="extra `shitu serve` options")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark drives the load with wrk: apt-get install -y wrk")

    from serve_support import Server, b64, png_bytes

    from shitu.embed.predict import create_model
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host
    from shitu.runtime import configure_jax

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    os.environ.setdefault("SHITU_CACHE_DIR", str(work / "cache"))
    configure_jax()
    spec = get_host().model("PP-ShiTuV2_rec")
    bundle = work / "bundle"
    save_bundle(bundle, spec=spec, model=spec.build(1, seed=0), num_classes=1, extra={"input_size": args.size})
    images = _images(args.images)
    paths = []
    for n, data in enumerate(images):
        paths.append(work / f"img{n}.jpg")
        paths[-1].write_bytes(data)
    rows: list[tuple[str, str, str, str]] = []
    flags = " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "fma"}))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, flags {flags}; model PP-ShiTuV2_rec at {args.size} px")
    print(f"load: {Path('/proc/loadavg').read_text().strip()}", flush=True)

    predictor = create_model(bundle)
    recognizer = predictor.recognizer
    recognizer.embed(paths, batch_size=32)  # compile
    started = time.perf_counter()
    rounds = 0
    while time.perf_counter() - started < args.seconds:
        recognizer.embed(paths, batch_size=32)
        rounds += 1
    offline = rounds * len(paths) / (time.perf_counter() - started)
    rows.append(("offline Recognizer.embed, batch 32", f"{offline:.1f} images/s", "1.00", "-"))
    list(predictor.predict([str(paths[0])]))
    single = []
    for _ in range(30):
        t0 = time.perf_counter()
        list(predictor.predict([str(paths[0])]))
        single.append(time.perf_counter() - t0)
    import numpy as np

    q = np.percentile(np.asarray(single) * 1000, [50, 95, 99])
    rows.append(("offline create_model(...).predict, 1 image", "-", "-", f"{q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f}"))

    # The gallery is built in its own process: usearch's multi-threaded build crashed (SIGSEGV) here when run
    # at 20k items in a process that had already loaded JAX.
    t0 = time.perf_counter()
    script = (
        "import sys, json, numpy as np; from shitu.index.core import build_index; n = int(sys.argv[1]); "
        "rng = np.random.default_rng(0); v = rng.standard_normal((n, 512)).astype(np.float32); "
        "v /= np.linalg.norm(v, axis=1, keepdims=True); "
        "build_index(v, rng.integers(0, 1000, n).tolist(), [f'synthetic/{i}' for i in range(n)], "
        "output=sys.argv[2], recognizer_info=json.loads(sys.argv[3]))"
    )
    info = json.dumps(recognizer.describe())
    subprocess.run([sys.executable, "-c", script, str(args.gallery), str(work / "gallery"), info], check=True)
    print(f"gallery of {args.gallery} built in {time.perf_counter() - t0:.1f} s", flush=True)

    encoded = [b64(data) for data in images]
    wrk_script = work / "post.lua"
    wrk_script.write_text(WRK_SCRIPT)
    embed_bodies = _bodies(work / "embed", [{"images": [e]} for e in encoded])
    search_bodies = _bodies(work / "search", [{"images": [e], "k": 5, "min_score": -1.0} for e in encoded])
    # Distinct small images, so that every add stores a new item.
    add_bodies = _bodies(
        work / "add",
        [{"images": [b64(png_bytes(10_000 + n, size=(96, 96)))], "labels": ["new"]} for n in range(2000)],
    )
    server = Server(
        bundle,
        work / "state",
        Path(os.environ["SHITU_CACHE_DIR"]),
        "--index",
        str(work / "gallery"),
        *shlex.split(args.server_args),
    )
    server.start()
    assert server.process is not None
    pid = server.process.pid
    try:
        _finish_wrk(_start_wrk(server.url + "/v1/embed", wrk_script, embed_bodies, args.clients, 2))  # warm up
        cpu_before, wrk_before = _cpu_seconds(pid), os.times().children_user + os.times().children_system
        result = _finish_wrk(_start_wrk(server.url + "/v1/embed", wrk_script, embed_bodies, args.clients, args.seconds))
        server_cpu = _cpu_seconds(pid) - cpu_before
        wrk_cpu = os.times().children_user + os.times().children_system - wrk_before
        rate = result["requests"] / result["seconds"]
        rows.append(
            (
                f"server /v1/embed, {args.clients} connections x 1 image",
                f"{rate:.1f} images/s",
                f"{rate / offline:.2f}",
                _latency(result),
            )
        )
        cpu_line = (
            f"CPU while loaded: server {server_cpu / result['seconds']:.2f} cores "
            f"({1000 * server_cpu / result['requests']:.1f} ms per image), "
            f"wrk {wrk_cpu / result['seconds']:.2f} cores ({1000 * wrk_cpu / result['requests']:.2f} ms per image)"
        )
        print(cpu_line, flush=True)
        result = _finish_wrk(_start_wrk(server.url + "/v1/embed", wrk_script, embed_bodies, 1, args.seconds))
        rate = result["requests"] / result["seconds"]
        rows.append(
            (
                "server /v1/embed, 1 connection x 1 image",
                f"{rate:.1f} images/s",
                f"{rate / offline:.2f}",
                _latency(result),
            )
        )

        search_url = server.url + "/v1/search"
        alone = _finish_wrk(_start_wrk(search_url, wrk_script, search_bodies, args.clients, args.seconds))
        rate = alone["requests"] / alone["seconds"]
        rows.append(
            (
                f"server /v1/search on {args.gallery:,} items, {args.clients} connections",
                f"{rate:.1f} searches/s",
                f"{rate / offline:.2f}",
                _latency(alone),
            )
        )
        writer = _start_wrk(server.url + "/v1/items", wrk_script, add_bodies, 1, args.seconds)
        loaded = _finish_wrk(_start_wrk(search_url, wrk_script, search_bodies, args.clients, args.seconds))
        adds = _finish_wrk(writer)
        rate = loaded["requests"] / loaded["seconds"]
        rows.append(
            (
                f"server /v1/search on {args.gallery:,} items, {args.clients} connections, 1 adding alongside",
                f"{rate:.1f} searches/s, {adds['requests'] / adds['seconds']:.1f} adds/s",
                f"{rate / offline:.2f}",
                _latency(loaded),
            )
        )
        rows.append(("  adds alongside (1 connection)", "-", "-", _latency(adds)))
        print(f"search p99 with adds / without: {loaded['p99'] / alone['p99']:.2f}")
    finally:
        server.stop()
    print(f"\nserver: shitu serve {args.server_args}")
    print("\n| measurement | throughput | / offline | latency p50 / p95 / p99 (ms) |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
