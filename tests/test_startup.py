"""What a run says when it starts, resumes and ends: warnings that matter, and no noise."""

import logging
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import clip_jax
from clip_jax.checkpoint import TrainCheckpoints
from clip_jax.data.pipeline import PipelineConfig, build_dataset
from clip_jax.models.functional import param_shapes
from clip_jax.models.presets import get_config
from tests import helpers
from tests.conftest import ROOT


def _write_shard(path, samples=2):
  helpers.write_tar(path, [(f'{i:06d}.{ext}', data) for i in range(samples)
                           for ext, data in (('jpg', b'not decoded here'), ('txt', b'a caption'))])


def test_missing_shards_are_said_at_start(tmp_path, caplog):
  for i in (0, 2, 4):
    _write_shard(tmp_path / f'{i:05d}.tar')
  cfg = PipelineConfig(global_batch_size=2, image_size=16, workers=0,
                       tokenizer=clip_jax.get_tokenizer('clip', context_length=8),
                       train=str(tmp_path / '{00000..00004}.tar'))
  with caplog.at_level(logging.WARNING):
    build_dataset(cfg)
  assert (f'data.train: 2 of 5 shards are missing (first: {tmp_path}/00001.tar); training on '
          'the 3 present') in caplog.messages


def _state(cfg):
  """A training state of `cfg`'s shapes (zeros: only the shapes matter here)."""
  params = jax.tree.map(jnp.zeros, param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  return {'params': params, 'opt_state': {'mu': jax.tree.map(jnp.copy, params)},
          'step': jnp.int32(0), 'bad_steps': jnp.int32(0)}


def _restore(workdir, preset, cfg):
  checkpoints = TrainCheckpoints(str(workdir), cfg, every=1, keep=2, preset=preset)
  try:
    return checkpoints.restore_latest(_state(cfg), helpers.FakeLoader())
  finally:
    checkpoints.close()


def test_a_checkpoint_of_another_model_is_named_not_a_shape_error(tmp_path):
  tiny = get_config('tiny')
  checkpoints = TrainCheckpoints(str(tmp_path), tiny, every=1, keep=2, preset='tiny')
  checkpoints.save(1, _state(tiny), helpers.FakeLoader(), force=True)
  checkpoints.close()

  with pytest.raises(ValueError, match=f'^--workdir {tmp_path} holds a tiny checkpoint; you '
                     r'asked for tiny-demo\. Use another --workdir'):
    _restore(tmp_path, 'tiny-demo', get_config('tiny-demo'))
  with pytest.raises(ValueError, match=r'holds a tiny checkpoint; you asked for tiny '
                     r'\(vision\.layers 2 vs 1\)\.'):
    _restore(tmp_path, 'tiny', get_config('tiny', **{'vision.layers': 1}))
  assert [p.name for p in (tmp_path / 'checkpoints').iterdir()] == ['1']  # nothing moved aside
  # What does not change the params (an execution option) resumes.
  step, _, _ = _restore(tmp_path, 'tiny', tiny.replace(remat='full'))
  assert step == 1


def _run(*args):
  return helpers.run([sys.executable, '-m', *args], helpers.env(1)).stderr


def _interrupted(cmd, metrics, step):
  """Runs `cmd` until `metrics` (its metrics.jsonl) logs `step`, then presses Ctrl-C; its
  stderr. A child inherits an ignored SIGINT (a test run in the background has one) and Python
  then raises no KeyboardInterrupt, so this process handles SIGINT while the child starts."""
  log = metrics.parent.with_suffix('.stderr')
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with log.open('w') as stderr:
      process = subprocess.Popen(cmd, env=helpers.env(1), stdout=subprocess.DEVNULL, stderr=stderr)
  finally:
    signal.signal(signal.SIGINT, previous)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and process.poll() is None:
    if metrics.exists() and f'"step": {step},' in metrics.read_text():
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  process.wait(timeout=120)
  return log.read_text()


@pytest.mark.slow
def test_train_interrupt_resume_and_export_are_free_of_library_noise(demo_data, tmp_path):
  """A run stopped with Ctrl-C, its resume and an export of the workdir: the console holds
  the missing shard, the interrupt and nothing of helpers.LIBRARY_NOISE."""
  workdir = tmp_path / 'run'

  def train(steps):
    return [sys.executable, '-m', 'clip_jax.train', '--config',
            f'{ROOT}/configs/demo.py:data_dir={demo_data}', '--workdir', str(workdir),
            f'--config.total_steps={steps}', '--config.tensorboard=False',
            '--config.eval.zeroshot_shards=', '--config.batch_size=32', '--config.log_every=1',
            '--config.checkpoint_every=2',
            f'--config.data.train={demo_data}/train/{{00000..00010}}.tar']

  first = _interrupted(train(1000), workdir / 'metrics.jsonl', step=3)
  assert 'data.train: 1 of 11 shards are missing' in first
  assert 'KeyboardInterrupt' in first
  stderr = first + _run(*train(6)[2:]) + _run('clip_jax.export', '--checkpoint', str(workdir),
                                              '--out', str(tmp_path / 'export'))
  assert 'Resuming from' in stderr
  for noise in helpers.LIBRARY_NOISE:
    assert noise not in stderr, stderr[-3000:]
