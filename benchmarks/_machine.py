"""What every benchmark prints about the machine (the CPU model and its instruction-set flags), and the
process's peak memory. Standard library only: the Paddle-side scripts import it from their own interpreter."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of /proc/cpuinfo (None where there is no such file or line)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model(fallback: str = "unknown") -> str:
    """The CPU's model name, else what ``platform.processor()`` says, else ``fallback``."""
    return _cpuinfo_field("model name") or platform.processor() or fallback


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, avx512f, ...); empty where /proc/cpuinfo is missing."""
    return set((_cpuinfo_field("flags") or "").split())


def peak_rss_mb() -> float:
    """This process's peak resident size in MiB. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over from
    the parent through fork and exec, so every child would report at least the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_line() -> str:
    """``CPU: <model>, <n> cores; flags: <the avx*, amx*, fma flags>``: the line a benchmark prints first."""
    import os

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    return f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; flags: {' '.join(flags)}"


def random_bundle(path: Path, model: str = "PP-ShiTuV2_rec") -> Path:
    """A shitu bundle of ``model`` with random weights (seed 0) at ``path``, made once and kept (shitu must be
    importable: not for the Paddle-side scripts)."""
    if not path.is_dir():
        from shitu.models.bundle import save_bundle
        from shitu.plugins import get_host

        spec = get_host().model(model)
        save_bundle(path, spec=spec, model=spec.build(1, seed=0), num_classes=1)
    return path
