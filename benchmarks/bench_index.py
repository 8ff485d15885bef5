#!/usr/bin/env python3
"""Vector search for retrieval: ``shitu.index``'s storage settings (usearch HNSW) against faiss-cpu HNSW.

The data: ``--n`` (default 1,000,000) unit vectors of 512 dimensions, clustered like embeddings of many
products: ``n / 100`` cluster centres (random unit vectors), each vector = its centre + a variation drawn
from a shared 32-dimensional subspace + a little isotropic noise, then L2-normalised. Queries are new draws
from the same process, so each has a well-defined nearest gallery vector in its own cluster (median gap
between the best and the second-best cosine ≈ 0.013), which makes recall meaningful. Ground truth is exact
cosine top-10 by numpy (blocked matrix products).

Measured, all on the same vectors in one run (``--n``, default 1,000,000):

1. faiss IndexHNSWFlat (inner product on unit vectors = cosine) with M and efConstruction as faiss users set
   them (``--faiss-m`` 32, ``--faiss-ef-construction`` 40, faiss's default), built on ``--threads`` threads.
2. ``shitu.index`` with each storage of ``--shitu`` (default ``auto`` and ``f32``; ``DTYPE[:rescore=N]
   [:ef_add=E][:m=M]``): built by ``build_index`` (usearch adds on every core), saved, dropped and opened again
   from disk (checksums verified; re-scoring vectors memory-mapped), searched through
   ``RetrievalIndex.search_arrays`` (keys and scores as arrays, like faiss's ``search``; the numbers include
   the query checks and the re-scoring). At the chosen ef two more rows show the same index through
   ``RetrievalIndex.search`` (``Hit`` lists: the wrapper's cost) and usearch's graph search alone (the
   candidates, neither re-scored nor checked: the floor).

Per setting: build wall s and CPU s (CPU ÷ wall = cores used), memory (faiss: resident growth during the
build; shitu: resident growth from opening the index to the end of the ef sweep, i.e. what a search process
holds, mapped float16 pages touched so far included) and the saved files' size; for every ``--ef`` up to the
smallest reaching recall@1 ≥ ``--target``: recall@1 / recall@10 against exact cosine top-10 (numpy, blocked) and
batch-1,000 QPS. At the chosen ef, batch-1,000 QPS (``--threads`` threads: faiss OpenMP, usearch's pool) and
batch-1 QPS (one query per call, one thread: faiss ``omp_set_num_threads(1)``, shitu searches a single query on
the calling thread) are measured again in ``--rounds`` interleaved rounds and the best round is kept, since the
machine is shared and its load changes from minute to minute. ``--flat`` adds faiss IndexFlatIP (exact).

Usage (from the repository root; faiss is a benchmark-only dependency)::

    .venv/bin/pip install faiss-cpu
    .venv/bin/python benchmarks/bench_index.py [--n 1000000] [--json OUT.json]

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


def rss_bytes() -> int:
    """The process's resident memory now (/proc/self/statm; 0 where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass
class Row:
    library: str
    index: str
    n: int
    params: str
    build_s: float | None = None
    build_cpu_s: float | None = None
    memory_gib: float | None = None
    files_gib: float | None = None
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


@dataclass
class Contender:
    """One index under test: how to search it at a given ef, and what its build cost."""

    library: str
    name: str
    params: str
    set_ef: Callable[[int], None]
    search: Callable[[np.ndarray, int], np.ndarray]  # queries [B, D], k -> ids [B, k]
    batch_threads: Callable[[int], None]  # threads for the next searches
    build_s: float
    build_cpu_s: float
    memory_gib: float
    files_gib: float | None = None
    note: str = ""
    ef: int | None = None
    rows: list[Row] = field(default_factory=list)
    n: int = 0
    rss_before: int | None = None  # shitu: resident bytes before opening the index (memory = growth after sweep)
    # Other ways to search the same index, measured at the chosen ef only: (row name, queries [B, D], k -> ids).
    variants: list[tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = field(default_factory=list)
    saved: Path | None = None  # shitu: the saved index folder


def faiss_contender(gallery: np.ndarray, args: argparse.Namespace) -> Contender:
    """faiss IndexHNSWFlat (inner product on unit vectors = cosine), M and efConstruction as faiss users set them
    (``--faiss-m`` 32, ``--faiss-ef-construction`` 40: faiss's default efConstruction)."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    n = len(gallery)
    before = rss_bytes()
    index = faiss.IndexHNSWFlat(DIM, args.faiss_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.faiss_ef_construction
    log(f"faiss: building HNSW of {n:,} (M={args.faiss_m}, efConstruction={args.faiss_ef_construction})")
    _, build_s, build_cpu = timed(lambda: index.add(gallery))
    memory = (rss_bytes() - before) / 2**30
    log(f"faiss: built in {build_s:.1f} s ({build_cpu:.0f} CPU s), resident +{memory:.2f} GiB")

    def set_ef(ef: int) -> None:
        index.hnsw.efSearch = ef

    return Contender(
        "faiss-cpu",
        "IndexHNSWFlat f32",
        f"M={args.faiss_m}, efC={args.faiss_ef_construction}",
        set_ef,
        lambda q, k: index.search(q, k)[1],
        faiss.omp_set_num_threads,
        build_s,
        build_cpu,
        memory,
        n=n,
    )


def shitu_contenders(
    gallery: np.ndarray, spec: str, args: argparse.Namespace, folder: Path, report: Report
) -> list[Contender]:
    """``shitu.index`` with the storage ``spec`` (``DTYPE[:rescore=N[/N2...]][:ef_add=E][:m=M]``, DTYPE auto,
    f32, f16, bf16 or i8): built in memory, saved, dropped, and opened again from disk (re-scoring vectors
    memory-mapped), as a service would; the memory is the resident growth from opening it and answering the ef
    sweep. Several re-scoring counts (``rescore=20/32/48``) share one build: the saved index is opened once per
    count (each after the previous one's sweep, so the memory of the later ones is what their opening added)."""
    dtype, *options = spec.split(":")
    settings = dict(option.split("=", 1) for option in options)
    counts = [int(r) for r in settings["rescore"].split("/")] if "rescore" in settings else [None]
    built_spec = ":".join(
        [dtype, *(f"{key}={value}" for key, value in settings.items() if key != "rescore")]
        + ([f"rescore={counts[0]}"] if counts[0] is not None else [])
    )
    first = shitu_contender(gallery, built_spec, args, folder, report)
    contenders = [first]
    for count in counts[1:]:
        contenders.append(_reopened(first, count, f"{dtype}:rescore={count}", args))
    return contenders


def _reopened(first: Contender, rescore: int, spec: str, args: argparse.Namespace) -> Contender:
    """The index ``first`` saved, opened again with ``rescore`` candidates re-scored per query (a search-time
    setting: the graph and the float16 vectors are the same; index.json's count is overridden in memory)."""
    from shitu.index import open_index

    assert first.saved is not None
    before = rss_bytes()
    index = open_index(first.saved)
    if not index.rescore:
        raise SystemExit(f"{spec}: re-scoring counts need a re-scored storage")
    index._info["rescore"] = rescore  # benchmark only: the same files searched with another candidate count
    contender = _searching(index, first.build_s, first.build_cpu_s, first.files_gib, first.params, "", first.n)
    contender.rss_before = before
    return contender


def _searching(
    index: Any, build_s: float, build_cpu_s: float, files: float | None, params: str, note: str, n: int
) -> Contender:
    """A contender searching the opened shitu ``index`` through ``search_arrays``, with the ``search`` (Hit
    lists) and graph-alone variants."""
    from shitu.index.core import _graph_rows

    contender = Contender(
        "shitu",
        f"{index.dtype}" + (f" + re-score {index.rescore} (f16)" if index.rescore else ""),
        params,
        lambda ef: setattr(index, "expansion_search", ef),
        lambda q, k: index.search_arrays(q, k)[0].astype(np.int64),
        lambda threads: None,  # usearch: threads=0, every core for a batch; one query runs on one thread
        build_s,
        build_cpu_s,
        0.0,
        files,
        note=note,
        n=n,
    )

    def hits(q: np.ndarray, k: int) -> np.ndarray:
        return np.asarray([[hit.key for hit in row] for row in index.search(q, k)], dtype=np.int64)

    def graph_alone(q: np.ndarray, k: int) -> np.ndarray:
        threads = 1 if len(q) == 1 else 0
        candidates = max(k, index.rescore)  # what the graph hands to re-scoring
        keys = np.atleast_2d(index._index.search(_graph_rows(q, index.dtype), candidates, threads=threads).keys)
        return keys[:, :k].astype(np.int64)

    contender.variants = [("via search() (Hit lists)", hits), ("usearch graph alone (no re-scoring)", graph_alone)]
    return contender


def shitu_contender(
    gallery: np.ndarray, spec: str, args: argparse.Namespace, folder: Path, report: Report
) -> Contender:
    """``shitu.index`` with the storage ``spec`` (``DTYPE[:rescore=N][:ef_add=E][:m=M]``): see
    :func:`shitu_contenders`."""
    import gc

    from shitu.index import build_index, open_index

    dtype, *options = spec.split(":")
    settings = dict(option.split("=", 1) for option in options)
    rescore = int(settings["rescore"]) if "rescore" in settings else None
    expansion_add = int(settings["ef_add"]) if "ef_add" in settings else None  # None: shitu's default
    connectivity = int(settings["m"]) if "m" in settings else args.connectivity  # None: shitu's default
    n = len(gallery)
    labels = (np.arange(n) // PER_CLUSTER).tolist()
    paths = [f"images/{i}.jpg" for i in range(n)]
    log(f"shitu {spec}: building {n:,} (M={connectivity or 'default'}, ef_add={expansion_add or 'default'})")
    built, build_s, build_cpu = timed(
        lambda: build_index(
            gallery,
            labels,
            paths,
            output=None,
            recognizer_info={"model": "synthetic", "embedding_size": DIM},
            dtype=dtype,
            rescore=rescore,
            connectivity=connectivity,
            expansion_add=expansion_add,
        )
    )
    storage = built.info["storage"]
    log(f"shitu {spec}: built in {build_s:.1f} s ({build_cpu:.0f} CPU s): {storage}")
    target = folder / spec.replace(":", "_").replace("=", "")
    started = time.perf_counter()
    built.save(target)
    save_s = time.perf_counter() - started
    files = sum(p.stat().st_size for p in target.iterdir()) / 2**30
    del built
    gc.collect()
    before = rss_bytes()
    index, open_s, _ = timed(lambda: open_index(target))
    log(f"shitu {spec}: saved {files:.2f} GiB in {save_s:.1f} s, opened (checksums verified) in {open_s:.1f} s")
    report.extra.setdefault("shitu_open_s", {})[spec] = round(open_s, 1)
    contender = _searching(
        index,
        build_s,
        build_cpu,
        files,
        f"M={index.info['connectivity']}, ef_add={index.info['expansion_add']}",
        f"--dtype {spec}" if dtype == "auto" else "",
        n,
    )
    contender.rss_before = before
    contender.saved = target
    return contender


def sweep(contender: Contender, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> None:
    """recall@1/@10 and batch-1,000 QPS for every ``--ef``; the smallest ef reaching ``--target`` is kept."""
    contender.batch_threads(args.threads)
    for ef in args.ef:
        contender.set_ef(ef)
        found, wall, _ = timed(lambda: contender.search(queries, 10))
        r1, r10 = recalls(found, truth)
        row = Row(contender.library, contender.name, contender.n, f"{contender.params}, ef={ef}")
        row.qps_batch1000, row.recall1, row.recall10 = len(queries) / wall, r1, r10
        contender.rows.append(row)
        log(f"{contender.library} {contender.name}: ef={ef}: {row.qps_batch1000:,.0f} QPS, recall@1 {r1:.4f}")
        if r1 >= args.target:
            contender.ef = ef
            row.note = f"smallest ef with recall@1 ≥ {args.target}"
            break
    if contender.rss_before is not None:  # resident growth from opening to after the sweep (pages mapped so far)
        contender.memory_gib = (rss_bytes() - contender.rss_before) / 2**30
    first = contender.rows[0]
    first.build_s, first.build_cpu_s = contender.build_s, contender.build_cpu_s
    first.memory_gib, first.files_gib = contender.memory_gib, contender.files_gib
    if contender.note:
        first.note = (first.note + "; " if first.note else "") + contender.note


def timed_rounds(
    contenders: list[Contender], queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace, report: Report
) -> None:
    """QPS at batch 1,000 (``--threads``) and batch 1 (one query per call, one thread) at each contender's
    chosen ef, in ``--rounds`` interleaved rounds (the machine is shared: load changes), best round kept.
    A contender's variants are measured the same way and get a row each, after its chosen row."""
    best: dict[tuple[int, int], tuple[float, float]] = {}
    recall: dict[tuple[int, int], tuple[float, float]] = {}
    for round_ in range(args.rounds):
        for i, contender in enumerate(contenders):
            if contender.ef is None:
                continue
            contender.set_ef(contender.ef)
            ways = [(contender.name, contender.search), *(contender.variants if args.variants else [])]
            for j, (name, search) in enumerate(ways):
                contender.batch_threads(args.threads)
                found, wall, _ = timed(lambda s=search: s(queries, 10))
                recall[i, j] = recalls(found, truth)
                contender.batch_threads(1)
                one = batch1_qps(lambda q, s=search: s(q[None, :], 10), queries, seconds=args.batch1_seconds)
                contender.batch_threads(args.threads)
                many = len(queries) / wall
                previous = best.get((i, j), (0.0, 0.0))
                best[i, j] = (max(previous[0], many), max(previous[1], one))
                label = f"{contender.library} {contender.name}" + (f" {name}" if j else "")
                log(f"round {round_ + 1}: {label}: {many:,.0f} QPS batch, {one:,.0f} batch 1")
    for (i, j), (many, one) in best.items():
        contender = contenders[i]
        chosen = contender.rows[-1]
        if j == 0:
            chosen.qps_batch1000, chosen.qps_batch1 = many, one
            continue
        name = f"{contender.name} {contender.variants[j - 1][0]}"
        row = Row(contender.library, name, contender.n, f"ef={contender.ef}")
        row.qps_batch1000, row.qps_batch1 = many, one
        row.recall1, row.recall10 = recall[i, j]
        place = next(p for p, r in enumerate(report.rows) if r is chosen)
        report.rows.insert(place + j, row)


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
    row = Row("faiss-cpu", "IndexFlatIP (exact)", len(gallery), "", add_s, add_cpu, None, None, len(queries) / wall)
    row.qps_batch1, row.recall1, row.recall10 = qps1, r1, r10
    report.rows.append(row)
    log(f"faiss flat: {row.qps_batch1000:,.1f} QPS batch, {qps1:,.1f} QPS batch 1, recall@1 {r1:.4f}")


# -- output -------------------------------------------------------------------------------------------------------


def markdown(report: Report) -> str:
    def fmt(value: Any, digits: int = 0) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    lines = [
        f"- Machine: {report.machine}",
        f"- Started: {report.started}; arguments: {json.dumps(report.args)}",
        "",
        "| library | index | vectors | parameters | build s (CPU s) | memory GiB | files GiB | QPS batch 1,000 | "
        "QPS batch 1 | recall@1 | recall@10 | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report.rows:
        build = "—" if row.build_s is None else f"{row.build_s:,.1f} ({row.build_cpu_s:,.0f})"
        lines.append(
            f"| {row.library} | {row.index} | {row.n:,} | {row.params} | {build} | {fmt(row.memory_gib, 2)} | "
            f"{fmt(row.files_gib, 2)} | {fmt(row.qps_batch1000, 0)} | {fmt(row.qps_batch1, 0)} | "
            f"{fmt(row.recall1, 4)} | {fmt(row.recall10, 4)} | {row.note} |"
        )
    for key, value in report.extra.items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery vectors")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--shitu", nargs="*", default=["auto", "f32"], help="shitu storages (see shitu_contender)")
    parser.add_argument("--connectivity", type=int, help="HNSW M of shitu's indexes (default: shitu's)")
    parser.add_argument("--faiss-m", type=int, default=32, help="faiss HNSW M")
    parser.add_argument("--faiss-ef-construction", type=int, default=40, help="faiss efConstruction")
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96, 128], help="efSearch values")
    parser.add_argument("--target", type=float, default=0.99, help="recall@1 to reach")
    parser.add_argument("--threads", type=int, default=2, help="threads for faiss builds and batch searches")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved QPS rounds (best kept)")
    parser.add_argument("--batch1-seconds", type=float, default=5.0)
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument(
        "--no-variants",
        dest="variants",
        action="store_false",
        help="time only search_arrays (not the Hit-list and graph-alone rows) at the chosen ef",
    )
    parser.add_argument("--flat", action="store_true", help="also faiss IndexFlatIP (exact search)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    report = Report(
        machine=machine_line(),
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )
    report.extra["cpu_flags"] = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c"))))
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
            args.json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")

    contenders: list[Contender] = []
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        if not args.skip_faiss:
            contenders.append(faiss_contender(gallery, args))
            sweep(contenders[-1], queries, truth, args)
            report.rows.extend(contenders[-1].rows)
            flush()
        for spec in args.shitu:
            for contender in shitu_contenders(gallery, spec, args, Path(tmp), report):
                contenders.append(contender)
                sweep(contender, queries, truth, args)
                report.rows.extend(contender.rows)
                flush()
        timed_rounds(contenders, queries, truth, args, report)
        flush()
        del contenders
    if args.flat:
        bench_faiss_flat(report, gallery, queries, truth, args.threads)
    report.extra["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    flush()
    print(markdown(report))


if __name__ == "__main__":
    main()
