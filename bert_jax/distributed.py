"""Joining a multi-process (multi-host) run: `jax.distributed.initialize` before anything
touches a device, and a shutdown that all processes enter together at the end (`joined`).

With no arguments JAX finds the cluster itself (Cloud TPU VMs, SLURM, Open MPI); elsewhere
give the coordinator's address, the number of processes and this one's index. CPU
collectives across processes go through gloo, so the same run also works on CPU machines
(and in our 2-process tests on localhost).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

from bert_jax.errors import BertJaxError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise BertJaxError("--coordinator-address, --num-processes and --process-id go "
                           "together (or give none of them on TPU VMs / SLURM)")
    if process_id is not None and not 0 <= process_id < num_processes:
        raise BertJaxError(f"--process-id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as err:
        raise BertJaxError(f"cannot join the distributed run: {err}") from None


@contextlib.contextmanager
def joined(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> Iterator[None]:
    """`initialize`, then, once the block has run, leave the run together: every process
    enters `jax.distributed.shutdown`'s barrier while all are still alive. Left to interpreter
    exit, process 0 can tear down the coordination service while a peer is still leaving,
    and that peer aborts in gRPC (SIGABRT after a finished run)."""
    initialize(coordinator_address, num_processes, process_id)
    yield
    jax.distributed.shutdown()
