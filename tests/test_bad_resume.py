"""Resuming from a workdir that something went wrong with: a restore that meets a transient or
a non-data error, the metrics a killed run left behind, an `init_from` that is not there."""

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from clip_jax.checkpoint import TrainCheckpoints
from clip_jax.models.presets import get_config
from tests import helpers

CFG = get_config('tiny')


def _state(step):
  """A small training state whose values say which step wrote it (random, so that the
  array data is the largest file of a checkpoint, not its metadata)."""
  weights = jax.random.normal(jax.random.key(step), (256, 256))
  return {'params': {'w': weights}, 'opt_state': {'mu': weights * 2},
          'step': jax.numpy.int32(step), 'bad_steps': jax.numpy.int32(0)}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  """A workdir with checkpoints at steps 1 and 2; retries do not wait."""
  monkeypatch.setattr(TrainCheckpoints, 'RETRY_SECONDS', (0.0, 0.0, 0.0))
  checkpoints = TrainCheckpoints(str(tmp_path), CFG, every=1, keep=5)
  for step in (1, 2):
    checkpoints.save(step, _state(step), helpers.FakeLoader(10 * step), force=True)
  checkpoints.close()
  return tmp_path


def _listing(workdir):
  return sorted(p.name for p in (workdir / 'checkpoints').iterdir())


def _restore(workdir, failures):
  """`restore_latest` over `workdir` where orbax's restore raises `failures(call)` (None:
  the real restore runs); returns (step, state, loader, calls)."""
  checkpoints = TrainCheckpoints(str(workdir), CFG, every=1, keep=5)
  real, calls, loader = checkpoints.manager.restore, [], helpers.FakeLoader()

  def flaky(step, *args, **kwargs):
    calls.append(step)
    error = failures(len(calls), step)
    if error is not None:
      raise error
    return real(step, *args, **kwargs)

  checkpoints.manager.restore = flaky
  try:
    step, state, _ = checkpoints.restore_latest(_state(0), loader)
  finally:
    checkpoints.close()
  return step, state, loader, calls


def _unavailable():
  """A tensorstore read that the storage did not answer, as orbax raises it (wrapped)."""
  try:
    raise ValueError('UNAVAILABLE: Error reading "w/0.0" in OCDBT database')
  except ValueError as e:
    try:
      raise Exception('Encountered error while reading array index') from e
    except Exception as wrapped:
      return wrapped


@pytest.mark.parametrize('error', [ConnectionResetError('reset by peer'),
                                   TimeoutError('read timed out'), _unavailable()],
                         ids=['connection', 'timeout', 'tensorstore_unavailable'])
def test_a_transient_error_is_retried_and_the_newest_step_restores(workdir, error):
  before = _listing(workdir)
  step, state, loader, calls = _restore(workdir, lambda call, _: error if call == 1 else None)
  assert step == 2 and calls[0] == calls[1] == 2  # the same step, tried again
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  assert loader.position == 20
  assert _listing(workdir) == before  # nothing moved aside


def test_a_persistent_transient_error_stops_the_run_and_moves_nothing(workdir):
  before = _listing(workdir)
  with pytest.raises(RuntimeError, match=r'checkpoints/2 could not be read \(4 tries\): '
                                         r"TimeoutError\('read timed out'\)"):
    _restore(workdir, lambda _, step: TimeoutError('read timed out') if step == 2 else None)
  assert _listing(workdir) == before


def test_an_error_that_is_not_damage_stops_the_run_and_moves_nothing(workdir):
  """A permission error (or a bug) says nothing about the checkpoint's data: no retry, and
  no silent fall-back to the older step."""
  before = _listing(workdir)
  with pytest.raises(RuntimeError, match=r"checkpoints/2 could not be read \(not a sign of "
                                         r"damaged data\): PermissionError\(13, 'Permission"):
    _restore(workdir, lambda _, step: PermissionError(13, 'Permission denied')
             if step == 2 else None)
  assert _listing(workdir) == before


def test_a_truncated_data_file_is_still_moved_aside(workdir):
  data = max((p for p in (workdir / 'checkpoints' / '2' / 'params').rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  step, state, loader, _ = _restore(workdir, lambda *_: None)
  assert step == 1 and loader.position == 10
  np.testing.assert_array_equal(state['params']['w'], _state(1)['params']['w'])
  assert _listing(workdir) == ['1', '2.unreadable']


# --- metrics.jsonl of a resumed run -------------------------------------------------------

COMMON = ['--config.log_every=1', '--config.eval.zeroshot_shards=', '--config.batch_size=16',
          '--config.checkpoint_every=1000', '--config.optim.schedule=constant',
          '--config.optim.warmup_steps=0', '--config.model.name=tiny']


def _lines_per_step(workdir):
  steps = [json.loads(line)['step'] for line in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {step: steps.count(step) for step in steps}


@pytest.mark.slow
def test_a_killed_run_resumed_logs_each_step_once_with_the_resumed_values(demo_data, tmp_path):
  """Steps 1-3 checkpointed; a second leg logs steps after 3 and is SIGKILLed; the run
  resumed from step 3 with another learning rate replays them: each step is in
  metrics.jsonl once, the replayed ones with the resumed run's values."""
  workdir, config = tmp_path / 'run', helpers.demo_config(demo_data)
  helpers.run(helpers.train_cmd(workdir, *helpers.overrides(3, *COMMON, '--config.optim.lr=1e-3'),
                                config=config), helpers.env(1))
  killed = subprocess.Popen(helpers.train_cmd(workdir, *helpers.overrides(
      10_000, *COMMON, '--config.optim.lr=1e-3'), config=config), env=helpers.env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    helpers.wait_for_step(workdir, 5)
  finally:
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
  assert max(_lines_per_step(workdir)) >= 5  # the killed leg logged steps after 3

  result = helpers.run(helpers.train_cmd(workdir, *helpers.overrides(
      4, *COMMON, '--config.optim.lr=2e-3'), config=config), helpers.env(1))
  assert 'Resuming from' in result.stderr and 'step 3' in result.stderr
  assert _lines_per_step(workdir) == {1: 1, 2: 1, 3: 1, 4: 1}  # the killed leg's 4.. are gone
  records = helpers.metrics(workdir)
  np.testing.assert_allclose([records[s]['lr'] for s in (1, 2, 3, 4)],
                             [1e-3, 1e-3, 1e-3, 2e-3], rtol=1e-6)


# --- init_from ----------------------------------------------------------------------------

def test_init_from_a_missing_path_fails_before_creating_the_workdir(demo_data, tmp_path):
  workdir, missing = tmp_path / 'run', tmp_path / 'no_such_checkpoint'
  result = subprocess.run(helpers.train_cmd(workdir, f'--config.init_from={missing}',
                                            config=helpers.demo_config(demo_data)),
                          env=helpers.env(1), capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: config.init_from={missing}: {missing} holds no clip_jax checkpoint')
  assert not workdir.exists()
