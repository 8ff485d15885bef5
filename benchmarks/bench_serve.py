"""``shitu serve`` under load, on loopback only: dynamic batching against offline batched embedding.

The load comes from ``wrk`` (a C load generator, ``apt-get install wrk``) replaying prepared request bodies
(``--form json``: JSON with Base64 images; ``--form multipart``: the image files as multipart parts, no
Base64), so the clients take little of the CPU the server and the offline run are measured on. Measures, on
one machine and one model (PP-ShiTuV2_rec, random weights, ``--size`` px), for each ``--backend`` (the offline
side and the server on the same backend, one after the other):

- offline: ``Recognizer.embed`` over the images at batch 32 (decode included; its CPU per image), and batch-1
  latency of ``create_model(...).predict`` on one image;
- the server: ``--clients`` connections posting one image each to /v1/embed (throughput, p50/p95/p99, and the
  CPU seconds the server and wrk used per image), and one connection alone (batch-1 latency);
- search on a gallery of ``--gallery`` synthetic unit vectors (built in a separate process, seeded through
  ``--index``) by ``--clients`` connections, alone and with one more connection adding images at the same time;
  every acknowledged add must be in the gallery afterwards (no lost write) and no request may fail.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--size 64] [--gallery 100000] [--seconds 8]
[--backend jax,openvino] [--form json] [--server-args "--max-batch 32 --max-wait-ms 5"]``.
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
  return wrk.format("POST", nil, {["Content-Type"] = CONTENT_TYPE}, body)
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


BOUNDARY = "shitu-bench-boundary"


def _multipart(images: list[bytes], fields: dict) -> bytes:
    """A multipart/form-data body: each image a file part of ``images``, each field a text part."""
    parts = []
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            text = item if isinstance(item, str) else json.dumps(item)
            parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{text}\r\n'.encode())
    for n, data in enumerate(images):
        header = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{n}.jpg"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(header.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _bodies(folder: Path, form: str, requests: list[tuple[list[bytes], dict]]) -> list[Path]:
    """Each request (its images and other fields) written to its own file under ``folder`` as a ``form``
    body (what the wrk script replays)."""
    folder.mkdir(parents=True)
    paths = []
    for n, (images, fields) in enumerate(requests):
        paths.append(folder / f"{n}.body")
        if form == "json":
            from serve_support import b64

            paths[-1].write_text(json.dumps({"images": [b64(data) for data in images], **fields}))
        else:
            paths[-1].write_bytes(_multipart(images, fields))
    return paths


def _content_type(form: str) -> str:
    return "application/json" if form == "json" else f"multipart/form-data; boundary={BOUNDARY}"


def _process_cpu() -> float:
    """User + system CPU seconds of this process so far (all threads; not its children)."""
    times = os.times()
    return times.user + times.system


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


def _offline(bundle: Path, paths: list[Path], backend: str, seconds: float) -> tuple[list[tuple], float]:
    """The offline rows of ``backend``: batched throughput (and its CPU per image), batch-1 latency."""
    import numpy as np

    from shitu.embed.predict import create_model

    predictor = create_model(bundle, backend=backend)
    recognizer = predictor.recognizer
    chosen = recognizer.backend.describe() if recognizer.backend is not None else "jax fp32"
    recognizer.embed(paths, batch_size=32)  # compile
    cpu_before = _process_cpu()
    started = time.perf_counter()
    rounds = 0
    while time.perf_counter() - started < seconds:
        recognizer.embed(paths, batch_size=32)
        rounds += 1
    elapsed = time.perf_counter() - started
    offline = rounds * len(paths) / elapsed
    cpu_ms = 1000 * (_process_cpu() - cpu_before) / (rounds * len(paths))
    rows = [(f"offline Recognizer.embed, batch 32 ({chosen})", f"{offline:.1f} images/s", "1.00", "-", f"{cpu_ms:.2f}")]
    list(predictor.predict([str(paths[0])]))
    single = []
    for _ in range(30):
        t0 = time.perf_counter()
        list(predictor.predict([str(paths[0])]))
        single.append(time.perf_counter() - t0)
    q = np.percentile(np.asarray(single) * 1000, [50, 95, 99])
    rows.append(("offline create_model(...).predict, 1 image", "-", "-", f"{q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f}", "-"))
    return rows, offline


def _serve(
    args: argparse.Namespace, backend: str, offline: float, work: Path, gallery: Path, bodies: dict, script: Path
) -> list:
    """The server rows of ``backend``: embed under load and alone, search alone and with adds alongside."""
    import httpx
    import serve_support
    from serve_support import Server

    serve_support.START_TIMEOUT = 900.0  # compiling every batch shape at 224 px on 2 busy cores takes minutes

    server = Server(
        work / "bundle",
        work / f"state-{backend}",
        Path(os.environ["SHITU_CACHE_DIR"]),
        "--index",
        str(gallery),
        "--backend",
        backend,
        *shlex.split(args.server_args),
    )
    server.start()
    assert server.process is not None
    pid = server.process.pid
    rows: list[tuple[str, str, str, str, str]] = []
    clients = args.clients

    def measure(route: str, kind: str, connections: int, label: str) -> dict:
        cpu_before = _cpu_seconds(pid)
        result = _finish_wrk(_start_wrk(server.url + route, script, bodies[kind], connections, args.seconds))
        cpu_ms = 1000 * (_cpu_seconds(pid) - cpu_before) / max(result["requests"], 1)
        rate = result["requests"] / result["seconds"]
        unit = "images/s" if kind == "embed" else "searches/s"
        rows.append((label, f"{rate:.1f} {unit}", f"{rate / offline:.2f}", _latency(result), f"{cpu_ms:.2f}"))
        return result

    try:
        _finish_wrk(_start_wrk(server.url + "/v1/embed", script, bodies["embed"], clients, 2))  # warm up
        measure("/v1/embed", "embed", clients, f"server /v1/embed, {clients} connections x 1 image")
        measure("/v1/embed", "embed", 1, "server /v1/embed, 1 connection x 1 image")
        search = f"server /v1/search on {args.gallery:,} items, {clients} connections"
        alone = measure("/v1/search", "search", clients, search)
        count_before = httpx.get(server.url + "/v1/index", timeout=30).json()["count"]
        writer = _start_wrk(server.url + "/v1/items", script, bodies["add"], 1, args.seconds)
        loaded = measure("/v1/search", "search", clients, search + ", 1 adding alongside")
        adds = _finish_wrk(writer)
        added = httpx.get(server.url + "/v1/index", timeout=30).json()["count"] - count_before
        # wrk counts the answers it read: each is an acknowledged add of a new image (none may be missing);
        # at most one more may have been written while its answer was still on the way when wrk stopped.
        if not adds["requests"] <= added <= adds["requests"] + 1:
            raise RuntimeError(f"{adds['requests']} adds acknowledged but the gallery grew by {added}")
        rows[-1] = (*rows[-1][:1], f"{rows[-1][1]}, {adds['requests'] / adds['seconds']:.1f} adds/s", *rows[-1][2:])
        rows.append(("  adds alongside (1 connection)", "-", "-", _latency(adds), "-"))
        print(
            f"{backend}: search p99 with adds / without: {loaded['p99'] / alone['p99']:.2f}; "
            f"{adds['requests']} adds acknowledged, gallery grew by {added}; 0 errors",
            flush=True,
        )
    finally:
        server.stop()
    return rows


def main() -> None:
    from _machine import cpu_flags, cpu_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--backend", default="jax", help="comma-separated backends (jax, onnxruntime, openvino, auto)")
    parser.add_argument("--form", choices=("json", "multipart"), default="json", help="how requests carry images")
    parser.add_argument("--gallery-cache", type=Path, help="keep the synthetic gallery in this folder between runs")
    parser.add_argument("--build-only", action="store_true", help="build the gallery and stop")
    parser.add_argument("--server-args", default="--max-batch 32 --max-wait-ms 5", help="extra `shitu serve` options")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark drives the load with wrk: apt-get install -y wrk")

    from serve_support import png_bytes

    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host
    from shitu.runtime import configure_jax
    from shitu.serve.app import server_implementations

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
    flags = " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "fma"}))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, flags {flags}; model PP-ShiTuV2_rec at {args.size} px")
    print(f"server: {' + '.join(server_implementations())}; requests: {args.form}; shitu serve {args.server_args}")
    print(f"load: {Path('/proc/loadavg').read_text().strip()}", flush=True)

    # The gallery is built in its own process: usearch's multi-threaded build crashed (SIGSEGV) here when run
    # at 20k items in a process that had already loaded JAX.
    from shitu.embed.recognizer import load_recognizer

    info = json.dumps(load_recognizer(bundle).describe())
    t0 = time.perf_counter()
    script = (
        "import sys, json, numpy as np; from shitu.index.core import build_index; n = int(sys.argv[1]); "
        "rng = np.random.default_rng(0); v = rng.standard_normal((n, 512)).astype(np.float32); "
        "v /= np.linalg.norm(v, axis=1, keepdims=True); "
        "build_index(v, rng.integers(0, 1000, n).tolist(), [f'synthetic/{i}' for i in range(n)], "
        "output=sys.argv[2], recognizer_info=json.loads(sys.argv[3]))"
    )
    gallery = work / "gallery"
    if args.gallery_cache is not None:  # the same synthetic gallery, kept between runs (its build is not timed)
        gallery = args.gallery_cache / f"gallery-{args.gallery}-{args.size}px"
    if (gallery / "index.json").is_file():
        print(f"gallery of {args.gallery} reused from {gallery}", flush=True)
    else:
        subprocess.run([sys.executable, "-c", script, str(args.gallery), str(gallery), info], check=True)
        print(f"gallery of {args.gallery} built in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.build_only:
        return

    wrk_script = work / "post.lua"
    wrk_script.write_text(WRK_SCRIPT.replace("CONTENT_TYPE", json.dumps(_content_type(args.form))))
    bodies = {
        "embed": _bodies(work / "embed", args.form, [([data], {}) for data in images]),
        "search": _bodies(work / "search", args.form, [([data], {"k": 5, "min_score": -1.0}) for data in images]),
        # Distinct small images, so that every add stores a new item.
        "add": _bodies(
            work / "add",
            args.form,
            [([png_bytes(10_000 + n, size=(96, 96))], {"labels": ["new"]}) for n in range(2000)],
        ),
    }
    rows: list[tuple[str, str, str, str, str]] = []
    for backend in args.backend.split(","):
        offline_rows, offline = _offline(bundle, paths, backend, args.seconds)
        rows += offline_rows
        rows += _serve(args, backend, offline, work, gallery, bodies, wrk_script)
    print(f"\nserver: shitu serve {args.server_args}; requests: {args.form}")
    print(
        "\n| measurement | throughput | / offline | latency p50 / p95 / p99 (ms) | CPU ms per image |"
        "\n|---|---:|---:|---:|---:|"
    )
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
