"""``shitu serve`` under load, on loopback only: dynamic batching against offline batched embedding.

Measures, on one machine and one model (PP-ShiTuV2_rec, random weights, ``--size`` px):

- offline: ``Recognizer.embed`` over the images at batch 32 (decode included), and batch-1 latency of
  ``create_model(...).predict`` on one image;
- the server: 16 concurrent clients posting one image each to /v1/embed (throughput, p50/p95/p99), and one
  client alone (batch-1 latency);
- search on a gallery of ``--gallery`` synthetic unit vectors (seeded through ``--index``) by 16 clients while
  one more client adds images at the same time.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--size 64] [--gallery 100000] [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "grocery" / "photos"


def _images(count: int) -> list[bytes]:
    from serve_support import png_bytes

    found = sorted(PHOTOS.glob("*/*.jpg"))[:count] if PHOTOS.is_dir() else []
    if len(found) >= count:
        return [p.read_bytes() for p in found]
    return [png_bytes(seed, size=(348, 348)) for seed in range(count)]


def _percentiles(values: list[float]) -> str:
    q = np.percentile(np.asarray(values) * 1000, [50, 95, 99])
    return f"{q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f}"


def _load(url: str, make_body, path: str, clients: int, seconds: float, headers=None) -> tuple[int, list[float]]:
    import httpx

    latencies: list[float] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(number: int) -> None:
        with httpx.Client(base_url=url, timeout=60.0, headers=headers) as http:
            sent = 0
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = http.post(path, json=make_body(number, sent))
                response.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - started)
                sent += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return len(latencies), latencies


def main() -> None:
    from _machine import cpu_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()

    import os

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
    rows: list[tuple[str, str, str]] = []
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; model PP-ShiTuV2_rec at {args.size} px", flush=True)

    predictor = create_model(bundle)
    recognizer = predictor.recognizer
    recognizer.embed(paths, batch_size=32)  # compile
    started = time.perf_counter()
    rounds = 0
    while time.perf_counter() - started < args.seconds:
        recognizer.embed(paths, batch_size=32)
        rounds += 1
    offline = rounds * len(paths) / (time.perf_counter() - started)
    rows.append(("offline Recognizer.embed, batch 32", f"{offline:.1f} images/s", "-"))
    list(predictor.predict([str(paths[0])]))
    single = []
    for _ in range(30):
        t0 = time.perf_counter()
        list(predictor.predict([str(paths[0])]))
        single.append(time.perf_counter() - t0)
    rows.append(("offline create_model(...).predict, 1 image", "-", _percentiles(single)))

    # The gallery is built in its own process: usearch's multi-threaded build crashed (SIGSEGV) here when run
    # at 20k items in a process that had already loaded JAX.
    t0 = time.perf_counter()
    script = (
        "import sys, json, numpy as np; from shitu.index.core import build_index; n = int(sys.argv[1]); "
        "rng = np.random.default_rng(0); v = rng.standard_normal((n, 512)).astype(np.float32); "
        "build_index(v, rng.integers(0, 1000, n).tolist(), [f'synthetic/{i}' for i in range(n)], "
        "output=sys.argv[2], recognizer_info=json.loads(sys.argv[3]))"
    )
    info = json.dumps(recognizer.describe())
    subprocess.run([sys.executable, "-c", script, str(args.gallery), str(work / "gallery"), info], check=True)
    print(f"gallery of {args.gallery} built in {time.perf_counter() - t0:.1f} s", flush=True)

    server = Server(bundle, work / "state", Path(os.environ["SHITU_CACHE_DIR"]), "--index", str(work / "gallery"))
    server.start()
    try:
        encoded = [b64(data) for data in images]
        count, latencies = _load(
            server.url, lambda c, s: {"images": [encoded[(c * 7 + s) % len(encoded)]]}, "/v1/embed", 16, args.seconds
        )
        rows.append(
            ("server /v1/embed, 16 clients x 1 image", f"{count / args.seconds:.1f} images/s", _percentiles(latencies))
        )
        count, latencies = _load(
            server.url, lambda c, s: {"images": [encoded[s % len(encoded)]]}, "/v1/embed", 1, args.seconds
        )
        rows.append(
            ("server /v1/embed, 1 client x 1 image", f"{count / args.seconds:.1f} images/s", _percentiles(latencies))
        )

        added = [0]
        stop = threading.Event()

        def writer() -> None:
            import httpx

            with httpx.Client(base_url=server.url, timeout=60.0) as http:
                n = 0
                while not stop.is_set():
                    http.post(
                        "/v1/items", json={"images": [b64(png_bytes(10_000 + n))], "labels": ["new"]}
                    ).raise_for_status()
                    added[0] += 1
                    n += 1

        thread = threading.Thread(target=writer)
        thread.start()
        body = {"k": 5, "min_score": -1.0}
        count, latencies = _load(
            server.url,
            lambda c, s: {**body, "images": [encoded[(c + s) % len(encoded)]]},
            "/v1/search",
            16,
            args.seconds,
        )
        stop.set()
        thread.join()
        rows.append(
            (
                f"server /v1/search on {args.gallery:,} items, 16 clients, adds alongside",
                f"{count / args.seconds:.1f} searches/s, {added[0] / args.seconds:.1f} adds/s",
                _percentiles(latencies),
            )
        )
    finally:
        server.stop()
    print("\n| measurement | throughput | latency p50 / p95 / p99 (ms) |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")


if __name__ == "__main__":
    main()
