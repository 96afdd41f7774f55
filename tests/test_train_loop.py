"""The training loop's bookkeeping, with stand-ins for the step, data and checkpoints.

A step here is a jitted program whose device work is a 0.1 s host callback, so it runs
asynchronously like a real accelerator step: the throughput numbers must wait for it.
"""

import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import train

STEP_SECONDS = 0.1


def _slow_device_step(state, batch):
  del batch

  def work(x):
    time.sleep(STEP_SECONDS)
    return x

  done = jax.pure_callback(work, jax.ShapeDtypeStruct((), jnp.float32), state['x'])
  metrics = {'loss': done, 'logit_scale': done, 'bad_steps': jnp.zeros((), jnp.int32)}
  return {'x': done + 1}, metrics


# 32 examples: the loop counts each batch's samples (NaFlex batches vary in size).
BATCH = {'text': np.zeros((32, 1), np.int32)}


class _Loader:
  skipped: dict = {}  # noqa: RUF012 (read-only stand-ins)
  cut: dict = {}  # noqa: RUF012
  locca_fallback: dict = {}  # noqa: RUF012
  upscaled: dict = {}  # noqa: RUF012

  def __next__(self):
    return BATCH


class _Checkpoints:
  directory = pathlib.Path('/nonexistent/checkpoints')

  def __init__(self):
    self.saved = []

  def should_save(self, step):
    return False

  def save(self, step, state, loader, force):
    self.saved.append((step, force))


class _Logger:
  def __init__(self):
    self.records = {}

  def write(self, step, scalars):
    self.records.setdefault(step, {}).update(scalars)

  def flush(self):
    pass


class _Preemption:
  requested = False

  def reached(self, step):
    return self.requested


def _run(total_steps, log_every):
  config = ml_collections.ConfigDict(dict(
      total_steps=total_steps, log_every=log_every, eval_every=1000, max_bad_steps=10,
      batch_size=32, profile_start_step=0, profile_steps=5))
  return train.Run(config=config, state={'x': jnp.zeros(())},
                   step_fn=jax.jit(_slow_device_step), loader=_Loader(),
                   checkpoints=_Checkpoints(), logger=_Logger(), evaluate=None,
                   schedule=lambda step: 1e-3, flops_per_step=1e9, peak_flops=None,
                   preemption=_Preemption(), start_step=0)


def test_step_time_waits_for_the_device_and_counts_the_steps_of_each_window():
  run = _run(total_steps=13, log_every=5)
  run.step_fn(run.state, BATCH)  # compile outside the measured windows
  train.train_loop(run)
  records = run.logger.records
  assert sorted(records) == [5, 10, 13]  # the last window holds 3 steps, not 5
  for step, record in records.items():
    # Asynchronous dispatch returns at once; only a window that waits for the device's
    # last step measures ~0.1 s, and only one divided by its own step count.
    assert STEP_SECONDS * 0.9 < record['step_time'] < STEP_SECONDS * 3, (step, record)
    np.testing.assert_allclose(record['samples_per_second'], 32 / record['step_time'])
  assert run.checkpoints.saved == [(13, True)]  # the final step is always saved


def test_a_preempted_loop_saves_and_stops_at_the_next_step():
  run = _run(total_steps=100, log_every=50)
  run.preemption.requested = True
  train.train_loop(run)
  assert run.checkpoints.saved == [(1, True)]


def test_non_finite_steps_stop_the_loop():
  run = _run(total_steps=20, log_every=50)
  run.step_fn = lambda state, batch: (state, {'loss': jnp.nan, 'logit_scale': 1.0,
                                              'bad_steps': jnp.asarray(3)})
  run.config.max_bad_steps = 3
  with pytest.raises(FloatingPointError, match='3 steps in a row'):
    train.train_loop(run)


def test_the_unmasked_tail_runs_its_own_step_and_counts_its_flops():
  """Patch dropout's tail: the last steps run the unmasked step, and their MFU counts its
  larger FLOPs (here 2x the masked step's)."""
  run = _run(total_steps=6, log_every=2)
  masked, unmasked = [], []

  def counting(calls):
    def step(state, batch):
      calls.append(1)
      return state, {'loss': 1.0, 'logit_scale': 1.0, 'bad_steps': jnp.asarray(0)}
    return step

  run.step_fn, run.unmasked_step_fn = counting(masked), counting(unmasked)
  run.unmasked_from, run.unmasked_flops_per_step, run.peak_flops = 4, 2e9, 1e12
  train.train_loop(run)
  assert (len(masked), len(unmasked)) == (4, 2)
  records = run.logger.records
  for step, flops in ((4, 1e9), (6, 2e9)):
    expected = flops / records[step]['step_time'] / jax.device_count() / 1e12
    np.testing.assert_allclose(records[step]['mfu'], expected, rtol=1e-6)
