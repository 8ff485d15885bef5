"""The distributed entry point: what it detects and refuses, without starting a runtime."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shitu.errors import ShituError
from shitu.runtime import distributed

_SCHEDULER_VARS = [
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX", "TPU_WORKER_HOSTNAMES",
    "JAX_COORDINATOR_ADDRESS", "SHITU_COORDINATOR", "SHITU_NUM_PROCESSES", "SHITU_PROCESS_ID",
]  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    for name in _SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_state", {"initialized": False, "info": None})
    return monkeypatch


def test_no_scheduler_means_a_single_process(clean_env):
    assert distributed.detect_cluster() is None
    info = distributed.initialize()
    assert (info.process_index, info.process_count, info.source) == (0, 1, "single")
    assert distributed.is_primary()
    assert distributed.initialize() is info  # idempotent


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
          "SLURM_LOCALID": "0"}, "slurm"),
        ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
          "SLURM_LOCALID": "0"}, None),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234"}, "openmpi"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "environment"),
    ],
)  # fmt: skip
def test_scheduler_detection(clean_env, variables, expected):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    assert distributed.detect_cluster() == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coordinator": "localhost:1234"}, "together"),
        ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, "host:port"),
        ({"coordinator": "localhost:99999", "num_processes": 2, "process_id": 0}, "host:port"),
        ({"coordinator": "localhost:1234", "num_processes": 2, "process_id": 2}, "0..1"),
        ({"distributed": True}, "no cluster environment"),
    ],
)
def test_bad_settings_are_one_clear_error(clean_env, kwargs, message):
    with pytest.raises(ShituError, match=message):
        distributed.initialize(**kwargs)


def test_environment_variables_are_read_and_checked(clean_env):
    clean_env.setenv("SHITU_NUM_PROCESSES", "two")
    with pytest.raises(ShituError, match="SHITU_NUM_PROCESSES"):
        distributed.initialize()


def test_one_explicit_process_needs_no_runtime(clean_env):
    info = distributed.initialize(coordinator="127.0.0.1:1", num_processes=1, process_id=0)
    assert (info.process_count, info.source) == (1, "explicit")


# ------------------------------------------------------------------------------------------ lone-process helpers


def test_shards_are_contiguous_cover_everything_once_and_differ_by_at_most_one():
    for total in (0, 1, 5, 16, 17):
        for count in (1, 2, 3, 4):
            shards = [distributed.shard_range(total, index, count) for index in range(count)]
            assert [i for shard in shards for i in shard] == list(range(total))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_lone_process_needs_no_collective(clean_env):
    distributed.initialize()
    assert distributed.broadcast_json({"a": [1]}) == {"a": [1]}
    assert distributed.allgather_json(3) == [3]
    assert distributed.any_process(True) and not distributed.any_process(False)
    assert distributed.run_on_primary(lambda: 7) == 7
    with pytest.raises(ShituError, match="refused"):
        distributed.run_on_primary(lambda: (_ for _ in ()).throw(ShituError("refused")))


def test_local_copy_takes_this_process_copy_of_replicated_arrays(clean_env):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    distributed.initialize()
    device = distributed.local_device(jax.devices())
    replicated = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())
    tree = {"w": jax.device_put(np.arange(3.0), replicated)}
    copied = distributed.local_copy(tree, device)
    assert copied["w"].devices() == {device}
    np.testing.assert_array_equal(np.asarray(copied["w"]), [0.0, 1.0, 2.0])


class _FakeRecognizer:
    """Embeds a path as [position in the alphabet of its first letter, 1]; "bad*" cannot be read."""

    embedding_size = 2

    def embed(self, sources, *, batch_size=32, progress=None):
        from shitu.embed.recognizer import Embedded, EmbedFailure

        good = [i for i, s in enumerate(sources) if not s.startswith("bad")]
        rows = np.array([[ord(sources[i][0]) - 96, 1.0] for i in good], np.float32).reshape(-1, 2)
        failed = [
            EmbedFailure(index=i, source=s, message=f"cannot read {s}") for i, s in enumerate(sources) if i not in good
        ]
        if progress is not None:
            progress(len(sources))
        return Embedded(features=rows, indices=good, failures=failed)


def test_sharded_embedding_reassembles_the_whole_input_in_order(monkeypatch):
    """Two processes simulated by two threads (the gathers exchange through a barrier): each embeds its
    shard, and both get what one process embedding everything gets."""
    sources = ["a", "bad1", "c", "d", "bad2", "f", "g"]
    recognizer = _FakeRecognizer()
    here = threading.local()
    barrier = threading.Barrier(2, timeout=30)
    slots: dict[tuple[int, int], object] = {}

    def exchange(value):
        slots[here.calls, here.index] = value
        barrier.wait()
        gathered = [slots[here.calls, index] for index in range(2)]
        barrier.wait()
        here.calls += 1
        return gathered

    monkeypatch.setattr(distributed, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "process_index", lambda: here.index)
    monkeypatch.setattr(distributed, "allgather_json", exchange)
    monkeypatch.setattr(distributed, "allgather_rows", lambda rows: np.concatenate(exchange(rows)))
    results: dict[int, object] = {}
    embedded: dict[int, int] = {}

    def process(index: int) -> None:
        here.index, here.calls = index, 0
        counted = []
        results[index] = distributed.embed_sharded(recognizer, sources, progress=counted.append)
        embedded[index] = sum(counted)

    threads = [threading.Thread(target=process, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    alone = recognizer.embed(sources)
    assert embedded == {0: 3, 1: 4}  # each process embedded only its contiguous shard
    for result in results.values():
        assert result.indices == alone.indices == [0, 2, 3, 5, 6]
        np.testing.assert_array_equal(result.features, alone.features)
        assert [(f.index, f.source, f.message) for f in result.failures] == [
            (f.index, f.source, f.message) for f in alone.failures
        ]


def test_cli_refuses_incomplete_distributed_flags(clean_env, cli):
    from shitu.data.demo import demo_dataset_path

    dataset = demo_dataset_path()
    done = cli(
        "eval", "--model", "PP-ShiTuV2_rec", "--random-weights", "--dataset", dataset, "--coordinator", "127.0.0.1:1234"
    )
    assert done.code != 0
    assert done.stderr.count("\n") == 1 and "together" in done.stderr
    done = cli("index", "build", "--model-dir", ".", "--gallery", ".", "--output", "x", "--distributed")
    assert done.code != 0 and "no cluster environment" in done.stderr
    done = cli("train", "--dataset", dataset, "--num-processes", "2", "--process-id", "5", "--coordinator", "h:1")
    assert done.code != 0 and "0..1" in done.stderr
