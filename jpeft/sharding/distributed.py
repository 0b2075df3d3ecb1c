"""Starting JAX's multi-controller runtime: one process per host, the same script on each."""

from __future__ import annotations

import os

import jax

# Read when `initialize` gets no arguments, beside JAX's own JAX_COORDINATOR_ADDRESS, so a
# launcher that is not one JAX detects (plain VMs, a GPU box per process) can start any jpeft run.
NUM_PROCESSES_VAR, PROCESS_ID_VAR = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`jax.distributed.initialize` with CPU collectives over gloo.

    Call it first, before anything touches a device. On a TPU pod (and on SLURM, Open MPI or
    Kubernetes clusters JAX detects) no argument is needed; elsewhere give the coordinator's
    `host:port`, the process count and this process's index, as arguments or as the environment
    variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Gloo lets processes
    on CPU run collectives (as the tests here do); accelerators use their own interconnect.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes if num_processes is not None else _env_int(NUM_PROCESSES_VAR),
        process_id=process_id if process_id is not None else _env_int(PROCESS_ID_VAR),
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
