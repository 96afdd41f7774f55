"""EMA of the params (`config.optim.ema_decay`): the step's recurrence, checkpoints, --ema."""

import json
import types

import jax
import numpy as np
import optax
import pytest
from PIL import Image
from safetensors.numpy import load_file

import clip_jax
from clip_jax import train as train_lib
from clip_jax.checkpoint import TrainCheckpoints, load_params, save_model
from clip_jax.config_base import base_config
from clip_jax.convert.open_clip import params_to_open_clip
from clip_jax.evaluate import evaluate, parse_args
from clip_jax.export import SAFETENSORS_NAME, export
from tests import helpers

DECAY = 0.75


def _config(**kw):
  c = base_config()
  c.data.kind = 'synthetic'
  c.update_from_flattened_dict({'batch_size': 8, 'model.text.vocab_size': 256,
                                'optim.warmup_steps': 0, 'optim.ema_decay': DECAY, **kw})
  return c


def _state_and_step(config):
  """(model, state with an EMA, jitted step) of `config` on all 8 devices."""
  program = helpers.program(config, tx=optax.adamw(1e-2))
  return program.model, program.state, program.step


def _batch(cfg, seed):
  rng = np.random.default_rng(seed)
  size, context, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
  text = rng.integers(1, vocab - 1, (8, context)).astype(np.int32)
  text[:, -1] = vocab - 1
  return {'image': rng.integers(0, 255, (8, size, size, 3), dtype=np.uint8), 'text': text}


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


def test_ema_follows_the_recurrence_and_a_skipped_step_leaves_it_unchanged():
  """ema <- d * ema + (1 - d) * params after every applied step, starting at the initial
  params; a step with a non-finite loss changes neither the params nor the EMA."""
  config = _config()
  model, state, step = _state_and_step(config)
  expected = _host(state['params'])
  for i in range(3):
    state, metrics = step(state, _batch(model.cfg, i))
    assert int(metrics['skipped_nonfinite']) == 0
    expected = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p, expected,
                            _host(state['params']))
  _assert_trees_close(_host(state['ema']), expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(expected['text']['ln_final']['scale'],
                         _host(state['params'])['text']['ln_final']['scale'])

  scale = state['params']['logit_scale']
  state['params']['logit_scale'] = jax.device_put(np.float32(np.nan), scale.sharding)
  state, metrics = step(state, _batch(model.cfg, 3))
  assert int(metrics['skipped_nonfinite']) == 1
  _assert_trees_close(_host(state['ema']), expected, rtol=1e-6, atol=1e-7)


def _trained_checkpoint(workdir, ema: bool = True):
  """A training checkpoint (step 2) of a tiny model whose EMA differs from its params."""
  model, state, _ = _state_and_step(_config())
  state['ema'] = jax.tree.map(lambda x: x * 0.5 + 0.25, state['ema'])  # keeps the sharding
  if not ema:
    del state['ema']
  checkpoints = TrainCheckpoints(str(workdir), model.cfg, every=1, keep=2)
  expected = _host(state)
  checkpoints.save(2, state, helpers.FakeLoader(), force=True)
  checkpoints.close()
  return model, expected


def test_the_ema_is_checkpointed_and_restored_exactly(tmp_path):
  model, saved = _trained_checkpoint(tmp_path)
  _, fresh, _ = _state_and_step(_config())
  checkpoints = TrainCheckpoints(str(tmp_path), model.cfg, every=1, keep=2)
  step, restored, _ = checkpoints.restore_latest(fresh, helpers.FakeLoader())
  checkpoints.close()
  assert step == 2
  for key in ('params', 'ema', 'opt_state', 'step'):
    _assert_trees_close(_host(restored[key]), saved[key], rtol=0, atol=0)
  assert restored['ema']['text']['ln_final']['scale'].sharding == \
      fresh['ema']['text']['ln_final']['scale'].sharding


def test_ema_switched_on_for_a_checkpoint_without_one_starts_at_the_params(tmp_path):
  model, saved = _trained_checkpoint(tmp_path, ema=False)
  assert not (tmp_path / 'checkpoints' / '2' / 'ema').exists()
  _, fresh, _ = _state_and_step(_config())
  checkpoints = TrainCheckpoints(str(tmp_path), model.cfg, every=1, keep=2)
  _, restored, _ = checkpoints.restore_latest(fresh, helpers.FakeLoader())
  checkpoints.close()
  _assert_trees_close(_host(restored['ema']), saved['params'], rtol=0, atol=0)
  with pytest.raises(FileNotFoundError, match='holds no EMA'):
    load_params(tmp_path, ema=True)


def test_ema_flag_exports_evaluates_and_loads_the_ema_weights(tmp_path):
  """export --ema writes the EMA's OpenCLIP weights; evaluate --ema scores as the EMA saved
  as a plain checkpoint does; clip_jax.load(ema=True) holds the EMA."""
  model, saved = _trained_checkpoint(tmp_path / 'run')
  export(str(tmp_path / 'run'), str(tmp_path / 'out'), ema=True)
  written = load_file(tmp_path / 'out' / SAFETENSORS_NAME)
  for key, value in params_to_open_clip(model.cfg, saved['ema']).items():
    np.testing.assert_array_equal(written[key], value)

  plain = save_model(tmp_path / 'ema_as_params', model.cfg, saved['ema'])
  rng = np.random.default_rng(0)
  for label in ('cat', 'dog'):
    (tmp_path / 'images' / label).mkdir(parents=True)
    for i in range(3):
      pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / 'images' / label / f'{i}.jpg')

  def scores(*where):
    args = parse_args([*where, '--image_folder', str(tmp_path / 'images'),
                       '--templates', 'simple', '--batch_size', '8'])
    result = evaluate(args)['zeroshot'][str(tmp_path / 'images')]
    return {k: v for k, v in result.items() if k != 'step'}  # the workdir's step, None plain

  assert scores('--workdir', str(tmp_path / 'run'), '--ema') == scores('--checkpoint', str(plain))
  assert json.loads((tmp_path / 'run' / 'checkpoints' / '2' / 'eval_results_ema.json'
                     ).read_text())['ema'] is True

  loaded, _, _ = clip_jax.load(str(tmp_path / 'run'), ema=True)
  np.testing.assert_array_equal(np.asarray(loaded.text.ln_final.scale.value),
                                saved['ema']['text']['ln_final']['scale'])


def test_periodic_evaluation_reports_the_params_and_the_ema():
  class Logger:
    def write(self, step, scalars):
      self.written = (step, scalars)

  run = types.SimpleNamespace(
      evaluate=lambda params: {'zeroshot_top1': params['x']}, logger=Logger(),
      state={'params': {'x': 0.25}, 'ema': {'x': 0.5}})
  expected = {'zeroshot_top1': 0.25, 'ema/zeroshot_top1': 0.5}
  assert train_lib.evaluate(run, 7) == expected
  assert run.logger.written == (7, expected)
