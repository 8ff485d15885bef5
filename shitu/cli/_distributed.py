"""The options that make a command one process of a distributed job, defined once (train, eval, index build).

``join`` must run before anything touches a device: it calls :func:`shitu.runtime.distributed.initialize`. Processes
other than process 0 then get an :class:`Output` that prints nothing (their results are process 0's); their
errors still reach stderr through the CLI's error line.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from shitu.cli._output import Output

DistributedOption = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Join a multi-process job found in the environment (SLURM, Open MPI, Kubernetes, "
        "JAX_COORDINATOR_ADDRESS); an error if there is none.",
        rich_help_panel="Distributed",
    ),
]
CoordinatorOption = Annotated[
    str | None,
    typer.Option(
        "--coordinator",
        metavar="HOST:PORT",
        help="Address of process 0's coordinator (or SHITU_COORDINATOR).",
        rich_help_panel="Distributed",
    ),
]
NumProcessesOption = Annotated[
    int | None,
    typer.Option(
        "--num-processes", min=1, help="Processes in the job (or SHITU_NUM_PROCESSES).", rich_help_panel="Distributed"
    ),
]
ProcessIdOption = Annotated[
    int | None,
    typer.Option(
        "--process-id", min=0, help="This process's index, 0..N-1 (or SHITU_PROCESS_ID).", rich_help_panel="Distributed"
    ),
]


class _SecondaryOutput(Output):
    """The output of a process other than process 0: nothing on stdout, nothing on stderr but errors."""

    def __init__(self, json_mode: bool = False) -> None:
        super().__init__(json_mode)
        self.console.quiet = True

    def emit(self, document: Any) -> None:
        return None


def join(
    json_mode: bool,
    *,
    distributed: bool = False,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[Output, bool]:
    """Join the job (or run alone) and return the command's Output and whether this is process 0.

    With no option, no ``SHITU_*`` variable and no scheduler around, nothing is started (JAX is not even
    imported): a single-process command behaves exactly as without these options."""
    from shitu.runtime.distributed import ENVIRONMENT_VARIABLES, detect_cluster, initialize

    given = distributed or coordinator is not None or num_processes is not None or process_id is not None
    if not given and not any(os.environ.get(name) for name in ENVIRONMENT_VARIABLES) and detect_cluster() is None:
        return Output(json_mode), True
    info = initialize(
        coordinator=coordinator, num_processes=num_processes, process_id=process_id, distributed=distributed
    )
    primary = info.process_index == 0
    return (Output(json_mode) if primary else _SecondaryOutput(json_mode)), primary
