#!/usr/bin/env python3
"""Vector search for retrieval: usearch HNSW (what ``shitu.index`` uses) against faiss-cpu HNSW and flat.

The data: ``--n`` (default 1,000,000) unit vectors of 512 dimensions, clustered like embeddings of many
products: ``n / 100`` cluster centres (random unit vectors), each vector = its centre + a variation drawn
from a shared 32-dimensional subspace + a little isotropic noise, then L2-normalised. Queries are new draws
from the same process, so each has a well-defined nearest gallery vector in its own cluster (median gap
between the best and the second-best cosine ≈ 0.013), which makes recall meaningful. Ground truth is exact
cosine top-10 by numpy (blocked matrix products).

Measured:

1. usearch at ``--n`` (f32, cosine, ``--connectivity`` / ``--expansion-add``): build time; for every
   ``--ef`` value, batch-1,000 QPS (2 threads) and recall@1 / recall@10 against exact search; at the smallest
   ef reaching recall@1 ≥ ``--target``, batch-1 QPS (one query per call, one thread). Also usearch's own
   brute-force search (``exact=True``) and ``shitu.index``: save, open (with checksums), wrapper search.
2. faiss IndexFlatIP (exact) at ``--n``: add time and QPS at batch 1 and 1,000.
3. faiss IndexHNSWFlat (inner product on unit vectors = cosine) and usearch with the same M / efConstruction
   at ``--faiss-n`` (default 100,000: an HNSW build is slow on a shared 2-core machine): the same figures.

Usage (from the repository root; faiss is a benchmark-only dependency)::

    .venv/bin/pip install faiss-cpu
    .venv/bin/python benchmarks/bench_index.py [--n 1000000] [--faiss-n 100000] [--json OUT.json]

A markdown table goes to stdout; progress to stderr. CPU time is the process's user + system time, so
CPU s ÷ wall s shows how many cores the step actually got on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_flags, cpu_model

DIM = 512
RANK = 32
LATENT = 64
PER_CLUSTER = 100


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and the process CPU seconds it used."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def machine_line() -> str:
    model = cpu_model("unknown CPU")
    flags = cpu_flags()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import usearch

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = "not installed"
    return (
        f"{model}, {usable} usable cores, {simd}, {memory:.0f} GiB RAM, Python {platform.python_version()}, "
        f"numpy {np.__version__}, usearch {usearch.__version__}, faiss-cpu {faiss_version}, "
        f"{platform.system()} {platform.release()}"
    )


# -- data ---------------------------------------------------------------------------------------------------------


@dataclass
class Generator:
    centres: np.ndarray
    basis: np.ndarray

    @classmethod
    def make(cls, clusters: int, seed: int) -> Generator:
        rng = np.random.default_rng(seed)
        # Centres on a LATENT-dimensional subspace, so clusters have near and far neighbours as products do.
        # (Centres drawn uniformly in all 512 dimensions are all equally far from each other; HNSW's greedy
        # walk then has nothing to follow between clusters: recall@1 was 0.83 at ef=256 on 1M vectors.)
        mixing = rng.standard_normal((LATENT, DIM), dtype=np.float32)
        centres = rng.standard_normal((clusters, LATENT), dtype=np.float32) @ mixing
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        basis = rng.standard_normal((RANK, DIM), dtype=np.float32) / np.float32(np.sqrt(DIM))
        return cls(centres, basis)

    def sample(self, n: int, rng: np.random.Generator, block: int = 100_000) -> np.ndarray:
        out = np.empty((n, DIM), np.float32)
        for start in range(0, n, block):
            m = min(block, n - start)
            x = self.centres[rng.integers(0, len(self.centres), m)]
            x += np.float32(0.7 / np.sqrt(RANK)) * (rng.standard_normal((m, RANK), dtype=np.float32) @ self.basis)
            x += np.float32(0.02 / np.sqrt(DIM)) * rng.standard_normal((m, DIM), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = x
        return out


def exact_topk(gallery: np.ndarray, queries: np.ndarray, k: int, block: int = 131_072) -> np.ndarray:
    """Indices of the k largest inner products of each query, best first (blocked over the gallery)."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(gallery), block):
        scores = queries @ gallery[start : start + block].T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else np.argsort(-scores, axis=1)
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        merged_ids = np.concatenate([best_ids, part + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return best_ids


def recalls(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """recall@1 (top hit is the exact nearest) and recall@10 (the exact nearest is among the 10 returned)."""
    r1 = float(np.mean(found[:, 0] == truth[:, 0]))
    r10 = float(np.mean([truth[i, 0] in found[i, :10] for i in range(len(truth))]))
    return r1, r10


# -- measurements -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    library: str
    index: str
    n: int
    params: str
    build_s: float | None = None
    build_cpu_s: float | None = None
    qps_batch1000: float | None = None
    qps_batch1: float | None = None
    recall1: float | None = None
    recall10: float | None = None
    note: str = ""


@dataclass
class Report:
    machine: str
    started: str
    args: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def batch1_qps(search_one: Callable[[np.ndarray], Any], queries: np.ndarray, seconds: float = 10.0) -> float:
    """Queries per second answering one query per call, over at most ``seconds`` (after one warm-up call)."""
    search_one(queries[0])
    done, start = 0, time.perf_counter()
    for query in queries:
        search_one(query)
        done += 1
        if time.perf_counter() - start > seconds:
            break
    return done / (time.perf_counter() - start)


def bench_usearch(
    report: Report,
    gallery: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    *,
    full: bool,
) -> Any:
    from usearch.index import Index

    n = len(gallery)
    index = Index(ndim=DIM, metric="cos", dtype="f32", connectivity=args.connectivity, expansion_add=args.expansion_add)
    log(f"usearch: building HNSW of {n:,} (M={args.connectivity}, ef_add={args.expansion_add})")
    _, build_s, build_cpu = timed(lambda: index.add(np.arange(n, dtype=np.uint64), gallery, threads=args.threads))
    log(f"usearch: built in {build_s:.1f} s ({n / build_s:,.0f} vectors/s, {build_cpu:.0f} CPU s)")
    chosen = None
    for ef in args.ef:
        index.expansion_search = ef
        matches, wall, _ = timed(lambda: index.search(queries, 10, threads=args.threads))
        r1, r10 = recalls(np.asarray(matches.keys, dtype=np.int64), truth)
        row = Row("usearch", "HNSW f32", n, f"M={args.connectivity}, ef_add={args.expansion_add}, ef={ef}")
        row.qps_batch1000, row.recall1, row.recall10 = len(queries) / wall, r1, r10
        if ef == args.ef[0]:
            row.build_s, row.build_cpu_s = build_s, build_cpu
        report.rows.append(row)
        log(f"usearch: ef={ef}: {row.qps_batch1000:,.0f} QPS at batch {len(queries)}, recall@1 {r1:.4f}, @10 {r10:.4f}")
        if chosen is None and r1 >= args.target:
            chosen = row
            row.qps_batch1 = batch1_qps(lambda q: index.search(q, 10, threads=1), queries)
            row.note = f"smallest ef with recall@1 ≥ {args.target}"
            log(f"usearch: ef={ef}: {row.qps_batch1:,.0f} QPS at batch 1")
    if chosen is not None:
        index.expansion_search = int(chosen.params.rsplit("ef=", 1)[1])
    if full:
        few = queries[: args.exact_queries]
        matches, wall, _ = timed(lambda: index.search(few, 10, exact=True, threads=args.threads))
        r1, r10 = recalls(np.asarray(matches.keys, dtype=np.int64), truth[: len(few)])
        row = Row("usearch", "brute force f32 (exact=True)", n, "", recall1=r1, recall10=r10)
        row.qps_batch1000 = len(few) / wall
        row.note = f"batch of {len(few)} queries"
        report.rows.append(row)
        log(f"usearch exact: {row.qps_batch1000:,.1f} QPS, recall@1 {r1:.4f}")
    return index


def bench_shitu_wrapper(report: Report, index: Any, gallery_n: int, queries: np.ndarray) -> None:
    """shitu.index on the usearch index just built: save (with checksums), open (verifying them), search."""
    from shitu.index.core import FORMAT, FORMAT_VERSION, Item, RetrievalIndex, open_index

    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dim": DIM,
        "dtype": "f32",
        "metric": "cos",
        "count": gallery_n,
        "next_key": gallery_n,
        "connectivity": int(index.connectivity),
        "expansion_add": int(index.expansion_add),
        "expansion_search": int(index.expansion_search),
        "recognizer": {"model": "synthetic", "embedding_size": DIM, "input_size": 0, "bundle": None},
    }
    items = {key: Item(key, key // PER_CLUSTER, f"images/{key}.jpg") for key in range(gallery_n)}
    wrapper = RetrievalIndex(index, items, info, None)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        folder = Path(tmp) / "index"
        _, save_s, _ = timed(lambda: wrapper.save(folder))
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**30
        log(f"shitu.index: saved {size:.2f} GiB in {save_s:.1f} s")
        reopened, open_s, _ = timed(lambda: open_index(folder))
        log(f"shitu.index: opened (checksums verified) in {open_s:.1f} s")
        _, wall, _ = timed(lambda: reopened.search(queries, 10))
        one_qps = batch1_qps(lambda q: reopened.search(q, 10), queries)
    report.extra["shitu_index"] = {
        "save_s": save_s,
        "open_s": open_s,
        "size_gib": size,
        "search_qps_batch1000": len(queries) / wall,
        "search_qps_batch1": one_qps,
    }
    log(f"shitu.index: search {len(queries) / wall:,.0f} QPS at batch {len(queries)}, {one_qps:,.0f} at batch 1")


def bench_faiss_flat(report: Report, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, threads: int) -> None:
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(DIM)
    _, add_s, add_cpu = timed(lambda: index.add(gallery))
    index.search(queries[:1], 10)  # warm-up
    (_, ids), wall, _ = timed(lambda: index.search(queries, 10))
    r1, r10 = recalls(ids, truth)
    faiss.omp_set_num_threads(1)
    qps1 = batch1_qps(lambda q: index.search(q[None, :], 10), queries, seconds=10.0)
    faiss.omp_set_num_threads(threads)
    row = Row("faiss-cpu", "IndexFlatIP (exact)", len(gallery), "", add_s, add_cpu, len(queries) / wall, qps1, r1, r10)
    report.rows.append(row)
    log(f"faiss flat: {row.qps_batch1000:,.1f} QPS batch, {qps1:,.1f} QPS batch 1, recall@1 {r1:.4f}")


def bench_faiss_hnsw(
    report: Report, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> None:
    import faiss

    faiss.omp_set_num_threads(args.threads or 2)
    n = len(gallery)
    index = faiss.IndexHNSWFlat(DIM, args.connectivity, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.expansion_add
    log(f"faiss: building HNSW of {n:,} (M={args.connectivity}, efConstruction={args.expansion_add})")
    _, build_s, build_cpu = timed(lambda: index.add(gallery))
    log(f"faiss: built in {build_s:.1f} s ({n / build_s:,.0f} vectors/s)")
    chosen = False
    for ef in args.ef:
        index.hnsw.efSearch = ef
        (_, ids), wall, _ = timed(lambda: index.search(queries, 10))
        r1, r10 = recalls(ids, truth)
        row = Row("faiss-cpu", "IndexHNSWFlat f32", n, f"M={args.connectivity}, efC={args.expansion_add}, ef={ef}")
        row.qps_batch1000, row.recall1, row.recall10 = len(queries) / wall, r1, r10
        if ef == args.ef[0]:
            row.build_s, row.build_cpu_s = build_s, build_cpu
        if not chosen and r1 >= args.target:
            chosen = True
            faiss.omp_set_num_threads(1)
            row.qps_batch1 = batch1_qps(lambda q: index.search(q[None, :], 10), queries)
            faiss.omp_set_num_threads(args.threads or 2)
            row.note = f"smallest ef with recall@1 ≥ {args.target}"
        report.rows.append(row)
        log(f"faiss: ef={ef}: {row.qps_batch1000:,.0f} QPS, recall@1 {r1:.4f}, @10 {r10:.4f}")


# -- output -------------------------------------------------------------------------------------------------------


def markdown(report: Report) -> str:
    def fmt(value: Any, digits: int = 0) -> str:
        if value is None:
            return "—"
        return f"{value:,.{digits}f}"

    lines = [
        f"- Machine: {report.machine}",
        f"- Started: {report.started}; arguments: {json.dumps(report.args)}",
        "",
        "| library | index | vectors | parameters | build s (CPU s) | QPS batch 1,000 | QPS batch 1 | recall@1 | "
        "recall@10 | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in report.rows:
        build = "—" if row.build_s is None else f"{row.build_s:,.1f} ({row.build_cpu_s:,.0f})"
        lines.append(
            f"| {row.library} | {row.index} | {row.n:,} | {row.params} | {build} | {fmt(row.qps_batch1000, 1)} | "
            f"{fmt(row.qps_batch1, 1)} | {fmt(row.recall1, 4)} | {fmt(row.recall10, 4)} | {row.note} |"
        )
    if "shitu_index" in report.extra:
        s = report.extra["shitu_index"]
        lines += [
            "",
            f"shitu.index on the {report.args['n']:,}-vector usearch index: save {s['save_s']:.1f} s "
            f"({s['size_gib']:.2f} GiB), open with checksum verification {s['open_s']:.1f} s, search "
            f"{s['search_qps_batch1000']:,.0f} QPS at batch 1,000 and {s['search_qps_batch1']:,.0f} at batch 1.",
        ]
    for key in ("load_before", "load_after", "data_s", "truth_s"):
        if key in report.extra:
            lines.append(f"- {key}: {report.extra[key]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery vectors for usearch and faiss flat")
    parser.add_argument("--faiss-n", type=int, default=100_000, help="gallery vectors for the HNSW comparison")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--connectivity", type=int, default=16, help="HNSW M")
    parser.add_argument("--expansion-add", type=int, default=64, help="HNSW efConstruction")
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="efSearch values")
    parser.add_argument("--target", type=float, default=0.99, help="recall@1 to reach")
    parser.add_argument("--threads", type=int, default=2, help="threads for builds and batch searches")
    parser.add_argument("--exact-queries", type=int, default=100, help="queries for usearch's brute force")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--skip-shitu", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    report = Report(
        machine=machine_line(),
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )
    report.extra["load_before"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(report.machine)

    generator = Generator.make(max(1, args.n // PER_CLUSTER), seed=0)
    rng = np.random.default_rng(1)
    gallery, report.extra["data_s"], _ = timed(lambda: generator.sample(args.n, rng))
    queries = generator.sample(args.queries, rng)
    log(f"data: {args.n:,} × {DIM} in {report.extra['data_s']:.1f} s")
    truth, report.extra["truth_s"], _ = timed(lambda: exact_topk(gallery, queries, 10))
    log(f"exact top-10 of {args.queries} queries by numpy in {report.extra['truth_s']:.1f} s")

    def flush() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")

    index = bench_usearch(report, gallery, queries, truth, args, full=True)
    flush()
    if not args.skip_shitu:
        bench_shitu_wrapper(report, index, args.n, queries)
        flush()
    del index
    if not args.skip_faiss:
        bench_faiss_flat(report, gallery, queries, truth, args.threads)
        flush()
        if args.faiss_n:
            small = np.ascontiguousarray(gallery[: args.faiss_n])
            small_truth = exact_topk(small, queries, 10)
            bench_usearch(report, small, queries, small_truth, args, full=False)
            bench_faiss_hnsw(report, small, queries, small_truth, args)
            flush()
    report.extra["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    flush()
    print(markdown(report))


if __name__ == "__main__":
    main()
