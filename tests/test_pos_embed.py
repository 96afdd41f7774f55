"""Position embeddings resized as OpenCLIP resizes them, and `init_from` across sizes."""

import types

import jax
import numpy as np
import pytest
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed

import clip_jax
from clip_jax import run_config, step
from clip_jax import train as train_lib
from clip_jax.checkpoint import save_model
from clip_jax.config_base import base_config
from clip_jax.models import pos_embed
from clip_jax.models.functional import get_params


@pytest.mark.parametrize('old,new', [(7, 14), (14, 10), (16, 16 + 8)])
def test_image_pos_embed_matches_open_clip(old, new):
  """Bigger and smaller grids; OpenCLIP keeps the class token and resizes the grid."""
  pos = np.random.default_rng(0).normal(size=(1 + old * old, 32)).astype(np.float32)
  state = {'visual.positional_embedding': torch.from_numpy(pos)}
  resize_pos_embed(state, types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(new, new))))
  expected = state['visual.positional_embedding'].numpy()
  got = pos_embed.resize_image_pos_embed(pos, new, prefix=1)
  assert got.shape == expected.shape == (1 + new * new, 32)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_array_equal(got[0], pos[0])


@pytest.mark.parametrize('old,new', [(77, 32), (32, 77), (64, 77)])
def test_text_pos_embed_matches_open_clip(old, new):
  pos = np.random.default_rng(1).normal(size=(old, 16)).astype(np.float32)
  state = {'positional_embedding': torch.from_numpy(pos)}
  resize_text_pos_embed(state, types.SimpleNamespace(positional_embedding=torch.zeros(new, 16)))
  np.testing.assert_allclose(pos_embed.resize_text_pos_embed(pos, new),
                             state['positional_embedding'].numpy(), atol=1e-5)


def _init_from_config(checkpoint, **overrides):
  c = base_config()
  c.data.kind = 'synthetic'
  c.batch_size = 8
  c.total_steps = 2
  c.init_from = str(checkpoint)
  c.model.text.vocab_size = 256
  c.update_from_flattened_dict(overrides)
  return c


def test_init_from_another_image_size_and_context_trains(tmp_path):
  """A checkpoint at 32 px (grid 4) and 32 tokens starts a 48 px (grid 6), 24-token run;
  any other mismatch is still an error naming the parameter."""
  model = clip_jax.create_model('tiny', **{'text.vocab_size': 256})
  save_model(tmp_path / 'small', model.cfg, get_params(model))
  config = _init_from_config(tmp_path / 'small', **{'model.vision.image_size': 48,
                                                    'model.text.context_length': 24})
  run = train_lib.setup(config, str(tmp_path / 'run'))
  try:
    params = run.state['params']
    assert params['visual']['pos_embed'].shape == (1 + 6 * 6, model.cfg.vision.width)
    assert params['text']['pos_embed'].shape == (24, model.cfg.text.width)
    np.testing.assert_array_equal(params['visual']['pos_embed'][0],
                                  get_params(model)['visual']['pos_embed'][0])
    state, metrics = run.step_fn(run.state, next(run.loader))
    assert np.isfinite(float(metrics['loss'])) and int(state['step']) == 1
  finally:
    run.close()

  wider = _init_from_config(tmp_path / 'small', **{'model.vision.width': 96})
  with pytest.raises(ValueError, match='visual/'):
    step.build(run_config.resolve(wider, jax.device_count()),
               jax.sharding.Mesh(jax.devices(), ('data',)))
