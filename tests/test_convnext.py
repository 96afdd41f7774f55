"""The ConvNeXt image towers (timm `convnext_*` trunk, OpenCLIP's TimmModel head).

Parity both ways with OpenCLIP's own models (random fp32 weights, every weight perturbed):
`tiny-convnext` (timm's convnext_atto, whole) and reduced-depth copies of convnext_base's
and convnext_large_d's exact configs (fewer blocks per stage, the same widths). Then the
exported preprocessing, sharding, stochastic depth, configs through JSON, FLOP counts and
the errors a user meets.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import clip_jax
from clip_jax import sharding
from clip_jax.checkpoint import load_model_config, save_model
from clip_jax.convert.open_clip import CheckpointMismatchError, params_to_open_clip
from clip_jax.convert.open_clip_config import (
  UnsupportedForOpenCLIP,
  model_cfg,
  open_clip_config,
  preprocess_cfg,
)
from clip_jax.export import SAFETENSORS_NAME, export
from clip_jax.import_open_clip import import_state_dict
from clip_jax.metrics import convnext_flops, tower_flops, train_flops_per_sample
from clip_jax.models.config import CLIPConfig, ConvNeXtConfig
from clip_jax.models.convnext import drop_path
from clip_jax.models.functional import FunctionalModel, get_params, model_from_params
from tests import helpers
from tests.jax_reference import jax_features, perturbed_model, random_inputs
from tests.reference import open_clip_model, state_dict_numpy, torch_features

# Max abs difference on L2-normalised fp32 features, as tests/test_parity.py (the issue's
# 1e-4 relative is looser: correct mappings land near 3e-7).
TOLERANCE = 1e-5

CONVNEXT_PRESETS = ['convnext_tiny', 'convnext_small', 'convnext_base', 'convnext_base_w',
                    'convnext_base_w_320', 'convnext_large', 'convnext_large_d',
                    'convnext_large_d_320', 'convnext_xlarge', 'convnext_xxlarge',
                    'convnext_xxlarge_320']

# (preset, blocks per stage or None for all of them)
IMPORT_CASES = [('tiny-convnext', None),
                ('convnext_base', (1, 1, 2, 1)),      # the exact config, fewer blocks
                ('convnext_large_d', (1, 1, 1, 1))]   # OpenCLIP's MLP head, 256 px


def _overrides(depths):
  return {'text.layers': 2, **({'vision.depths': depths} if depths else {})}


def _assert_close(reference, ours, what):
  diff = float(np.abs(reference - ours).max())
  assert diff <= TOLERANCE, f'{what}: max abs diff {diff:.3g} > {TOLERANCE}'


def test_every_open_clip_convnext_config_is_a_preset():
  names = {n for n in open_clip.list_models() if n.startswith('convnext_')}
  assert names == set(CONVNEXT_PRESETS)
  assert set(CONVNEXT_PRESETS) <= set(clip_jax.list_models())
  assert 'tiny-convnext' in clip_jax.list_models()


@pytest.mark.parametrize('name', CONVNEXT_PRESETS)
def test_preset_exports_open_clips_own_config(name):
  """model_cfg is OpenCLIP's JSON config for the name (the same dict, key for key)."""
  ours = model_cfg(clip_jax.get_config(name))
  theirs = open_clip.get_model_config(name)
  assert ours.pop('quick_gelu') is False and ours.pop('init_logit_scale') == pytest.approx(
      math.log(1 / 0.07))
  text = dict(ours['text_cfg'])
  assert {k: text[k] for k in theirs['text_cfg']} == theirs['text_cfg']
  assert ours['vision_cfg'] == theirs['vision_cfg']
  assert ours['embed_dim'] == theirs['embed_dim']


@pytest.mark.parametrize('name,depths', IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_import_matches_open_clip(name, depths):
  torch_model = open_clip_model(name, text_layers=2, vision_depths=depths)
  cfg = clip_jax.get_config(name, **_overrides(depths))
  state = state_dict_numpy(torch_model)
  params = import_state_dict(cfg, state)
  model = model_from_params(cfg, params)
  images, tokens = random_inputs(cfg.vision.image_size, cfg.text.context_length,
                                 cfg.text.vocab_size)
  ref_img, ref_txt = torch_features(torch_model, images, tokens)
  img, txt = jax_features(model, images, tokens)
  _assert_close(ref_img, img, f'{name} image features')
  _assert_close(ref_txt, txt, f'{name} text features')
  # And back: the same state_dict, key for key and bit for bit.
  round_trip = params_to_open_clip(cfg, params)
  assert set(round_trip) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(round_trip[key], value, err_msg=key)


def test_export_loads_strictly_in_open_clip(tmp_path):
  model = perturbed_model('tiny-convnext')
  cfg = model.cfg
  save_model(tmp_path / 'ckpt', cfg, get_params(model))
  out = export(str(tmp_path / 'ckpt'), str(tmp_path / 'open_clip'))
  torch_model, _, _ = open_clip.create_model_and_transforms(f'local-dir:{out}')
  torch_model.eval()
  exported = load_file(out / SAFETENSORS_NAME)
  reference_state = torch_model.state_dict()
  assert set(exported) == set(reference_state)
  for key, value in exported.items():
    assert tuple(value.shape) == tuple(reference_state[key].shape), key
  images, tokens = random_inputs(cfg.vision.image_size, cfg.text.context_length,
                                 cfg.text.vocab_size, seed=3)
  ref_img, ref_txt = torch_features(torch_model, images, tokens)
  img, txt = jax_features(model, images, tokens)
  _assert_close(ref_img, img, 'tiny-convnext image features')
  _assert_close(ref_txt, txt, 'tiny-convnext text features')
  written = json.loads((out / 'open_clip_config.json').read_text())
  assert written['model_cfg']['vision_cfg']['timm_model_name'] == 'convnext_atto'
  assert written['preprocess_cfg'] == _as_written(torch_model.visual.preprocess_cfg)


def _as_written(cfg):
  """OpenCLIP's final preprocess_cfg as JSON holds it: lists, and a square size as one int
  (OpenCLIP sets the timm tower's (size, size) tuple; it reads either form)."""
  out = dict(cfg, mean=list(cfg['mean']), std=list(cfg['std']))
  size = out['size']
  if isinstance(size, (tuple, list)) and len(set(size)) == 1:
    out['size'] = size[0]
  return out


@pytest.mark.parametrize('name', ['convnext_base', 'convnext_base_w_320'])
def test_exported_preprocess_cfg_is_open_clips(name):
  with torch.device('meta'):  # shapes only: no weights are made
    torch_model = open_clip.create_model(name, device='meta')
  theirs = _as_written(torch_model.visual.preprocess_cfg)
  ours = preprocess_cfg(clip_jax.get_config(name))
  assert ours == theirs
  assert open_clip_config(clip_jax.get_config(name))['preprocess_cfg'] == theirs


def test_sharded_forward_equals_one_device():
  """8 devices, params FSDP-sharded (conv kernels over their output channels) and the batch
  split: the same features as on one device."""
  cfg = clip_jax.get_config('tiny-convnext')
  model = perturbed_model('tiny-convnext')
  params = get_params(model)
  functional = FunctionalModel.create(cfg)
  images = jnp.asarray(random_inputs(cfg.vision.image_size, 32, 1000, batch=8)[0])

  def features(params, images):
    return functional.bind(params).encode_image(images, normalize=True)

  single = jax.jit(features)(params, images)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  shardings = sharding.param_shardings(functional.abstract, mesh)
  spec = lambda *path: jax.tree.map(lambda s: s.spec,
                                    shardings['visual'][path[0]][path[1]][path[2]])
  assert spec('stage1', 'down', 'kernel') == P(None, None, None, 'fsdp')
  assert spec('stage2', 'blocks', 'conv_dw')['kernel'] == P(None, None, None, None, 'fsdp')
  assert spec('stage2', 'blocks', 'mlp')['fc1']['kernel'] == P(None, 'fsdp', None)
  assert shardings['visual']['stem']['kernel'].spec == P(None, None, None, 'fsdp')
  sharded_params = jax.device_put(params, shardings)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    sharded = jax.jit(features)(sharded_params, jax.device_put(images,
                                                                sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=2e-6)


def test_stochastic_depth_only_with_keys():
  """drop_path draws per image and only given keys; rates rise linearly as timm's."""
  cfg = clip_jax.get_config('tiny-convnext', **{'vision.drop_path': 0.5})
  assert cfg.vision.drop_path_rates[0][0] == 0.0 and cfg.vision.drop_path_rates[-1][-1] == 0.5
  flat = [r for stage in cfg.vision.drop_path_rates for r in stage]
  np.testing.assert_allclose(flat, np.linspace(0, 0.5, sum(cfg.vision.depths)), rtol=1e-6)
  model = clip_jax.create_model(cfg)
  images = jnp.asarray(random_inputs(32, 32, 1000, batch=4)[0])
  keys = jax.random.split(jax.random.key(0), 4)
  plain = model.encode_image(images)
  np.testing.assert_array_equal(plain, model.encode_image(images))
  dropped = model.encode_image(images, dropout_keys=keys)
  assert not np.allclose(plain, dropped)
  # An image's draw depends on its own key only.
  np.testing.assert_allclose(dropped[:2], model.encode_image(images[:2], dropout_keys=keys[:2]),
                             rtol=1e-5, atol=1e-5)
  # timm's DropPath: each image kept with probability 1 - rate, the kept ones scaled.
  h = jnp.ones((4000, 1, 1, 1))
  out = drop_path(h, jnp.float32(0.25), jax.random.split(jax.random.key(1), 4000), jnp.int32(3))
  values = np.unique(np.asarray(out))
  np.testing.assert_allclose(values, [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float((out > 0).mean()) - 0.75) < 0.03


def test_config_round_trips_through_json_and_checkpoints(tmp_path):
  cfg = clip_jax.get_config('convnext_large_d', **{'vision.depths': (1, 1, 1, 1)})
  d = json.loads(json.dumps(cfg.to_dict()))
  assert d['vision']['kind'] == 'convnext'
  assert CLIPConfig.from_dict(d) == cfg
  small = clip_jax.get_config('tiny-convnext')
  save_model(tmp_path / 'ckpt', small, get_params(clip_jax.create_model(small)))
  assert load_model_config(tmp_path / 'ckpt') == small
  # ViT configs written before `kind` existed still read as ViTs.
  assert CLIPConfig.from_dict(json.loads(json.dumps(clip_jax.get_config('tiny').to_dict()))
                              ) == clip_jax.get_config('tiny')
  # String overrides (the trainer's, import_open_clip's) are typed.
  assert clip_jax.get_config('convnext_base', **{'vision.depths': '(1, 1, 2, 1)'}
                             ).vision.depths == (1, 1, 2, 1)


def test_analytic_flops_match_xla_cost_analysis():
  """The ConvNeXt count (convs, MLPs, head) against XLA's for the unrolled forward pass of a
  model wide enough that matmuls dominate (norms and GELUs are left out of the count)."""
  cfg = clip_jax.get_config('tiny-convnext', **{'vision.dims': (128, 256, 512, 1024),
                                                 'vision.image_size': 64,
                                                 'scan_layers': False})
  functional = FunctionalModel.create(cfg)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), functional.shapes(),
                        is_leaf=lambda x: isinstance(x, tuple))
  compiled = jax.jit(lambda p, x: functional.bind(p).encode_image(x)).lower(
      params, images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = 2 * convnext_flops(cfg.vision, cfg.embed_dim)
  assert 0.95 < cost['flops'] / analytic < 1.15, (cost['flops'], analytic)
  # The training count is 3x the towers' forward passes.
  t = cfg.text
  assert train_flops_per_sample(cfg, 32) == pytest.approx(
      3 * (convnext_flops(cfg.vision, cfg.embed_dim) + tower_flops(t.layers, 32, t.width,
                                                                   t.mlp_dim)))


def test_convnext_base_flops_by_hand():
  """convnext_base at 224: timm's model card says 15.4 GMACs (multiply-adds); the count here
  is in FLOPs, 2 per multiply-add."""
  v = clip_jax.get_config('convnext_base').vision
  gmacs = convnext_flops(v, 512) / 2e9
  assert gmacs == pytest.approx(15.35, rel=0.01)


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_convnext_demo_learns(tmp_path):
  """The CPU demo with `model=tiny-convnext`, 1,500 steps (1.5x the demo's budget, within
  the 2x the issue allows): held-out zero-shot top-1 >= 80% (chance 2.5%; measured 87.3%
  here and 88.8% on the default demo data, 77.4% at 1,250: docs/models.md)."""
  workdir = tmp_path / 'run'
  config = f'{helpers.DEMO_CONFIG}:model=tiny-convnext,steps=1500,data_dir={tmp_path / "data"}'
  helpers.run(helpers.train_cmd(workdir, '--config.eval_every=1500', config=config),
              helpers.env(1), timeout=3000)
  assert helpers.metrics(workdir)[1500]['zeroshot_top1'] >= 0.8


def test_a_convnext_checkpoint_under_a_vit_name_names_the_first_mismatching_key():
  state = state_dict_numpy(open_clip_model('tiny-convnext', text_layers=2))
  cfg = clip_jax.get_config('tiny', **{'text.layers': 2})
  with pytest.raises(CheckpointMismatchError) as e:
    import_state_dict(cfg, state)
  message = str(e.value)
  assert "the checkpoint's image tower is a ConvNeXt" in message
  first = message.splitlines()[1].strip()
  assert first == "missing key 'visual.class_embedding'", first
  assert "unexpected key 'visual.head.proj.weight'" in message


@pytest.mark.parametrize('name,family', [('MobileCLIP2-S0', 'MobileCLIP'), ('ViTamin-B', 'ViTamin'),
                                         ('swin_base_patch4_window7_224', 'timm Swin')])
def test_an_open_clip_name_of_an_unbuilt_family_names_it_and_what_builds(name, family):
  with pytest.raises(ValueError, match=f'{family}.*does not build yet. Nearest presets that '
                                       r'build: \S+'):
    clip_jax.get_config(name)


def test_vit_only_options_on_a_convnext_fail_in_one_line():
  with pytest.raises(KeyError, match='vision.patch_dropout is a ViT option .patch dropout '
                                     'drops ViT patch tokens.'):
    clip_jax.get_config('convnext_base', **{'vision.patch_dropout': 0.5})
  with pytest.raises(KeyError, match='vision.patch_size is a ViT option'):
    clip_jax.get_config('tiny-convnext', **{'vision.patch_size': 8})
  with pytest.raises(ValueError, match='needs a ViT image tower'):
    import ml_collections

    from clip_jax.data.locca import locca_defaults
    from clip_jax.run_config import with_locca_decoder
    with_locca_decoder(clip_jax.get_config('tiny-convnext'),
                       ml_collections.ConfigDict({**locca_defaults(), 'weight': 1.0}))
  with pytest.raises(ValueError, match='depths and vision.dims must have 4 stages'):
    clip_jax.get_config('tiny-convnext', **{'vision.depths': (1, 1, 1)})


def test_an_architecture_timm_cannot_build_by_name_is_not_exported():
  cfg = clip_jax.get_config('convnext_base', **{'vision.depths': (1, 1, 2, 1)})
  with pytest.raises(UnsupportedForOpenCLIP, match=r'vision.depths=\(1, 1, 2, 1\) '
                                                   r'\(timm: \(3, 3, 27, 3\)\)'):
    model_cfg(cfg)
  custom = cfg.replace(vision=ConvNeXtConfig(timm_model_name=None))
  with pytest.raises(UnsupportedForOpenCLIP, match='not a timm ConvNeXt'):
    model_cfg(custom)
