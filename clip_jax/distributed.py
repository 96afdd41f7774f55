"""Multi-process start-up: the same code path on one machine, a TPU pod or a GPU cluster.

`launch/local.sh` starts N processes on this machine and sets `CLIP_JAX_COORDINATOR`,
`CLIP_JAX_NUM_PROCESSES` and `CLIP_JAX_PROCESS_ID`, plus JAX's own environment options
for fake CPU devices (`JAX_NUM_CPU_DEVICES`, `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`),
so no JAX option is set in code. On Cloud TPU VMs and under SLURM,
`jax.distributed.initialize()` finds its peers by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize() -> None:
  """Joins the other processes of the job, if there are any."""
  num_processes = int(os.environ.get('CLIP_JAX_NUM_PROCESSES', '1'))
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=os.environ['CLIP_JAX_COORDINATOR'],
                               num_processes=num_processes,
                               process_id=int(os.environ['CLIP_JAX_PROCESS_ID']))
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ:
    jax.distributed.initialize()
  start_backend()
  if jax.process_count() > 1:
    logging.info('Process %d of %d, %d local devices of %d', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def on_all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
  """A vector of counts summed over all processes (a collective)."""
  if jax.process_count() == 1:
    return counts
  return multihost_utils.process_allgather(counts).sum(0)


def start_backend() -> None:
  """Starts JAX's backend with C++ start-up logs kept out of the user's terminal.

  With libtpu installed (the test extra, `jax[tpu]`) on a host without a TPU, JAX probes
  the TPU first and libtpu writes a screen of init errors (TPU_WORKER_HOSTNAMES ...) before
  JAX falls back to CPU. Those lines go to the debug log; what the user sees is one warning
  that says which backend runs and how to skip the probe.
  """
  if os.environ.get('JAX_PLATFORMS'):
    jax.devices()
    return
  with quiet_stderr() as captured:
    platform = jax.devices()[0].platform
  if platform == 'cpu' and 'tpu' in captured.text.lower():
    logging.warning('libtpu is installed but found no TPU: running on CPU. Set '
                    'JAX_PLATFORMS=cpu to skip the TPU probe (its log is at debug level).')


class _Captured:
  text = ''


@contextlib.contextmanager
def quiet_stderr():
  """Sends what C++ libraries write to stderr (fd 2) to the debug log instead.

  Yields an object whose `text` holds what was written, once the block has ended. With
  `LIBTPU_INIT_ARGS` set nothing is hidden: libtpu ends the process at once on a flag it
  does not know, and its message would go with the process.
  """
  captured = _Captured()
  if os.environ.get('LIBTPU_INIT_ARGS'):
    yield captured
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield captured
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      captured.text = sink.read().decode(errors='replace').strip()
      if captured.text:
        logging.debug('libtpu/XLA stderr:\n%s', captured.text)
