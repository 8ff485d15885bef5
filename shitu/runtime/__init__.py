"""Process-wide JAX settings: the persistent compilation cache and where shitu keeps its caches.

No XLA speed flags are set (here or on ``import shitu``): on jaxlib 0.10.2's CPU backend (2-core AVX-512
EPYC, PP-ShiTuV2_rec fp32 at 224 px, variants compiled side by side in one process) the default is the
fastest. Measured: YNNPACK fusion types cut to individual dots/convolutions or off (Eigen dots) 0-22% slower,
with its eltwise fusions but no reduce fusions 2.2x slower; ``xla_cpu_prefer_vector_width=512`` and
``xla_cpu_enable_fast_math`` no change; the XNNPACK and oneDNN fusion types produce no library calls in this
build. The speed comes from the model's inference form instead (:class:`shitu.models.inference.Embedder`).
"""

from __future__ import annotations

import os
from pathlib import Path

_configured = False


def cache_dir() -> Path:
    """shitu's cache folder: ``$SHITU_CACHE_DIR``, else ``$XDG_CACHE_HOME/shitu``, else ``~/.cache/shitu``."""
    explicit = os.environ.get("SHITU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shitu"


def configure_jax() -> None:
    """Turn on JAX's persistent compilation cache (once per process) so a second process skips most
    compile time. ``SHITU_NO_COMPILE_CACHE=1`` turns it off."""
    global _configured
    if _configured:
        return
    _configured = True
    if os.environ.get("SHITU_NO_COMPILE_CACHE"):
        return
    import jax

    directory = cache_dir() / "jax"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
