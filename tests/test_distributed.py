"""The distributed entry point: what it detects and refuses, without starting a runtime."""

from __future__ import annotations

import pytest

from shitu import distributed
from shitu.errors import ShituError

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
