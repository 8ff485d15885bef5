#!/usr/bin/env python3
"""Image validation throughput of ``shitu check`` on the ~3,000 real grocery JPEGs, side by side.

Measured in one run: ``--repeats`` rounds (default 3), each round running every case once (in
table order: d, a, b, c), so drift hits all cases alike; the median of the rounds is reported:

(a) ``shitu.data.images.inspect_images`` with workers=1, workers=2 and the default (0 = auto);
(b) the full ``shitu.data.check.check_dataset(DIR, output=None)`` (lists + decode + cross-split checks);
(c) the full ``shitu check DIR --output TMP`` command, wall time of the subprocess (start-up, imports,
    decode, demo pictures, histogram, JSON);
(d) a plain serial reference loop ``PIL.Image.open(p).load()``.

Images/s always divides the number of distinct listed images by the median wall time. The page cache
is warmed first (every file of the dataset read once), so these are decode-bound, warm-cache numbers.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_check.py                 # builds benchmarks/.work/grocery3k if absent
    .venv/bin/python benchmarks/bench_check.py --dataset DIR

The markdown table goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _machine import cpu_model

HERE = Path(__file__).resolve().parent
DEFAULT_DATASET = HERE / ".work" / "grocery3k"
SPLITS = ("train", "gallery", "query")


@dataclass
class Measurement:
    name: str
    detail: str
    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_line() -> str:
    """CPU model, cores, Python, Pillow and whether Pillow's JPEG decoder is libjpeg-turbo."""
    import PIL
    from PIL import features

    model = cpu_model("unknown CPU")
    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    cores = f"{usable} usable cores" + (f" of {logical}" if usable != logical else "")
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores += f", cgroup quota {quota:g} CPUs"
    turbo = features.check_feature("libjpeg_turbo")
    jpeg = f"libjpeg-turbo {features.version_feature('libjpeg_turbo')}" if turbo else "no libjpeg-turbo"
    return (
        f"{model}, {cores}, Python {platform.python_version()}, Pillow {PIL.__version__} ({jpeg}), "
        f"{platform.system()} {platform.release()}"
    )


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def listed_images(root: Path) -> list[Path]:
    """The distinct images the three lists name, in list order (what check decodes)."""
    seen: dict[str, None] = {}
    for split in SPLITS:
        for line in (root / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                seen.setdefault(line.rpartition(" ")[0], None)
    return [root / relative for relative in seen]


def warm_page_cache(root: Path) -> tuple[int, int]:
    """Read every file under ``root`` once; returns (files, bytes)."""
    files = total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                while chunk := handle.read(1 << 20):
                    total += len(chunk)
            files += 1
    return files, total


def _system_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(children: bool = False) -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_round_robin(cases: list[tuple[str, str, Callable[[], None], bool]], repeats: int) -> list[Measurement]:
    """Run every case once per round, ``repeats`` rounds, so drift (CPU clocks, other load) hits all alike.

    A case is ``(name, detail, run, children)``; ``children`` counts the CPU time of subprocesses.
    """
    results = [Measurement(name, detail, [], []) for name, detail, _, _ in cases]
    for attempt in range(1, repeats + 1):
        for (name, detail, run, children), result in zip(cases, results, strict=True):
            cpu_before = _cpu_seconds(children)
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            result.cpu.append(_cpu_seconds(children) - cpu_before)
            result.wall.append(elapsed)
            log(f"  round {attempt}/{repeats}: {name}, {detail}: {elapsed:.3f} s")
    return results


def shitu_command() -> list[str]:
    """The ``shitu`` console script of this interpreter's environment (else ``python -m shitu``)."""
    script = Path(sys.executable).parent / "shitu"
    if script.is_file():
        return [str(script)]
    found = shutil.which("shitu")
    return [found] if found else [sys.executable, "-m", "shitu"]


def ensure_dataset(dataset: Path | None) -> Path:
    if dataset is not None:
        if not dataset.is_dir():
            raise SystemExit(f"error: {dataset}: no such dataset folder")
        return dataset
    if not (DEFAULT_DATASET / "train.txt").is_file():
        sys.path.insert(0, str(HERE))
        from make_grocery_dataset import DEFAULT_SOURCE, build

        log(f"building {DEFAULT_DATASET} (first run) ...")
        counts = build(DEFAULT_SOURCE, DEFAULT_DATASET)
        log(f"  {sum(counts.values())} images")
    return DEFAULT_DATASET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", type=Path, default=None, help=f"ShiTuRecDataset folder (default: build {DEFAULT_DATASET})"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from PIL import Image

    from shitu.data.check import check_dataset
    from shitu.data.images import inspect_images

    dataset = ensure_dataset(args.dataset)
    paths = listed_images(dataset)
    count = len(paths)
    default_workers = min(32, (os.cpu_count() or 1) + 1)  # what inspect_images uses for workers=0
    log(f"dataset {dataset}: {count} distinct listed images")

    load_before = os.getloadavg()
    busy_before, ours_before, wall_before = _system_busy_seconds(), _cpu_seconds() + _cpu_seconds(True), time.time()
    files, size = warm_page_cache(dataset)
    log(f"page cache warmed: read {files} files, {size / 1e6:.1f} MB once before measuring")

    def reference() -> None:
        for p in paths:
            Image.open(p).load()

    def inspect(workers: int) -> Callable[[], None]:
        def run() -> None:
            reports = inspect_images(paths, workers=workers)
            bad = [r for r in reports if not r.ok]
            if bad:
                raise SystemExit(f"error: {len(bad)} images failed to decode, e.g. {bad[0].path}: {bad[0].error}")

        return run

    def library_check() -> None:
        result = check_dataset(dataset, output=None)
        if not result.check_pass or len(result.images) != count:
            raise SystemExit(f"error: check_dataset failed or decoded {len(result.images)} of {count}")

    command = [*shitu_command(), "check", str(dataset), "--output"]

    def cli_check() -> None:
        with tempfile.TemporaryDirectory(prefix="bench_check_") as out:
            done = subprocess.run([*command, out], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"error: shitu check exited {done.returncode}:\n{done.stderr[-2000:]}")

    log(f"measuring: {args.repeats} rounds, each running every case once (wall clock, perf_counter) ...")
    cases = [
        ("(d) serial reference", "`PIL.Image.open(p).load()` loop, 1 thread", reference, False),
        ("(a) inspect_images", "workers=1", inspect(1), False),
        ("(a) inspect_images", "workers=2", inspect(2), False),
        ("(a) inspect_images", f"workers=0 (default: {default_workers} threads)", inspect(0), False),
        ("(b) check_dataset", "`output=None`, default workers", library_check, False),
        ("(c) `shitu check` command", "subprocess wall time, `--output` to a fresh temp folder", cli_check, True),
    ]
    results = measure_round_robin(cases, args.repeats)

    load_after = os.getloadavg()
    busy_after, ours_after, wall_after = _system_busy_seconds(), _cpu_seconds() + _cpu_seconds(True), time.time()
    others = None
    if busy_before is not None and busy_after is not None:
        others = (busy_after - busy_before) - (ours_after - ours_before)
    reference_median = results[0].median
    print(f"Machine: {machine_line()}  ")
    print(
        f"Dataset: `{dataset}` — {count} distinct listed JPEGs; page cache warmed (every file read once) "
        f"before measuring; {args.repeats} rounds, each running every row once in table order; median reported; "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.  "
    )
    print(
        f"Load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {'/'.join(f'{x:.2f}' for x in load_after)} (the benchmark itself adds up to ~2 while it runs; "
        "more means other work shared the cores)."
        + (
            ""
            if others is None
            else f" Other processes used {max(others, 0.0):.1f} CPU s of the {wall_after - wall_before:.0f} s run."
        )
    )
    print()
    print("| measurement | setting | median s | runs (s) | CPU s (median) | images/s | vs serial reference |")
    print("|---|---|---:|---|---:|---:|---:|")
    for m in results:
        runs = ", ".join(f"{w:.2f}" for w in m.wall)
        print(
            f"| {m.name} | {m.detail} | {m.median:.3f} | {runs} | {m.cpu_median:.2f} | "
            f"{count / m.median:,.0f} | {reference_median / m.median:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
