"""The ModifiedResNet image towers (OpenAI CLIP's RN50...) and BatchNorm's running statistics.

Parity both ways with OpenCLIP's own models (random fp32 weights; every weight and every
BatchNorm statistic perturbed): `tiny-resnet` and the full `RN50`. BatchNorm in training
against torch's BatchNorm2d: the train step's running statistics over 3 steps (and under the
feature cache), synced and per-device statistics on 8 devices, LiT-style freezing. Then
export/load, sharding, configs, FLOPs and the errors a user meets.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from open_clip.utils import freeze_batch_norm_2d
from safetensors.numpy import load_file

import clip_jax
from clip_jax import run_config, sharding
from clip_jax import step as step_lib
from clip_jax.checkpoint import load_params, save_model
from clip_jax.convert.open_clip import CheckpointMismatchError, params_to_open_clip
from clip_jax.convert.open_clip_config import model_cfg, preprocess_cfg
from clip_jax.data.transforms import normalize_on_device
from clip_jax.export import SAFETENSORS_NAME, export
from clip_jax.import_open_clip import import_state_dict
from clip_jax.metrics import resnet_flops, tower_flops, train_flops_per_sample
from clip_jax.models.config import CLIPConfig
from clip_jax.models.functional import (
  FunctionalModel,
  get_params,
  model_from_params,
  with_stats,
)
from tests import helpers
from tests.jax_reference import jax_features, random_inputs
from tests.reference import open_clip_model, state_dict_numpy, torch_features

# The bound: features equal within 1e-4 relative (correct mappings land near 1e-6).
RELATIVE = 1e-4
# BatchNorm statistics against torch's after training-mode passes (the 1e-5).
STATS_TOLERANCE = 1e-5

RESNET_PRESETS = [f'{name}{suffix}' for name in ('RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64')
                  for suffix in ('', '-quickgelu')]


def _assert_close(reference, ours, what, relative=RELATIVE):
  error = float(np.abs(reference - ours).max() / np.abs(reference).max())
  assert error <= relative, f'{what}: max error {error:.3g} of the largest value > {relative}'


def _torch_stats(model):
  """torch's BatchNorm buffers by state_dict key."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
          if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


def _our_stats(cfg, variables):
  """Our running statistics under torch's state_dict keys (the converter's own mapping)."""
  state = params_to_open_clip(cfg, jax.tree.map(np.asarray, variables))
  return {k: v for k, v in state.items()
          if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


def _assert_stats_equal(theirs, ours, what):
  assert set(theirs) == set(ours) and theirs
  for key, value in theirs.items():
    if key.endswith('num_batches_tracked'):
      assert int(ours[key]) == int(value), (what, key)
    else:
      np.testing.assert_allclose(ours[key], value, rtol=STATS_TOLERANCE, atol=STATS_TOLERANCE,
                                 err_msg=f'{what}: {key}')


def _nchw(images):
  return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)


# --- presets and parity -------------------------------------------------------------------

def test_every_open_clip_resnet_config_is_a_preset():
  names = {n for n in open_clip.list_models() if n.startswith('RN')}
  assert names == set(RESNET_PRESETS)
  assert set(RESNET_PRESETS) | {'tiny-resnet'} <= set(clip_jax.list_models())


@pytest.mark.parametrize('name', RESNET_PRESETS)
def test_preset_exports_open_clips_own_config(name):
  """model_cfg is OpenCLIP's JSON config for the name, key for key."""
  ours = model_cfg(clip_jax.get_config(name))
  theirs = open_clip.get_model_config(name)
  assert ours.pop('quick_gelu') is theirs.get('quick_gelu', False)
  text = dict(ours['text_cfg'])
  assert {k: text[k] for k in theirs['text_cfg']} == theirs['text_cfg']
  assert ours['vision_cfg'] == theirs['vision_cfg']
  assert ours['embed_dim'] == theirs['embed_dim']


@pytest.mark.parametrize('name', ['tiny-resnet', 'RN50'])
def test_import_matches_open_clip(name):
  """OpenCLIP's model in eval mode (BatchNorm by its running statistics) and ours after
  import: the same features; and back to the same state_dict, bit for bit and dtype for
  dtype (num_batches_tracked stays int64)."""
  torch_model = open_clip_model(name)
  cfg = clip_jax.get_config(name)
  state = state_dict_numpy(torch_model)
  variables = import_state_dict(cfg, state)
  model = model_from_params(cfg, variables)
  images, tokens = random_inputs(cfg.vision.image_size, cfg.text.context_length,
                                 cfg.text.vocab_size)
  ref_img, ref_txt = torch_features(torch_model, images, tokens)
  img, txt = jax_features(model, images, tokens)
  _assert_close(ref_img, img, f'{name} image features')
  _assert_close(ref_txt, txt, f'{name} text features')
  round_trip = params_to_open_clip(cfg, variables)
  assert set(round_trip) == set(state)
  for key, value in state.items():
    assert round_trip[key].dtype == value.dtype, key
    np.testing.assert_array_equal(round_trip[key], value, err_msg=key)


def _perturbed_variables(cfg, seed=1):
  """Our random variables with every weight perturbed and random BatchNorm statistics."""
  rng = np.random.default_rng(seed)

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    a = np.asarray(a)
    if 'count' in name:
      return rng.integers(1, 1000, a.shape).astype(np.int32)
    if "'var'" in name:
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    return (a + rng.normal(scale=0.05, size=a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, get_params(clip_jax.create_model(cfg)))


def test_export_loads_strictly_in_open_clip_and_load_uses_the_statistics(tmp_path):
  """Export -> OpenCLIP `local-dir:` (strict keys) gives the same features, and
  `clip_jax.load` of the checkpoint evaluates with its running statistics as OpenCLIP's
  eval mode does; the exported preprocess_cfg is OpenCLIP's."""
  cfg = clip_jax.get_config('tiny-resnet')
  variables = _perturbed_variables(cfg)
  save_model(tmp_path / 'ckpt', cfg, variables)
  out = export(str(tmp_path / 'ckpt'), str(tmp_path / 'open_clip'))
  torch_model, _, _ = open_clip.create_model_and_transforms(f'local-dir:{out}')
  torch_model.eval()
  exported = load_file(out / SAFETENSORS_NAME)
  reference_state = torch_model.state_dict()
  assert set(exported) == set(reference_state)
  for key, value in exported.items():
    assert tuple(value.shape) == tuple(reference_state[key].shape), key
  assert exported['visual.bn1.num_batches_tracked'].dtype == np.int64
  _assert_stats_equal(_torch_stats(torch_model), _our_stats(cfg, variables), 'exported')
  images, tokens = random_inputs(cfg.vision.image_size, cfg.text.context_length,
                                 cfg.text.vocab_size, batch=4, seed=3)
  ref_img, ref_txt = torch_features(torch_model, images, tokens)
  loaded, _, _ = clip_jax.load(str(tmp_path / 'ckpt'))
  img, txt = jax_features(loaded, images, tokens)
  _assert_close(ref_img, img, 'tiny-resnet image features')
  _assert_close(ref_txt, txt, 'tiny-resnet text features')
  written = json.loads((out / 'open_clip_config.json').read_text())
  assert written['preprocess_cfg'] == _as_written(torch_model.visual.preprocess_cfg)
  _, loaded_variables = load_params(tmp_path / 'ckpt')
  assert (tmp_path / 'ckpt' / 'batch_stats').exists()
  assert jax.tree.structure(loaded_variables) == jax.tree.structure(variables)


def _as_written(cfg):
  out = dict(cfg, mean=list(cfg['mean']), std=list(cfg['std']))
  size = out['size']
  if isinstance(size, (tuple, list)) and len(set(size)) == 1:
    out['size'] = size[0]
  return out


@pytest.mark.parametrize('name', ['RN50', 'RN50x64'])
def test_exported_preprocess_cfg_is_open_clips(name):
  with torch.device('meta'):
    torch_model = open_clip.create_model(name, device='meta')
  assert preprocess_cfg(clip_jax.get_config(name)) == _as_written(torch_model.visual.preprocess_cfg)


# --- BatchNorm in training ----------------------------------------------------------------

def _torch_from(cfg, variables):
  """OpenCLIP's model holding our variables (strict load)."""
  model = open_clip.CLIP(**model_cfg(cfg))
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           params_to_open_clip(cfg, jax.tree.map(np.asarray, variables)).items()}
  model.load_state_dict(state, strict=True)
  return model


def test_train_step_updates_the_statistics_as_torch_does():
  """Three real train steps on 8 devices (global batch 16, BatchNorm synced), with the
  feature cache (grad_accum=2) and stage 4 frozen (`optim.freeze='^visual/layer4/'`).
  Before each, OpenCLIP's model gets the state's variables (stage 4's BatchNorms made
  FrozenBatchNorm2d, as its `--lock-image-freeze-bn-stats` does) and runs the same
  normalised images in training mode, the two micro-batches (rows 0, 2, ... then 1, 3, ...)
  one after the other. Its BatchNorm buffers then equal the state's after the step
  (momentum 0.1, unbiased running variance, count); stage 4 keeps its params and
  statistics. Without accumulation the step is the same forward pass once
  (`accumulate.value_and_grad`): the 8-device test below checks one such pass against
  torch, the train binary's tests the run."""
  accum = 2
  config = helpers.synthetic_config(**{'model.name': 'tiny-resnet', 'batch_size': 16,
                                       'optim.grad_accum': accum, 'optim.lr': 1e-2,
                                       'optim.warmup_steps': 0,
                                       'optim.freeze': '^visual/layer4/'})
  program = helpers.program(config)
  cfg = program.model.cfg
  state = program.state
  frozen = jax.tree.map(np.array, step_lib.variables(state)['visual']['layer4'])
  trained = np.array(state['params']['visual']['layer3']['first']['conv2']['conv']['kernel'])
  for step in range(3):
    batch = helpers.random_batch(16, cfg, seed=step)
    torch_model = _torch_from(cfg, step_lib.variables(state))
    torch_model.visual.layer4 = freeze_batch_norm_2d(torch_model.visual.layer4)
    torch_model.train()
    images = np.asarray(normalize_on_device(jnp.asarray(batch['image']), cfg.preprocess))
    with torch.no_grad():
      for micro in range(accum):
        torch_model.encode_image(_nchw(images[micro::accum]))
    state, _ = program.step(state, jax.device_put(batch, program.batch_sharding))
    ours = _our_stats(cfg, step_lib.variables(state))
    theirs = _torch_stats(torch_model)  # FrozenBatchNorm2d keeps no num_batches_tracked
    _assert_stats_equal(theirs, {k: ours[k] for k in theirs}, f'step {step + 1}')
  after = jax.tree.map(np.array, step_lib.variables(state))
  assert int(after['visual']['stem']['conv1']['bn']['count']) == 3 * accum
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(after['visual']['layer4'])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(trained, after['visual']['layer3']['first']['conv2']['conv']['kernel'])


def _train_mode_features(cfg, variables, images, mesh=None, freeze=''):
  """Features and updated statistics of one training-mode forward pass (jitted; on `mesh`
  with the batch split over its batch axes)."""
  functional = FunctionalModel.create(cfg)

  def forward(variables, images):
    model = functional.bind(variables, train=True, freeze=freeze)
    return model.encode_image(images, normalize=True), functional.stats_of(model)

  if mesh is None:
    return jax.jit(forward)(variables, images)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return jax.jit(forward)(jax.device_put(variables, NamedSharding(mesh, P())),
                            jax.device_put(images, sharding.batch_sharding(mesh)))


@pytest.mark.parametrize('sync', [True, False])
def test_batch_statistics_across_8_devices(sync):
  """On 8 devices (data 2 x fsdp 4): `sync_bn` normalises by the global batch, as one torch
  BatchNorm2d (or SyncBatchNorm) over the whole batch; per device (`sync_bn=False`), each
  device's 2 rows by their own statistics, as 8 torch models on their own shards, and the
  running statistics are those 8 models' mean."""
  cfg = clip_jax.get_config('tiny-resnet', **{'vision.sync_bn': sync})
  variables = _perturbed_variables(cfg)
  images = random_inputs(cfg.vision.image_size, 8, 100, batch=16, seed=4)[0]
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  features, stats = _train_mode_features(cfg, variables, images, mesh)
  params, _ = FunctionalModel.create(cfg).split(variables)
  ours = _our_stats(cfg, with_stats(params, stats))
  reference = _torch_from(cfg, variables).train()
  with torch.no_grad():
    if sync:
      expected = reference.encode_image(_nchw(images), normalize=True).numpy()
      expected_stats = _torch_stats(reference)
    else:
      shards = [copy.deepcopy(reference) for _ in range(8)]
      expected = np.concatenate([m.encode_image(_nchw(images[2 * i:2 * i + 2]), normalize=True)
                                 .numpy() for i, m in enumerate(shards)])
      per_shard = [_torch_stats(m) for m in shards]
      expected_stats = {k: np.mean([s[k] for s in per_shard], axis=0).astype(v.dtype)
                        for k, v in per_shard[0].items()}
  _assert_close(expected, np.asarray(features), f'sync_bn={sync} training-mode features')
  _assert_stats_equal(expected_stats, ours, f'sync_bn={sync}')
  if sync:  # and the same as one device on the whole batch
    single, single_stats = _train_mode_features(cfg, variables, images)
    np.testing.assert_allclose(np.asarray(features), np.asarray(single), atol=1e-5)
    _assert_stats_equal(_our_stats(cfg, with_stats(params, single_stats)), ours, 'one device')


def test_a_frozen_image_tower_normalises_by_its_statistics():
  """LiT (`optim.freeze='^visual/'`): in training mode the image tower normalises by its
  running statistics and leaves them as they are, as OpenCLIP's
  `lock_image_tower(freeze_bn_stats=True)` (FrozenBatchNorm2d) does. (The train step's
  frozen layers: the test above.)"""
  cfg = clip_jax.get_config('tiny-resnet')
  variables = _perturbed_variables(cfg)
  images = random_inputs(cfg.vision.image_size, 8, 100, batch=4, seed=5)[0]
  features, stats = _train_mode_features(cfg, variables, images, freeze='^visual/')
  locked = _torch_from(cfg, variables)
  locked.lock_image_tower(freeze_bn_stats=True)
  locked.train()
  with torch.no_grad():
    expected = locked.encode_image(_nchw(images), normalize=True).numpy()
  _assert_close(expected, np.asarray(features), 'frozen tower in training mode')
  _, old_stats = FunctionalModel.create(cfg).split(variables)
  for a, b in zip(jax.tree.leaves(old_stats), jax.tree.leaves(stats)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_sharding_conv_kernels_over_output_channels_statistics_replicated():
  """FSDP takes conv kernels and per-channel params over their output channels; the
  running statistics stay whole on every device, in the train state too."""
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  functional = FunctionalModel.create(clip_jax.get_config('tiny-resnet'))
  specs = jax.tree.map(lambda s: s.spec, sharding.variable_shardings(functional.abstract, mesh))
  visual = specs['visual']
  assert visual['stem']['conv2']['conv']['kernel'] == P(None, None, None, 'fsdp')
  assert visual['layer2']['first']['downsample']['conv']['kernel'] == P(None, None, None, 'fsdp')
  assert visual['layer3']['first']['conv3']['bn']['scale'] == P('fsdp')
  assert visual['attnpool']['k']['kernel'] == P('fsdp', None, None)
  stats = functional.split(specs)[1]
  assert set(jax.tree.leaves(stats, is_leaf=lambda x: isinstance(x, P))) == {P()}
  run = run_config.resolve(helpers.synthetic_config(**{'model.name': 'tiny-resnet'}), mesh.size)
  state = step_lib.build(run, mesh, abstract=True).state  # shapes placed as the trainer's
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state['batch_stats']))
  kernel = state['params']['visual']['layer4']['first']['conv3']['conv']['kernel']
  assert kernel.sharding.spec == P(None, None, None, 'fsdp')


def test_config_round_trips_and_overrides():
  cfg = clip_jax.get_config('RN50', **{'vision.depths': '(1, 1, 2, 1)',
                                       'vision.sync_bn': 'False'})
  assert cfg.vision.depths == (1, 1, 2, 1) and cfg.vision.sync_bn is False
  d = json.loads(json.dumps(cfg.to_dict()))
  assert d['vision']['kind'] == 'resnet'
  assert CLIPConfig.from_dict(d) == cfg
  with pytest.raises(KeyError, match=r'vision.patch_size is a ViT option; this model\'s image '
                                     r'tower is resnet \(ModifiedResNet\)'):
    clip_jax.get_config('RN50', **{'vision.patch_size': 16})
  with pytest.raises(ValueError, match='vision.image_size must be a multiple of 32'):
    clip_jax.get_config('tiny-resnet', **{'vision.image_size': 48})
  with pytest.raises(ValueError, match='vision.heads must divide'):
    clip_jax.get_config('tiny-resnet', **{'vision.heads': 7})


def test_analytic_flops_match_xla_cost_analysis():
  """The ModifiedResNet count (convs, attention pool) against XLA's for the unrolled forward
  pass of a model wide enough that convs dominate. XLA leaves out the taps of a 3x3 conv
  that fall on the zero padding, which the count (as MAC counters do) includes: at 64 px
  (grids down to 2x2) XLA's is 0.91 of it, at 128 px 0.95, at 224 px 0.97. RN50 by hand:
  5.79 GMACs (torchvision's ResNet-50 4.1, plus the 3-conv stem, the 3x3 convs before the
  pooling and the attention pool)."""
  cfg = clip_jax.get_config('tiny-resnet', **{'vision.width': 64, 'vision.heads': 32,
                                               'vision.depths': (1, 2, 2, 2),
                                               'vision.image_size': 64, 'scan_layers': False})
  functional = FunctionalModel.create(cfg)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), functional.shapes(),
                           is_leaf=lambda x: isinstance(x, tuple))
  compiled = jax.jit(lambda v, x: functional.bind(v).encode_image(x)).lower(
      variables, images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = 2 * resnet_flops(cfg.vision, cfg.embed_dim)
  assert 0.89 < cost['flops'] / analytic < 0.93, (cost['flops'], analytic)
  t = cfg.text
  assert train_flops_per_sample(cfg, 32) == pytest.approx(
      3 * (resnet_flops(cfg.vision, cfg.embed_dim) + tower_flops(t.layers, 32, t.width,
                                                                  t.mlp_dim)))
  rn50 = clip_jax.get_config('RN50')
  assert resnet_flops(rn50.vision, rn50.embed_dim) / 2e9 == pytest.approx(5.79, rel=0.01)


# --- bad input ----------------------------------------------------------------------------

def test_a_resnet_checkpoint_under_a_vit_name_names_the_first_mismatching_key(tmp_path):
  state = state_dict_numpy(open_clip_model('tiny-resnet'))
  with pytest.raises(CheckpointMismatchError) as e:
    import_state_dict(clip_jax.get_config('tiny'), state)
  message = str(e.value)
  assert "the checkpoint's image tower is a ModifiedResNet (RN50...), the model's an OpenCLIP ViT" \
      in message
  first = message.splitlines()[1].strip()
  assert first == "missing key 'visual.class_embedding'", first
  assert "unexpected key 'visual.attnpool.c_proj.bias'" in message
  # A params tree without its running statistics is refused by name, not mis-bound.
  cfg = clip_jax.get_config('tiny-resnet')
  params, _ = FunctionalModel.create(cfg).split(get_params(clip_jax.create_model(cfg)))
  with pytest.raises(ValueError, match=r'lack the BatchNorm running statistics visual/'):
    save_model(tmp_path / 'no_stats', cfg, params)


# --- the train binary ---------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_resnet_learns_the_demo(demo_data, tmp_path):
  """`configs/demo.py:model=tiny-resnet` to >= 80% held-out zero-shot top-1 (40 classes,
  chance 2.5%) in 400 steps, 0.4x the demo's budget, on the tests' small demo set (3,000
  training images; measured there: 80.3% at 300 steps, 85.3% at 400: docs/models.md)."""
  workdir = tmp_path / 'run'
  helpers.run(helpers.train_cmd(workdir, '--config.eval_every=400', '--config.log_every=50',
                                config=f'{helpers.DEMO_CONFIG}:model=tiny-resnet,steps=400,'
                                       f'data_dir={demo_data}'),
              helpers.env(1), timeout=900)
  metrics = helpers.metrics(workdir)
  assert metrics[400]['zeroshot_top1'] >= 0.8, metrics[400]
  assert (workdir / 'checkpoints' / '400' / 'batch_stats').exists()


@pytest.mark.slow
def test_sigkill_then_restart_matches_an_uninterrupted_run(demo_data, tmp_path):
  """Killed mid-run and restarted, a tiny-resnet run ends with exactly the uninterrupted
  run's losses, params and BatchNorm statistics (per-device statistics on 8 devices)."""
  common = helpers.overrides(12, '--config.log_every=1', '--config.checkpoint_every=4',
                             '--config.eval.zeroshot_shards=', '--config.batch_size=16',
                             '--config.model.name=tiny-resnet',
                             '--config.model.vision.sync_bn=False')
  helpers.killed_and_restarted(tmp_path, common, helpers.demo_config(demo_data), steps=12,
                               kill_at=6)
  _, params = load_params(tmp_path / 'straight')  # the statistics were compared with them
  assert 'mean' in params['visual']['layer1']['first']['conv1']['bn']
