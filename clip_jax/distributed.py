"""Multi-process start-up: the same code path on one machine, a TPU pod or a GPU cluster.

`launch/local.sh` starts N processes on this machine and sets `CLIP_JAX_COORDINATOR`,
`CLIP_JAX_NUM_PROCESSES`, `CLIP_JAX_PROCESS_ID` (and `CLIP_JAX_LOCAL_DEVICES` for fake
CPU devices). On Cloud TPU VMs and under SLURM, `jax.distributed.initialize()` finds its
peers by itself.
"""

from __future__ import annotations

import logging
import os

import jax


def _num_processes() -> int:
  return int(os.environ.get('CLIP_JAX_NUM_PROCESSES', '1'))


def configure_from_env() -> None:
  """JAX options that must be set before its backends start."""
  local_devices = os.environ.get('CLIP_JAX_LOCAL_DEVICES')
  if local_devices:
    jax.config.update('jax_num_cpu_devices', int(local_devices))
  if _num_processes() > 1 and os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def initialize() -> None:
  """Joins the other processes of the job, if there are any."""
  if _num_processes() > 1:
    jax.distributed.initialize(coordinator_address=os.environ['CLIP_JAX_COORDINATOR'],
                               num_processes=_num_processes(),
                               process_id=int(os.environ['CLIP_JAX_PROCESS_ID']))
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info('Process %d of %d, %d local devices of %d', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
