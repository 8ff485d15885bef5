"""Many processes, one job: JAX's own distributed runtime, not a home-made scheduler.

``initialize`` calls :func:`jax.distributed.initialize` before anything touches a device. It takes the
coordinator, process count and process id explicitly (``--coordinator host:port --num-processes N
--process-id I``), from ``SHITU_COORDINATOR`` / ``SHITU_NUM_PROCESSES`` / ``SHITU_PROCESS_ID``, or leaves them
to JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU; ``JAX_COORDINATOR_ADDRESS``). On the CPU
the cross-process collectives are Gloo's (JAX's default), so the same code runs on a laptop, a GPU node or a
cluster. After it, ``jax.devices()`` lists every process's devices and one global mesh spans them all.

Only process 0 writes logs and result files (:func:`is_primary`); Orbax checkpoints are saved by every
process, as Orbax requires.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from shitu.errors import ShituError

#: Environment variables of the schedulers JAX detects by itself, by scheduler name.
_CLUSTER_MARKERS: dict[str, tuple[str, ...]] = {
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "openmpi": ("OMPI_MCA_orte_hnp_uri",),
    "kubernetes": ("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX"),
    "cloud-tpu": ("TPU_WORKER_HOSTNAMES",),
}

_state: dict[str, Any] = {"initialized": False, "info": None}


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    platform: str
    source: str  # "single", "explicit", "environment" or a scheduler name

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def detect_cluster() -> str | None:
    """The scheduler this process was started by, when JAX can read its environment (else None).

    A SLURM allocation with a single task is not a distributed job.
    """
    for name, markers in _CLUSTER_MARKERS.items():
        if all(marker in os.environ for marker in markers):
            if name == "slurm" and os.environ.get("SLURM_NTASKS", "1") == "1":
                continue
            return name
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "environment"
    return None


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ShituError(f"environment variable {name}={value!r} is not an integer") from None


def validate_coordinator(address: str) -> str:
    """``host:port`` with a port in 1..65535, or a ShituError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ShituError(f"coordinator must be host:port (e.g. 10.0.0.1:1234), got {address!r}")
    return address


def initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    distributed: bool = False,
    timeout_s: int = 300,
) -> ProcessInfo:
    """Join the distributed job this process belongs to, or run alone; idempotent within a process.

    With nothing given and no scheduler detected, the process runs alone (no runtime is started).
    ``distributed=True`` insists: it is an error when there is nothing to join.
    """
    if _state["initialized"]:
        return _state["info"]
    coordinator = coordinator or os.environ.get("SHITU_COORDINATOR")
    if num_processes is None:
        num_processes = _int_env("SHITU_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_env("SHITU_PROCESS_ID")
    explicit = [coordinator, num_processes, process_id]
    cluster = detect_cluster()
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ShituError("a distributed run needs --coordinator, --num-processes and --process-id together")
        validate_coordinator(str(coordinator))
        assert num_processes is not None and process_id is not None
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ShituError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
        source = "explicit"
    elif cluster is not None:
        source = cluster
    elif distributed:
        raise ShituError(
            "--distributed was given but no cluster environment was found (SLURM, Open MPI, Kubernetes, "
            "JAX_COORDINATOR_ADDRESS)",
            hint="pass --coordinator host:port --num-processes N --process-id I",
        )
    else:
        source = "single"

    import jax

    if source != "single" and not (source == "explicit" and num_processes == 1):
        try:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=num_processes,
                process_id=process_id,
                initialization_timeout=timeout_s,
            )
        except (RuntimeError, ValueError) as exc:
            message = " ".join(str(exc).split())[:300]
            raise ShituError(f"cannot join the distributed job ({source}): {message}") from None
    info = ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        platform=jax.devices()[0].platform,
        source=source,
    )
    _state.update(initialized=True, info=info)
    return info


def is_primary() -> bool:
    """True in the process that writes logs and result files (process 0, or a lone process)."""
    info = _state["info"]
    return info is None or info.process_index == 0


def process_info() -> ProcessInfo | None:
    """What :func:`initialize` found, or None before it ran."""
    return _state["info"]


def global_mesh(axis: str = "data") -> Any:
    """A one-axis mesh over every device of every process (data parallelism)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()), (axis,))


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op for a lone process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
