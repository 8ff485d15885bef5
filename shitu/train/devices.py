"""Which JAX devices a run trains on (``Global.device``)."""

from __future__ import annotations

from typing import Any

from shitu.errors import ShituError


def select_devices(device: str) -> list[Any]:
    """The JAX devices ``Global.device`` names: ``cpu``, ``gpu`` (every GPU), ``gpu:0,1`` (those local ones)."""
    import jax

    name, _, ids = str(device).strip().lower().partition(":")
    platform = {"gpu": "gpu", "cuda": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(name)
    if platform is None:
        raise ShituError(f"Global.device must be cpu, gpu or gpu:0,1,..., got {device!r}")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise ShituError(
            f"Global.device={device!r}: JAX has no {platform.upper()} backend here",
            hint="use -o Global.device=cpu, or install jax with GPU support",
        ) from None
    if ids:
        if jax.process_count() > 1:
            raise ShituError("Global.device may not list device ids in a multi-process run")
        try:
            wanted = [int(part) for part in ids.split(",") if part.strip()]
        except ValueError:
            raise ShituError(f"Global.device: device ids must be integers, got {device!r}") from None
        local = jax.local_devices(backend=platform)
        missing = [i for i in wanted if i >= len(local) or i < 0]
        if missing or not wanted:
            raise ShituError(f"Global.device={device!r}: this machine has {len(local)} {platform} device(s)")
        devices = [local[i] for i in wanted]
    return list(devices)
