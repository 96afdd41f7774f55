"""FLIP's patch dropout: fewer tokens (and FLOPs) in training steps, none dropped elsewhere."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax import run_config
from clip_jax.config_base import base_config
from clip_jax.models.functional import FunctionalModel, get_params
from clip_jax.models.vit import drop_patches
from configs import flip
from tests import helpers


def test_drop_patches_keeps_the_class_token_and_distinct_patches():
  x = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)  # class token + 16 patches
  keys = jax.random.split(jax.random.key(0), 2)
  y = drop_patches(x, keep=8, prefix=1, keys=keys)
  assert y.shape == (2, 9, 3)
  for image, kept in zip(np.asarray(x), np.asarray(y)):
    np.testing.assert_array_equal(kept[0], image[0])
    rows = {tuple(r) for r in image[1:]}
    assert {tuple(r) for r in kept[1:]} <= rows and len({tuple(r) for r in kept[1:]}) == 8
  other = drop_patches(x, keep=8, prefix=1, keys=jax.random.split(jax.random.key(1), 2))
  assert not np.array_equal(np.asarray(y), np.asarray(other))


def test_a_call_without_keys_drops_nothing():
  """Evaluation, export and `clip_jax.load` call the model without keys: the features of a
  model with patch_dropout are those of the same weights without it."""
  model = clip_jax.create_model('tiny', **{'vision.patch_dropout': 0.5})
  plain = FunctionalModel.create(clip_jax.get_config('tiny'))
  params = get_params(model)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(model.encode_image(images),
                                plain.bind(params).encode_image(images))
  keys = jax.random.split(jax.random.key(0), 2)
  assert not np.allclose(model.encode_image(images, dropout_keys=keys),
                         model.encode_image(images))


def _image_tower_train_flops(rate):
  """Compiled FLOPs of the ViT-B-16 image tower's forward + backward (2 layers, unrolled)."""
  cfg = clip_jax.get_config('ViT-B-16', **{'vision.layers': 2, 'vision.patch_dropout': rate,
                                           'scan_layers': False})
  model = FunctionalModel.create(cfg)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), model.shapes(),
                        is_leaf=lambda x: isinstance(x, tuple))
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 2))
  loss = lambda p, x, k: model.bind(p).encode_image(x, dropout_keys=k).sum()
  return jax.jit(jax.grad(loss)).lower(params, images, keys).compile().cost_analysis()['flops']


def test_half_the_patches_cost_at_most_0_6x_the_flops():
  """Measured: 36.1 -> 18.3 GFLOPs (0.51x; 12 layers: 0.49x, bench/patch_dropout.py)."""
  dense, dropped = _image_tower_train_flops(0.0), _image_tower_train_flops(0.5)
  assert dropped <= 0.6 * dense, dropped / dense


def test_the_flip_config_drops_half_the_patches_then_finishes_unmasked():
  c = flip.get_config('batch_size=4096,samples=4096000')
  assert (c.model.name, c.model.vision.patch_dropout) == ('ViT-B-16', 0.5)
  assert (c.total_steps, c.patch_dropout_tail_steps) == (1000, 10)
  assert c.optim.lr == 5e-4  # configs/clip.py's ViT-B-16 recipe
  run_config.resolve(c, 8, data=False)


def _config(**overrides):
  c = base_config()
  c.data.kind = 'synthetic'
  c.update_from_flattened_dict({'model.vision.patch_dropout': 0.5, 'model.text.vocab_size': 256,
                                'batch_size': 16, 'optim.warmup_steps': 0, **overrides})
  return c


def _first_loss(config):
  program = helpers.program(config)
  model, state, step = program.model, program.state, program.step
  cfg = model.cfg
  rng = np.random.default_rng(0)
  text = rng.integers(1, 255, (16, cfg.text.context_length)).astype(np.int32)
  text[:, -1] = 255
  batch = {'image': rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8), 'text': text}
  return float(step(state, batch)[1]['loss'])


def test_each_image_drops_the_same_patches_however_the_batch_is_split():
  """The keys are per row of the global batch: the feature cache (grad_accum=2) scores the
  one-shot step's dropped batch."""
  layers = {'model.vision.layers': 1, 'model.text.layers': 1}
  one_shot = _first_loss(_config(**layers))
  assert _first_loss(_config(**layers, **{'optim.grad_accum': 2})) == pytest.approx(one_shot,
                                                                                    rel=1e-5)


@pytest.mark.slow
def test_the_demo_learns_with_half_its_patches(demo_data, tmp_path):
  """The train binary on the demo data, half the patches dropped, the last 20 steps not."""
  helpers.run(helpers.train_cmd(tmp_path, *helpers.overrides(
      100, '--config.eval.zeroshot_shards=', '--config.model.vision.patch_dropout=0.5',
      '--config.patch_dropout_tail_steps=20', '--config.log_every=10', '--config.batch_size=64'),
      config=helpers.demo_config(demo_data)), helpers.env(devices=1))
  metrics = helpers.metrics(tmp_path)
  assert metrics[100]['loss'] < 0.6 * metrics[10]['loss'], (metrics[10], metrics[100])
