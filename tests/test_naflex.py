"""NaFlex image towers (SigLIP 2's native aspect ratio; timm `naflexvit_*`).

Against timm's own code: the grid an image gets for a sequence length
(`get_image_size_for_seq`), the patch layout (`patchify_image`), the per-image position
grid resize (torch's antialiased bilinear `F.interpolate`), and whole models: OpenCLIP's
TimmModel over timm's `naflexvit_base_patch16_siglip` (reduced depth) and over a tiny
NaFlexVit, imported with random perturbed fp32 weights and fed the same patch sequences at
three aspect ratios and two sequence lengths. Then what NaFlex must not do: let padding
change a feature, or drop padding in place of real patches; and the interchange: export to
OpenCLIP, a fixed-resolution SigLIP 2 checkpoint in a NaFlex model.
"""


import io
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import optax
import pytest
import torch
from PIL import Image
from timm.data.naflex_transforms import get_image_size_for_seq, patchify_image

import clip_jax
from clip_jax import run_config, sharding
from clip_jax import step as step_lib
from clip_jax.checkpoint import save_model
from clip_jax.config_base import base_config
from clip_jax.convert.open_clip import params_to_open_clip
from clip_jax.convert.open_clip_config import UnsupportedForOpenCLIP, model_cfg
from clip_jax.data.make_demo import COLOURS, canvas_of, make_demo
from clip_jax.data.naflex import NaFlexBatching, grid_for_sequence, naflex_patches, patchify
from clip_jax.data.pipeline import Loader, PipelineConfig
from clip_jax.data.shard_writer import ShardWriter
from clip_jax.data.tar_samples import read_shard
from clip_jax.embed import embed
from clip_jax.embed import parse_args as embed_args
from clip_jax.eval import retrieval, zeroshot
from clip_jax.eval.zeroshot import build_classifier, load_templates
from clip_jax.evaluate import evaluate, main, parse_args
from clip_jax.export import export
from clip_jax.import_open_clip import import_state_dict
from clip_jax.models.functional import FunctionalModel, get_params, model_from_params
from clip_jax.models.naflex import NaFlexPatches, kept_valid_patches, resized_position_embedding
from clip_jax.models.pos_embed import resize_image_pos_embed
from configs import demo
from tests import helpers
from tests.jax_reference import jax_features, perturbed_model, random_inputs
from tests.reference import open_clip_model, state_dict_numpy, torch_features

TOKENIZER = clip_jax.get_tokenizer('clip', context_length=16)
TOLERANCE = 1e-5  # max abs difference of L2-normalised fp32 features (measured 1.2e-7)
SHAPES = [(300, 300), (180, 320), (600, 200)]  # height x width: 1:1, 16:9, 1:3


def _tiny_reference():
  """OpenCLIP's model for `tiny-naflex`: tiny-demo's text tower (the CLIP class) and a
  TimmModel whose trunk is timm's `naflexvit_base_patch16_siglip` model function in the
  tiny's shape (2 blocks of 128, 4 heads, a 4x4 position grid)."""
  config = model_cfg(clip_jax.get_config('tiny-demo').replace(embed_dim=128))
  config['vision_cfg'] = dict(image_size=64, timm_model_name='naflexvit_base_patch16_siglip',
                              timm_model_pretrained=False, timm_pool='map', timm_proj='none')
  trunk = dict(embed_dim=128, depth=2, num_heads=4, mlp_ratio=4.0, pos_embed_grid_size=(4, 4))
  return open_clip_model('tiny-naflex', config=config, trunk=trunk)


def _case(name):
  """(OpenCLIP model with a timm NaFlex trunk, the same architecture's clip_jax config)."""
  if name == 'tiny-naflex':
    return _tiny_reference(), clip_jax.get_config(name)
  return (open_clip_model(name, config=model_cfg(clip_jax.get_config(name)), text_layers=1,
                          trunk=dict(depth=1)),
          clip_jax.get_config(name, **{'vision.layers': 1, 'text.layers': 1}))


def _batch(patch, seq_len, seed=0):
  """Normalised random pixels at each of SHAPES' grids for `seq_len`, as NaFlex arrays."""
  rng = np.random.default_rng(seed)
  rows = []
  for height, width in SHAPES:
    grid_h, grid_w = grid_for_sequence(height, width, patch, seq_len)
    pixels = rng.normal(size=(grid_h * patch, grid_w * patch, 3)).astype(np.float32)
    rows.append(patchify(pixels, patch, seq_len))
  return tuple(np.stack(column) for column in zip(*rows))


def _features(model, arrays):
  """Normalised clip_jax image features of NaFlex arrays, under jit."""
  return np.asarray(jax.jit(lambda x: model.encode_image(x, normalize=True))(
      NaFlexPatches(*(jnp.asarray(a) for a in arrays))))


def _torch_naflex_features(torch_model, arrays):
  patches, coords, valid = (torch.from_numpy(a) for a in arrays)
  with torch.no_grad():
    pooled = torch_model.visual.trunk(patches, patch_coord=coords.long(), patch_valid=valid)
    return torch.nn.functional.normalize(torch_model.visual.head(pooled), dim=-1).numpy()


# --- preprocessing, against timm ------------------------------------------------------------

def test_grid_for_sequence_is_timms():
  """The largest grid that fits, as timm's bisection finds it, on 1,500 random sizes (a
  third under 40 px high) at SigLIP 2's lengths and two patch sizes."""
  rng = np.random.default_rng(0)
  for i in range(1500):
    height, width = (int(x) for x in rng.integers(1, 3000, 2))
    if i % 3 == 0:
      height = int(rng.integers(1, 40))
    seq_len, patch = int(rng.choice([16, 64, 256, 576, 1024])), int(rng.choice([14, 16]))
    _, (th, tw) = get_image_size_for_seq((height, width), patch, seq_len)
    assert grid_for_sequence(height, width, patch, seq_len) == (th // patch, tw // patch), (
        height, width, patch, seq_len)


def test_patches_coords_and_validity_are_timms():
  """An image resized to its grid and cut into patches, as timm's `patchify_image` (then
  padded: padding is zeros, at (0, 0), not valid)."""
  image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 200, 3), np.uint8))
  patches, coords, valid = naflex_patches(image, 16, 64)
  grid = grid_for_sequence(90, 200, 16, 64)
  assert grid == (5, 12) and valid.sum() == 60 and not valid[60:].any()
  resized = np.asarray(image.resize((12 * 16, 5 * 16), Image.Resampling.BICUBIC))
  timm_patches, timm_coords, timm_valid = patchify_image(
      torch.from_numpy(resized).permute(2, 0, 1), (16, 16))
  np.testing.assert_array_equal(patches[:60], timm_patches.numpy())
  np.testing.assert_array_equal(coords[:60], timm_coords.numpy())
  assert timm_valid.all()
  assert not patches[60:].any() and not coords[60:].any()


@pytest.mark.parametrize('grid', [(4, 4), (2, 9), (23, 7), (1, 1), (30, 30)])
def test_position_grid_resize_is_torchs_antialiased_bilinear(grid):
  """The learned [16, 16] table resized to a grid per image (shrinking one side, growing
  the other, both, neither) equals F.interpolate(bilinear, antialias=True, align_corners=
  False), read at each patch, with padding rows in the batch."""
  table = np.random.default_rng(2).normal(size=(256, 8)).astype(np.float32)
  rows, cols = grid
  coords = np.stack(np.divmod(np.arange(rows * cols), cols), axis=1)
  coords = np.concatenate([coords, np.zeros((5, 2), int)])[None].astype(np.int32)
  valid = (np.arange(rows * cols + 5) < rows * cols)[None]
  ours = np.asarray(resized_position_embedding(jnp.asarray(table), jnp.asarray(coords),
                                               jnp.asarray(valid)))[0, :rows * cols]
  grid_nchw = torch.from_numpy(table.reshape(1, 16, 16, 8)).permute(0, 3, 1, 2)
  theirs = torch.nn.functional.interpolate(grid_nchw, size=grid, mode='bilinear',
                                           align_corners=False, antialias=True)
  np.testing.assert_allclose(ours, theirs[0].permute(1, 2, 0).reshape(-1, 8).numpy(),
                             atol=2e-6)


# --- the model, against timm -----------------------------------------------------------------

@pytest.mark.parametrize('name', ['tiny-naflex', 'naflexvit_base_patch16_siglip'])
def test_import_matches_timm_at_three_aspect_ratios_and_two_lengths(name):
  """Image features equal timm's NaFlexVit's on the same patch sequences (SHAPES at the
  table's length and another: the grid resized down and up, wide and tall), text features
  OpenCLIP's, and the state_dict comes back key for key, bit for bit."""
  torch_model, cfg = _case(name)
  state = state_dict_numpy(torch_model)
  params = import_state_dict(cfg, state)
  model = model_from_params(cfg, params)
  for seq_len in (cfg.vision.grid ** 2, 64 if cfg.vision.grid > 8 else 4 * cfg.vision.grid ** 2):
    arrays = _batch(cfg.vision.patch_size, seq_len)
    diff = np.abs(_torch_naflex_features(torch_model, arrays) - _features(model, arrays)).max()
    assert diff <= TOLERANCE, (seq_len, diff)
  _, tokens = random_inputs(cfg.vision.image_size, cfg.text.context_length,
                            cfg.text.vocab_size)
  with torch.no_grad():
    ref_txt = torch_model.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
  assert np.abs(ref_txt - np.asarray(model.encode_text(jnp.asarray(tokens), normalize=True))
                ).max() <= TOLERANCE
  round_trip = params_to_open_clip(cfg, params)
  assert set(round_trip) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(round_trip[key], value, err_msg=key)


# --- padding and patch dropout -------------------------------------------------------------

def test_padding_changes_nothing():
  """Padding patches' pixels and coordinates are never read: noise, NaN and inf in them
  leave every feature bit for bit; an image padded longer gives its features (1e-6)."""
  model = perturbed_model('tiny-naflex')
  arrays = _batch(16, 32)
  patches, coords, valid = (a.copy() for a in arrays)
  rng = np.random.default_rng(5)
  noise = rng.normal(scale=50.0, size=patches[~valid].shape)
  noise[::2, ::7] = np.nan
  noise[1::2, ::5] = np.inf
  patches[~valid] = noise
  coords[~valid] = rng.integers(0, 40, size=coords[~valid].shape)
  np.testing.assert_array_equal(_features(model, arrays), _features(model, (patches, coords,
                                                                             valid)))
  longer = tuple(np.concatenate([a, np.zeros((3, 32) + a.shape[2:], a.dtype)], axis=1)
                 for a in arrays)
  np.testing.assert_allclose(_features(model, longer), _features(model, arrays), atol=1e-6)


def test_patch_dropout_drops_real_patches_only():
  """Each image keeps max(1, int(V * (1 - rate))) of its V real patches (drawn by its own
  key, distinct) in a static `int(N * (1 - rate))` slots, the rest flagged padding; the
  train-mode features depend on the key, eval features on none."""
  n, rate = 40, 0.5
  counts = np.array([40, 23, 3, 1])
  valid = jnp.asarray(np.arange(n)[None, :] < counts[:, None])
  keys = jax.random.split(jax.random.key(0), 4)
  kept, kept_valid = (np.asarray(a) for a in kept_valid_patches(keys, valid, rate))
  assert kept.shape == kept_valid.shape == (4, 20)
  for row, count in enumerate(counts):
    real = kept[row][kept_valid[row]]
    assert len(real) == max(1, int(count * (1 - rate))), row
    assert len(set(real.tolist())) == len(real) and (real < count).all(), row
  other, _ = kept_valid_patches(jax.random.split(jax.random.key(1), 4), valid, rate)
  assert not np.array_equal(np.asarray(other)[0], kept[0])
  model = perturbed_model('tiny-naflex', **{'vision.patch_dropout': 0.5})
  images = NaFlexPatches(*(jnp.asarray(a) for a in _batch(16, 32)))
  one, two = (np.asarray(model.encode_image(images, dropout_keys=jax.random.split(
      jax.random.key(seed), 3))) for seed in (0, 1))
  assert not np.allclose(one, two)
  np.testing.assert_array_equal(np.asarray(model.encode_image(images)),
                                np.asarray(model.encode_image(images)))


def test_sharded_forward_equals_one_device():
  """8 devices (data 2, fsdp 2, tensor 2), scanned layers: the NaFlex arrays split over the
  batch axes give the single-device features."""
  cfg = clip_jax.get_config('tiny-naflex', scan_layers=True)
  params = get_params(perturbed_model('tiny-naflex', scan_layers=True))
  functional = FunctionalModel.create(cfg)
  arrays = tuple(np.concatenate([a, a[::-1], a[:2]]) for a in _batch(16, 32))  # 8 images

  def features(params, arrays):
    return functional.bind(params).encode_image(NaFlexPatches(*arrays), normalize=True)

  single = jax.jit(features)(params, arrays)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  sharded_params = jax.device_put(params, sharding.param_shardings(functional.abstract, mesh))
  batch = jax.device_put(arrays, sharding.batch_sharding(mesh))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    sharded = jax.jit(features)(sharded_params, batch)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=2e-6)


def _naflex_step(devices, **flat):
  """One train step of tiny-naflex (patch dropout 0.5) on 16 NaFlex images of SHAPES' grids
  at 32 tokens (padding in most rows): (loss, gradients), read off one SGD step at lr 1e4
  (large, so the parameters' own rounding does not blur the gradient)."""
  config = base_config()
  config.update_from_flattened_dict({
      'model.name': 'tiny-naflex', 'model.vision.patch_dropout': 0.5, 'batch_size': 16,
      'model.text.vocab_size': 256, 'data.naflex.seq_lens': (32,), 'optim.warmup_steps': 0,
      **flat})
  mesh = sharding.make_mesh({'data': -1}, jax.devices()[:devices])
  program = step_lib.build(run_config.resolve(config, devices, data=False), mesh,
                           tx=optax.sgd(1e4))
  before = jax.tree.map(np.asarray, program.state['params'])
  rng = np.random.default_rng(3)
  rows = [naflex_patches(Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)), 16, 32)
          for h, w in SHAPES * 6][:16]
  patches, coords, valid = (np.stack(column) for column in zip(*rows))
  text = rng.integers(1, 255, (16, program.model.cfg.text.context_length)).astype(np.int32)
  text[:, -1] = 255
  batch = {'patches': patches, 'coords': coords, 'valid': valid, 'text': text}
  state, metrics = program.step(program.state, jax.device_put(batch, program.batch_sharding))
  return float(metrics['loss']), jax.tree.map(lambda b, a: (b - np.asarray(a)) / 1e4, before,
                                              state['params'])


def test_feature_cache_and_8_devices_give_the_one_device_naflex_step():
  """NaFlex batches (mixed grids, padding, patch dropout) through the real train step: 8
  devices, one-shot and with the feature cache's 2 micro-batches over scanned, fully
  rematerialised layers, give one device's loss and gradients (each image drops the same
  patches however the batch is split), within 1e-5 of each leaf's largest entry."""
  expected_loss, expected = _naflex_step(1)
  for flat in ({}, {'optim.grad_accum': 2, 'model.scan_layers': True, 'model.remat': 'full'}):
    loss, grads = _naflex_step(8, **flat)
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-5, err_msg=str(flat))
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
      assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), flat


# --- interchange ---------------------------------------------------------------------------

@pytest.mark.slow
def test_export_loads_strictly_in_open_clip(tmp_path):
  """naflexvit_base_patch16_siglip (the whole trunk: OpenCLIP builds timm trunks by name; one
  text layer) exports as an OpenCLIP TimmModel over timm's NaFlexVit; OpenCLIP's
  encode_image on square 256 px images equals ours on their 16x16 NaFlex sequences."""
  model = perturbed_model('naflexvit_base_patch16_siglip', **{'text.layers': 1})
  cfg = model.cfg
  save_model(tmp_path / 'ckpt', cfg, get_params(model))
  out = export(str(tmp_path / 'ckpt'), str(tmp_path / 'open_clip'))
  torch_model = open_clip.create_model(f'local-dir:{out}').eval()
  assert type(torch_model.visual.trunk).__name__ == 'NaFlexVit'
  images, tokens = random_inputs(256, cfg.text.context_length, cfg.text.vocab_size, seed=3)
  ref_img, ref_txt = torch_features(torch_model, images, tokens)
  arrays = tuple(np.stack(c) for c in zip(*(patchify(image, 16, 256) for image in images)))
  assert np.abs(ref_img - _features(model, arrays)).max() <= TOLERANCE
  assert np.abs(ref_txt - jax_features(model, images, tokens)[1]).max() <= TOLERANCE


@pytest.mark.parametrize('fixed', ['ViT-B-16-SigLIP2-256', 'ViT-B-16-SigLIP2-384'])
def test_a_fixed_resolution_siglip2_checkpoint_starts_a_naflex_model(fixed):
  """OpenCLIP's fixed-resolution SigLIP 2 state_dict (timm's trunk, conv patch embedding)
  imports into naflexvit_base_patch16_siglip: the same weights, a 24x24 position grid
  resized to the 16x16 table by OpenCLIP's rule. At 256 px (no resize) the NaFlex model,
  with the fixed trunk's exact GELU, gives OpenCLIP's features on the square images' 16x16
  sequences."""
  torch_model = open_clip_model(fixed, text_layers=1, trunk=dict(depth=1))
  state = state_dict_numpy(torch_model)
  cfg = clip_jax.get_config('naflexvit_base_patch16_siglip', **{
      'vision.layers': 1, 'text.layers': 1, 'vision.act': 'gelu'})
  params = import_state_dict(cfg, state)
  table = state['visual.trunk.pos_embed'][0]
  if fixed.endswith('384'):
    np.testing.assert_array_equal(params['visual']['pos_embed'],
                                  resize_image_pos_embed(table, 16, 0))
    return
  np.testing.assert_array_equal(params['visual']['pos_embed'], table)
  images, _ = random_inputs(256, 64, 256000, seed=4)
  with torch.no_grad():
    ref = torch_model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2),
                                   normalize=True).numpy()
  arrays = tuple(np.stack(c) for c in zip(*(patchify(image, 16, 256) for image in images)))
  model = model_from_params(cfg, params)
  assert np.abs(ref - _features(model, arrays)).max() <= TOLERANCE


# --- bad input ------------------------------------------------------------------------------

def test_impossible_naflex_configs_fail_naming_the_field():
  with pytest.raises(ValueError, match='vision.naflex needs vision.class_token=False'):
    clip_jax.get_config('tiny-naflex', **{'vision.class_token': True, 'vision.pool': 'tok'})
  with pytest.raises(ValueError, match='vision.naflex needs a plain ViT'):
    clip_jax.get_config('tiny-pe-core', **{'vision.naflex': True})
  with pytest.raises(UnsupportedForOpenCLIP):
    model_cfg(clip_jax.get_config('tiny-naflex'))


# --- NaFlex batches: token budget, lengths, resume --------------------------------------------

def _write_mixed_shards(root, n_shards=4, per_shard=30):
  """JPEGs of many aspect ratios (wide, tall, square; 17 to 160 px a side)."""
  rng = np.random.default_rng(0)
  writer = ShardWriter(root, per_shard)
  for i in range(n_shards * per_shard):
    height, width = (int(x) for x in rng.integers(17, 161, 2))
    pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG')
    writer.write(buffer.getvalue(), 'jpg', f'sample {i}')
  writer.close()
  return f'{root}/{{00000..{n_shards - 1:05d}}}.tar'


def _naflex_config(spec, workers=0, **batching):
  batching = {'patch_size': 16, 'seq_lens': (16, 24, 64), 'max_tokens_per_batch': 512,
              'batch_multiple': 4, **batching}
  return PipelineConfig(global_batch_size=0, image_size=64, tokenizer=TOKENIZER, train=spec,
                        shuffle_window=8, cycle_length=2, workers=workers,
                        naflex=NaFlexBatching(**batching))


def test_token_budget_batches_stay_within_budget_and_near_it(tmp_path):
  """100 batches: each at one of the lengths (all three drawn), examples x length within
  the budget and above 90% of it, the batch a multiple of 4; real patches fill each image's
  grid at the batch's length (grid_for_sequence of its crop)."""
  loader = Loader(_naflex_config(_write_mixed_shards(tmp_path / 's')))
  lengths = set()
  for _ in range(100):
    batch = next(loader)
    size, length = batch['valid'].shape
    lengths.add(length)
    assert 0.9 * 512 < size * length <= 512 and size % 4 == 0, (size, length)
    assert batch['patches'].shape == (size, length, 16 * 16 * 3)
    assert batch['text'].shape[0] == size and batch['patches'].dtype == np.uint8
    for coords, valid in zip(batch['coords'], batch['valid']):
      rows, cols = coords[valid].max(axis=0) + 1
      assert valid.sum() == rows * cols <= length and valid[:rows * cols].all()
  loader.close()
  assert lengths == {16, 24, 64}


def test_images_smaller_than_a_patch_are_upscaled_and_counted(tmp_path):
  """A 3x5 px image, a 4 px high banner and a 4 px wide strip (patch 16) train as the rest:
  upscaled to at least one patch row or column (the banner: 1 row, the strip: 1 column),
  counted as `upscaled/smaller_than_patch`; the 20 others are not."""
  writer = ShardWriter(tmp_path / 's', 100)
  sizes = [(3, 5), (4, 300), (300, 4)] + [(40 + i, 70) for i in range(20)]  # height, width
  for i, (height, width) in enumerate(sizes):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 9 * i, np.uint8)).save(buffer, 'PNG')
    writer.write(buffer.getvalue(), 'png', f'sample {i}')
  writer.close()
  cfg = PipelineConfig(global_batch_size=0, image_size=64, tokenizer=TOKENIZER,
                       train=f'{tmp_path}/s/00000.tar', shuffle_window=1, augment='center_crop',
                       num_epochs=1, naflex=NaFlexBatching(16, (16, 24), 24))  # 1 per batch
  loader = Loader(cfg)
  grids = []
  for batch in loader:
    for coords, valid in zip(batch['coords'], batch['valid']):
      grids.append(tuple(int(n) for n in coords[valid].max(axis=0) + 1))
  assert len(grids) == 23 and loader.upscaled == {'smaller_than_patch': 3}, loader.upscaled
  assert grids[1][0] == 1 and grids[2][1] == 1 and min(map(min, grids[3:])) > 1, grids[:3]


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_gives_the_same_lengths_and_batches(tmp_path, workers):
  """A loader restored from a state taken mid-stream (through JSON, as a checkpoint keeps
  it) gives the uninterrupted stream's next batches: lengths, patches, coordinates, text;
  with 2 worker processes the lengths still follow the global batch index."""
  cfg = _naflex_config(_write_mixed_shards(tmp_path / 's'), workers=workers)
  reference = Loader(cfg)
  expected = [next(reference) for _ in range(12)]
  reference.close()
  assert [b['valid'].shape[1] for b in expected] == [
      cfg.naflex.seq_len(i) for i in range(12)]
  first = Loader(cfg)
  for _ in range(7):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = Loader(cfg)
  resumed.set_state(state)
  for want in expected[7:]:
    got = next(resumed)
    for key in ('patches', 'coords', 'valid', 'text'):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  resumed.close()


def test_a_budget_that_holds_no_batch_names_the_key():
  with pytest.raises(ValueError, match=r'data.naflex.max_tokens_per_batch=100 holds no batch '
                                       r'at seq_len 64'):
    NaFlexBatching(patch_size=16, seq_lens=(16, 64), max_tokens_per_batch=100,
                   batch_multiple=4)


# --- the train binary ----------------------------------------------------------------------

def _naflex_run(demo_data, steps, *extra):
  """tiny-naflex on the tests' demo data through the train binary: lengths 8, 16 and 32
  under a budget of 32 x 32 tokens, 8 devices; zero-shot on the (square) eval shards."""
  return helpers.overrides(
      steps, '--config.model.name=tiny-naflex', "--config.data.naflex.seq_lens=(8, 16, 32)",
      '--config.batch_size=32', '--config.log_every=1', '--config.checkpoint_every=4',
      '--config.data.workers=0', *extra)


@pytest.mark.slow
def test_sigkill_then_restart_matches_an_uninterrupted_run(demo_data, tmp_path):
  """The train binary on NaFlex batches (their sizes following the lengths: 128, 64 and 32
  images), killed mid-run and restarted: the same losses, batch sizes and final params as
  an uninterrupted run; the zero-shot eval reads the square eval images."""
  common = _naflex_run(demo_data, 12, '--config.eval_every=12')
  straight, _ = helpers.killed_and_restarted(tmp_path, common, helpers.demo_config(demo_data),
                                             steps=12, kill_at=6)
  assert 0 <= straight[12]['zeroshot_top1'] <= 1


def _split_by_shape(shards, out):
  """The held-out images of `shards` into out/{wide,square,tall}/00000.tar, by their shape."""
  writers = {}
  for record in (r for shard in sorted(shards.glob('*.tar')) for r in read_shard(str(shard))):
    width, height = Image.open(io.BytesIO(record.image)).size
    shape = 'square' if width == height else 'wide' if width > height else 'tall'
    writer = writers.setdefault(shape, ShardWriter(out / shape, 10_000))
    writer.write(record.image, 'jpg', record.caption, json.loads(record.meta))
  for writer in writers.values():
    writer.close()


@pytest.mark.slow
def test_naflex_demo_learns_and_beats_square_crops_on_wide_and_tall_images(tmp_path):
  """`configs/demo.py:model=tiny-naflex` (4:1, square and 1:4 canvases, each seen whole at
  16 tokens), 750 steps: held-out zero-shot top-1 >= 80%; and its twin, the same model as a
  plain ViT (`vision.naflex=False`) trained on square crops of the same images for as many
  steps, scores lower on held-out wide and tall images (its centre crops) than the NaFlex
  model does on them whole. Measured at 1,000 steps: docs/models.md."""
  data, steps = tmp_path / 'data', 750
  config = f'{helpers.DEMO_CONFIG}:model=tiny-naflex,steps={steps},data_dir={data}'
  runs = {'naflex': [], 'square': ['--config.model.vision.naflex=False',
                                   '--config.data.naflex.seq_lens=()']}
  for name, extra in runs.items():
    helpers.run(helpers.train_cmd(tmp_path / name, f'--config.eval_every={steps}', *extra,
                                  config=config), helpers.env(1), timeout=1500)
  assert helpers.metrics(tmp_path / 'naflex')[steps]['zeroshot_top1'] >= 0.8
  _split_by_shape(tmp_path / 'data_wide_and_tall' / 'eval', tmp_path / 'held_out')
  (tmp_path / 'templates.txt').write_text('\n'.join(demo.TEMPLATES) + '\n')
  top1 = {}
  for name, length in (('naflex', ['--seq_len', '16']), ('square', [])):
    for shape in ('wide', 'tall'):
      spec = f'{tmp_path}/held_out/{shape}/*.tar'
      results = evaluate(parse_args([
          f'--workdir={tmp_path / name}', f'--zeroshot_shards={spec}', *length,
          f'--classnames={data}_wide_and_tall/classnames.txt',
          f'--templates={tmp_path}/templates.txt']))
      top1[name, shape] = next(iter(results['zeroshot'].values()))['top1']
  for shape in ('wide', 'tall'):
    assert top1['naflex', shape] > top1['square', shape] + 0.1, top1


def test_naflex_keys_and_model_must_agree(demo_data, tmp_path):
  """A NaFlex model without lengths, or lengths for a square model (training or eval), or a
  budget holding no batch: one line naming the key, exit 2, before any compute."""
  config = helpers.demo_config(demo_data)
  cases = [(['--config.model.name=tiny-naflex'], 'config.data.naflex.seq_lens is empty'),
           (["--config.data.naflex.seq_lens=(16,)"], 'is not a NaFlex model'),
           (['--config.model.name=tiny-naflex', "--config.data.naflex.seq_lens=(16, 64)",
             '--config.data.naflex.max_tokens_per_batch=50'],
            'data.naflex.max_tokens_per_batch=50 holds no batch'),
           (['--config.eval.seq_len=16'], 'config.eval.seq_len=16: the model is not a NaFlex')]
  for extra, message in cases:
    result = subprocess.run(helpers.train_cmd(tmp_path / 'w', '--config.total_steps=1', *extra,
                                              config=config),
                            env=helpers.env(1), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 2 and message in result.stderr, (extra, result.stderr[-800:])


def test_the_demo_generator_draws_wide_and_tall_canvases(tmp_path):
  """`aspects` draws each canvas's width / height from the list (64² pixels each, every ratio
  met); each group's box is in the canvas and its shapes' colour is inside the box."""
  make_demo(str(tmp_path), train_samples=60, eval_samples=20, samples_per_shard=100,
            aspects=(0.25, 1.0, 4.0))
  sizes = set()
  for record in read_shard(str(tmp_path / 'train' / '00000.tar')):
    image = np.asarray(Image.open(io.BytesIO(record.image)).convert('RGB'), np.int32)
    sizes.add(image.shape[:2])
    box = json.loads(record.meta)['objects'][0]['box']
    colour = np.asarray(COLOURS[json.loads(record.meta)['objects'][0]['class'].split()[0]])
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(v * s) for v, s in zip(box, (width, height, width, height)))
    inside = np.abs(image[y0:y1 + 1, x0:x1 + 1] - colour).sum(-1) < 60
    assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1 and inside.any()
  assert sizes == {canvas_of(64, a)[::-1] for a in (0.25, 1.0, 4.0)} == {(128, 32), (64, 64),
                                                                         (32, 128)}


# --- evaluation, embedding and `load` at a chosen length -------------------------------------

@pytest.fixture(scope='module')
def naflex_checkpoint(tmp_path_factory):
  """tiny-naflex with random perturbed weights, and labelled demo images on 1:4, 1:1 and 4:1
  canvases (24 eval images, 40 class names)."""
  root = tmp_path_factory.mktemp('naflex_eval')
  model = perturbed_model('tiny-naflex')
  checkpoint = save_model(root / 'ckpt', model.cfg, get_params(model))
  make_demo(str(root / 'demo'), train_samples=1, eval_samples=24, samples_per_shard=100,
            aspects=(0.25, 1.0, 4.0))
  # The demo repeats captions; numbered ones make every retrieval rank free of ties.
  writer = ShardWriter(root / 'data' / 'eval', 100)
  for i, record in enumerate(read_shard(str(root / 'demo' / 'eval' / '00000.tar'))):
    writer.write(record.image, 'png', f'{record.caption} number {i}', json.loads(record.meta))
  writer.close()
  (root / 'data' / 'classnames.txt').write_text((root / 'demo' / 'classnames.txt').read_text())
  return checkpoint, root / 'data'


def _reference_features(checkpoint, images, seq_len):
  """One image at a time through the public API: `clip_jax.load(seq_len=...)`'s preprocess
  and `encode_image` on one device, no batching or padding rows."""
  model, preprocess, _ = clip_jax.load(str(checkpoint), seq_len=seq_len)
  encode = jax.jit(lambda x: model.encode_image(x, normalize=True))
  return np.concatenate([np.asarray(encode(jax.tree.map(lambda a: a[None], preprocess(image))))
                         for image in images])


def _eval_images(data):
  """(images, labels, captions) of the demo's eval shard."""
  records = list(read_shard(str(data / 'eval' / '00000.tar')))
  return ([Image.open(io.BytesIO(r.image)).convert('RGB') for r in records],
          [json.loads(r.meta)['label'] for r in records], [r.caption for r in records])


def test_evaluate_scores_each_length_as_the_one_image_reference(naflex_checkpoint):
  """`clip_jax.evaluate --seq_len 16 32`: each image at its own aspect ratio, batched with
  others of other shapes (padding rows, 8 devices); zero-shot top-1/top-5 and retrieval
  recalls per length equal those of one-image-at-a-time features, and each length is its
  own results entry."""
  checkpoint, data = naflex_checkpoint
  spec = f'{data}/eval/*.tar'
  results = evaluate(parse_args([f'--checkpoint={checkpoint}', f'--zeroshot_shards={spec}',
                                 f'--classnames={data}/classnames.txt', '--templates=simple',
                                 f'--retrieval_shards={spec}', '--batch_size=16',
                                 '--seq_len', '16', '32']))
  images, labels, captions = _eval_images(data)
  model, _, tokenizer = clip_jax.load(str(checkpoint))
  classnames = (data / 'classnames.txt').read_text().splitlines()
  classifier = build_classifier(lambda t: model.encode_text(t, normalize=True), tokenizer,
                                classnames, load_templates('simple'))
  texts = np.asarray(model.encode_text(tokenizer(captions), normalize=True))
  features = {}
  for seq_len in (16, 32):
    features[seq_len] = _reference_features(checkpoint, images, seq_len)
    expected = {**zeroshot.accuracy(features[seq_len] @ classifier.T, labels),
                **retrieval.recall_at_k(features[seq_len], texts, np.arange(len(images)))}
    found = {**results['zeroshot'][f'{spec}@seq_len={seq_len}'],
             **results['retrieval'][f'{spec}@seq_len={seq_len}']}
    assert found['seq_len'] == seq_len and found['data'] == spec and found['num_images'] == 24
    assert {k: found[k] for k in expected} == pytest.approx(expected, abs=1e-9)
  assert not np.allclose(features[16], features[32], atol=1e-3)  # the lengths were used
  saved = json.loads((checkpoint / 'eval_results.json').read_text())
  assert set(saved['zeroshot']) == {f'{spec}@seq_len=16', f'{spec}@seq_len=32'}


def test_embed_at_a_length_matches_load_and_refuses_another_length(naflex_checkpoint, tmp_path):
  """`clip_jax.embed --seq_len 16`: the image features are `load(seq_len=16)`'s, image by
  image; a rerun into the same folder at another length is refused, naming seq_len."""
  checkpoint, data = naflex_checkpoint
  args = ['--checkpoint', str(checkpoint), '--shards', str(data / 'eval' / '00000.tar'),
          '--out', str(tmp_path / 'out'), '--modalities', 'image', '--batch_size', '16']
  summary = embed(embed_args([*args, '--seq_len', '16']))
  assert summary['samples'] == 24
  embedded = np.load(tmp_path / 'out' / 'img_emb' / 'img_emb_0.npy').astype(np.float32)
  images, _, _ = _eval_images(data)
  np.testing.assert_allclose(embedded, _reference_features(checkpoint, images, 16), atol=2e-3)
  with pytest.raises(ValueError, match="seq_len differs: 16 there, 32 now"):
    embed(embed_args([*args, '--seq_len', '32']))


def test_a_length_for_a_square_model_fails_naming_the_flag(naflex_checkpoint, tmp_path, capsys):
  """--seq_len on a square model: exit 2, one line naming the flag, before any compute;
  `load(seq_len=...)` names its argument."""
  _, data = naflex_checkpoint
  square = clip_jax.create_model('tiny')
  checkpoint = save_model(tmp_path / 'square', square.cfg, get_params(square))
  with pytest.raises(SystemExit) as exit_:
    main([f'--checkpoint={checkpoint}', f'--zeroshot_shards={data}/eval/*.tar',
          f'--classnames={data}/classnames.txt', '--seq_len', '16'])
  assert exit_.value.code == 2
  assert '--seq_len=16: the model is not a NaFlex model' in capsys.readouterr().err
  with pytest.raises(ValueError, match='seq_len=16: the model is not a NaFlex model'):
    clip_jax.load(str(checkpoint), seq_len=16)
