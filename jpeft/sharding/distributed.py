"""Starting JAX's multi-controller runtime: one process per host, the same script on each."""

from __future__ import annotations

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`jax.distributed.initialize` with CPU collectives over gloo.

    Call it first, before anything touches a device. On a TPU pod (and on SLURM, Open MPI or
    Kubernetes clusters JAX detects) no argument is needed; elsewhere give the coordinator's
    `host:port`, the process count and this process's index. Gloo lets processes on CPU run
    collectives (as the tests here do); accelerators use their own interconnect.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
