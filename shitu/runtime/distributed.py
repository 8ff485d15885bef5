"""Many processes, one job: JAX's own distributed runtime, not a home-made scheduler.

``initialize`` calls :func:`jax.distributed.initialize` before anything touches a device. It takes the
coordinator, process count and process id explicitly (``--coordinator host:port --num-processes N
--process-id I``), from ``SHITU_COORDINATOR`` / ``SHITU_NUM_PROCESSES`` / ``SHITU_PROCESS_ID``, or leaves them
to JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU; ``JAX_COORDINATOR_ADDRESS``). On the CPU
the cross-process collectives are Gloo's (JAX's default), so the same code runs on a laptop, a GPU node or a
cluster. After it, ``jax.devices()`` lists every process's devices and one global mesh spans them all.

Only process 0 writes logs and result files (:func:`is_primary`); Orbax checkpoints are saved by every
process, as Orbax requires. Decisions that read the disk (is the output folder free? is the run complete?) are
taken by process 0 and handed to the others (:func:`run_on_primary`, :func:`broadcast_json`), so the
processes never disagree because one of them looked a moment later. :func:`embed_sharded` splits an embedding
job over the processes (contiguous shards) and gathers the features in every process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from shitu.errors import ShituError

#: Environment variables of the schedulers JAX detects by itself, by scheduler name.
_CLUSTER_MARKERS: dict[str, tuple[str, ...]] = {
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "openmpi": ("OMPI_MCA_orte_hnp_uri",),
    "kubernetes": ("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX"),
    "cloud-tpu": ("TPU_WORKER_HOSTNAMES",),
}

#: The variables that set the job explicitly (as --coordinator, --num-processes, --process-id).
ENVIRONMENT_VARIABLES = ("SHITU_COORDINATOR", "SHITU_NUM_PROCESSES", "SHITU_PROCESS_ID")

_state: dict[str, Any] = {"initialized": False, "info": None}

T = TypeVar("T")


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
        if jax.process_count() > 1:
            # The first collective connects the processes; Gloo (the CPU collectives) then prints a line on
            # the C-level stdout, which belongs to --json: connect now, with that stdout sent to stderr.
            with _stdout_to_stderr():
                sync("shitu:initialize")
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


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr inside (what native libraries print there too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def is_primary() -> bool:
    """True in the process that writes logs and result files (process 0, or a lone process).

    Before :func:`initialize` ran, JAX is asked when it is already loaded (a caller that started the runtime
    with ``jax.distributed.initialize`` itself); otherwise the process is alone."""
    return process_index() == 0


def process_index() -> int:
    """This process's index in the job (0 for a lone process)."""
    info = _state["info"]
    if info is not None:
        return info.process_index
    if "jax" not in sys.modules:
        return 0
    import jax

    return jax.process_index()


def process_count() -> int:
    """How many processes the job has (1 for a lone process)."""
    info = _state["info"]
    if info is not None:
        return info.process_count
    if "jax" not in sys.modules:
        return 1
    import jax

    return jax.process_count()


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


# ----------------------------------------------------------------------------------------------- devices


def local_device(devices: Sequence[Any]) -> Any:
    """The first of ``devices`` this process can address (in a lone process: the first)."""
    import jax

    here = jax.process_index()
    for device in devices:
        if device.process_index == here:
            return device
    raise ShituError(f"none of the {len(devices)} selected devices belongs to process {here}")


def local_copy(tree: Any, device: Any) -> Any:
    """``tree``'s arrays on ``device`` (one of this process's). A replicated array that spans other processes'
    devices is read from this process's own copy (``addressable_data(0)``), never fetched across hosts."""
    import jax

    def copy(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ShituError("cannot take a local copy of an array sharded over several processes")
            leaf = leaf.addressable_data(0)
        return jax.device_put(leaf, device)

    return jax.tree.map(copy, tree)


# ----------------------------------------------------------------------------------------------- agreement

_BROADCAST_BYTES = 1 << 16


def broadcast_json(value: Any, *, size: int = _BROADCAST_BYTES) -> Any:
    """Process 0's ``value`` (anything JSON can carry, at most ``size`` bytes encoded) in every process; a
    lone process gets its own value back without any collective."""
    if process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    buffer = np.zeros((size,), np.uint8)
    if process_index() == 0:
        encoded = json.dumps(value).encode()
        if len(encoded) > size:
            raise ShituError(f"broadcast_json: {len(encoded)} bytes do not fit in {size}")
        buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(received.tobytes().rstrip(b"\0").decode())


def run_on_primary(function: Callable[[], T], *, what: str = "the primary process's check") -> T | None:
    """Call ``function`` in process 0 only and tell every process how it went: its ShituError is raised in
    every process (same message, file and hint), so no process waits for a partner that gave up. Returns
    ``function()``'s result in process 0 and None elsewhere (a lone process simply calls it)."""
    if process_count() == 1:
        return function()
    result: T | None = None
    outcome: dict[str, Any] = {"ok": True}
    if process_index() == 0:
        try:
            result = function()
        except ShituError as exc:
            outcome = {"ok": False, "message": exc.message, "path": exc.path, "line": exc.line, "hint": exc.hint}
            broadcast_json(outcome)
            raise
        except BaseException:
            broadcast_json({"ok": False, "message": f"process 0 failed in {what}"})
            raise
    outcome = broadcast_json(outcome)
    if not outcome["ok"] and process_index() != 0:
        raise ShituError(
            outcome["message"], path=outcome.get("path"), line=outcome.get("line"), hint=outcome.get("hint")
        )
    return result


def any_process(flag: bool) -> bool:
    """True in every process when ``flag`` is true in any (e.g. one of them was asked to stop)."""
    if process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def allgather_json(value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-able), in process order."""
    if process_count() == 1:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(encoded)))).reshape(-1)
    buffer = np.zeros((int(lengths.max()),), np.uint8)
    buffer[: len(encoded)] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths, strict=True)]


def allgather_rows(rows: Any) -> Any:
    """The rows ([n_i, ...] arrays, n_i may differ) of every process concatenated in process order."""
    import numpy as np

    rows = np.asarray(rows)
    if process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.int32(rows.shape[0]))).reshape(-1)
    padded = np.zeros((max(int(counts.max()), 1), *rows.shape[1:]), rows.dtype)
    padded[: rows.shape[0]] = rows
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([gathered[i, : int(n)] for i, n in enumerate(counts)])


# ----------------------------------------------------------------------------------------------- sharded work


def shard_range(total: int, index: int | None = None, count: int | None = None) -> range:
    """The contiguous block of ``range(total)`` process ``index`` of ``count`` handles (default: this one);
    blocks differ in size by at most one and, in process order, cover everything once."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    return range(total * index // count, total * (index + 1) // count)


def embed_sharded(
    recognizer: Any, sources: Sequence[Any], *, batch_size: int = 32, progress: Callable[[int], None] | None = None
) -> Any:
    """``recognizer.embed(sources)`` with the work split over the processes: each embeds its contiguous shard
    (:func:`shard_range`), then every process gets the whole :class:`~shitu.embed.recognizer.Embedded` (features in
    input order, positions and failures counted in ``sources``). ``progress`` counts this process's images.
    A lone process just calls ``recognizer.embed``."""
    import numpy as np

    from shitu.embed.recognizer import Embedded, EmbedFailure

    if process_count() == 1:
        return recognizer.embed(sources, batch_size=batch_size, progress=progress)
    sources = list(sources)
    shard = shard_range(len(sources))
    local = recognizer.embed(sources[shard.start : shard.stop], batch_size=batch_size, progress=progress)
    features = np.asarray(local.features, np.float32)
    if not local.indices:  # an empty shard (fewer images than processes) or no readable image
        features = np.zeros((0, int(recognizer.embedding_size)), np.float32)
    parts = allgather_json(
        {
            "indices": [shard.start + int(i) for i in local.indices],
            "failures": [[shard.start + int(f.index), f.message] for f in local.failures],
        }
    )
    gathered = allgather_rows(features)
    indices = [i for part in parts for i in part["indices"]]
    failures = [EmbedFailure(index=i, source=sources[i], message=m) for part in parts for i, m in part["failures"]]
    return Embedded(features=gathered.astype(np.float32, copy=False), indices=indices, failures=failures)
