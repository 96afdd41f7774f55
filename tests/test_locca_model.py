"""LocCa's decoder places each image token by its grid position (`DecoderConfig.image_positions`),
so a box can be read off the tokens whatever the tower's own position signal, and patch
dropout keeps each kept token's place; the LocCa demo learns all three tasks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import clip_jax
from clip_jax import demo
from clip_jax.data.make_demo import draw_scene
from clip_jax.models.clip import CLIP
from clip_jax.models.vit import drop_patches, kept_patch_indices
from clip_jax.run_config import with_locca_decoder
from tests import helpers

LOCCA = ml_collections.ConfigDict({'weight': 1.0})


def _model(**vision):
  cfg = with_locca_decoder(clip_jax.get_config('tiny-demo', **vision), LOCCA)
  return CLIP(cfg, rngs=nnx.Rngs(0))


def _inputs(model, batch=2, length=7, seed=0):
  rng = np.random.default_rng(seed)
  cfg = model.cfg
  images = rng.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
  ids = rng.integers(0, cfg.decoder.vocab_size, size=(batch, length))
  return jnp.asarray(images, jnp.float32), jnp.asarray(ids, jnp.int32)


def test_the_decoder_reads_where_each_image_token_sits():
  """Cross-attention alone ignores the order of its keys; with the grid positions, tokens
  given in any order with their positions give the same logits, and the same tokens
  placed at other positions give other logits."""
  model = _model()
  assert model.cfg.decoder.image_positions == model.cfg.vision.grid ** 2 == 16
  images, ids = _inputs(model)
  _, tokens = model.visual.encode(images)
  want = model.decoder(tokens, ids)
  order = jnp.asarray(np.stack([np.random.default_rng(s).permutation(16) for s in (1, 2)]))
  shuffled = jnp.take_along_axis(tokens, order[..., None], axis=1)
  np.testing.assert_allclose(model.decoder(shuffled, ids, order), want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(model.decoder(shuffled, ids) - want)).max() > 1e-2


def test_patch_dropout_keeps_each_kept_tokens_place():
  """With patch dropout the decoder sees the kept tokens at their own grid positions:
  `caption_logits` equals the decoder on the kept tokens placed by the kept indices, and
  those indices are the patches `drop_patches` keeps."""
  model = _model(**{'vision.patch_dropout': 0.5})
  images, ids = _inputs(model)
  keys = jax.random.split(jax.random.key(3), 2)
  got = model.caption_logits(images, ids, keys, decoder_tokens=ids)[-1]
  kept = kept_patch_indices(keys, 16, model.cfg.vision.kept_patches)
  assert kept.shape == (2, 8)
  grid = jnp.broadcast_to(jnp.arange(1, 17, dtype=jnp.float32)[None, :, None], (2, 16, 1))
  dropped = drop_patches(jnp.pad(grid, ((0, 0), (1, 0), (0, 0))), 8, 1, keys)
  np.testing.assert_array_equal(dropped[:, 1:, 0], kept + 1)
  _, tokens = model.visual.encode(images, keys)
  np.testing.assert_allclose(got, model.decoder(tokens, ids[:, :-1], kept), rtol=1e-5,
                             atol=1e-5)
  everywhere = model.decoder(tokens, ids[:, :-1], jnp.broadcast_to(jnp.arange(8), (2, 8)))
  assert np.abs(np.asarray(got - everywhere)).max() > 1e-2


def test_a_token_count_other_than_the_grid_is_an_error():
  model = _model()
  images, ids = _inputs(model)
  _, tokens = model.visual.encode(images)
  with pytest.raises(ValueError, match='decoder.image_positions=16'):
    model.decoder(tokens[:, :9], ids)


def test_positions_are_a_locca_decoders():
  with pytest.raises(ValueError, match='decoder.image_positions'):
    clip_jax.get_config('tiny-coca', **{'decoder.image_positions': 16}).validate()


@pytest.mark.slow
def test_the_locca_demo_learns_to_caption_refer_and_ground(tmp_path):
  """docs/captioning.md's LocCa demo (configs/demo.py:loss=sigmoid,locca=1), shortened to
  500 steps: the train binary, then 120 new images: referring boxes reach IoU >= 0.5 for
  >= 60% and grounded phrases name the boxed class for >= 70% (the issue's bars), and
  zero-shot top-1 is far above chance (2.5%)."""
  workdir = tmp_path / 'run'
  config = f'{helpers.DEMO_CONFIG}:loss=sigmoid,locca=1,steps=500,data_dir={tmp_path / "data"}'
  helpers.run(helpers.train_cmd(workdir, '--config.eval_every=500', config=config),
              helpers.env(1), timeout=1500)
  assert helpers.metrics(workdir)[500]['zeroshot_top1'] >= 0.5
  model, preprocess, tokenizer = clip_jax.load(str(workdir))
  rng = np.random.default_rng(7)
  scenes = [draw_scene(rng, 64, groups=1) for _ in range(120)]
  scores = demo.decoder_scores(model, preprocess, tokenizer, scenes)
  assert scores['referring_accuracy'] >= 0.6, scores
  assert scores['grounded_accuracy'] >= 0.7, scores
