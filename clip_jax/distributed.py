"""Multi-process start-up: the same code path on one machine, a TPU pod or a GPU cluster.

`launch/local.sh` starts N processes on this machine and sets `CLIP_JAX_COORDINATOR`,
`CLIP_JAX_NUM_PROCESSES` and `CLIP_JAX_PROCESS_ID`, plus JAX's own environment options
for fake CPU devices (`JAX_NUM_CPU_DEVICES`, `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`),
so no JAX option is set in code. On Cloud TPU VMs and under SLURM,
`jax.distributed.initialize()` finds its peers by itself.
"""

from __future__ import annotations

import logging
import os

import jax


def initialize() -> None:
  """Joins the other processes of the job, if there are any."""
  num_processes = int(os.environ.get('CLIP_JAX_NUM_PROCESSES', '1'))
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=os.environ['CLIP_JAX_COORDINATOR'],
                               num_processes=num_processes,
                               process_id=int(os.environ['CLIP_JAX_PROCESS_ID']))
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info('Process %d of %d, %d local devices of %d', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
