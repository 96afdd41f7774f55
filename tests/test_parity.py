"""clip_jax computes what OpenCLIP computes, in both conversion directions.

Import: OpenCLIP's own model (random init, every weight perturbed) -> state_dict ->
clip_jax params -> same normalised features. Export: clip_jax init -> checkpoint ->
`python -m clip_jax.export` -> OpenCLIP loads strictly -> same features.
Large presets run at reduced depth (the per-layer mapping is the same for every layer).
"""

import numpy as np
import open_clip
import pytest
from safetensors.numpy import load_file

import clip_jax
from clip_jax.checkpoint import save_model
from clip_jax.convert.open_clip import params_to_open_clip
from clip_jax.export import BIN_NAME, SAFETENSORS_NAME, export
from clip_jax.import_open_clip import import_state_dict
from clip_jax.models.functional import get_params, model_from_params
from tests.jax_reference import jax_features, random_inputs
from tests.reference import open_clip_model, state_dict_numpy, torch_features

# Max abs difference on L2-normalised fp32 features. The issue asks for 1e-4; correct
# mappings land near 2e-7, and 1e-5 still catches an approximate-vs-exact GELU mix-up
# in a single layer (which 1e-4 let through: it measured 2e-5).
TOLERANCE = 1e-5

# (preset, vision layers, text layers, text overrides applied to both sides)
IMPORT_CASES = [
    ('tiny', None, None, {}),
    ('tiny-quickgelu', None, None, {}),
    ('ViT-B-32', None, None, {}),
    ('ViT-B-16-quickgelu', None, None, {}),
    ('ViT-M-16-alt', 2, 2, {}),            # LayerScale
    ('ViT-B-16-plus-240', 2, 2, {}),       # 14 heads, 240px
    ('ViT-L-14-336', 2, 2, {}),
    ('ViT-H-14', 2, 2, {}),                # head_width 80
    ('ViT-g-14', 1, 1, {}),                # mlp_ratio 4.3637
    ('ViT-bigG-14', 1, 1, {}),             # mlp_ratio 4.9231
    ('ViT-B-16-SigLIP', 2, 2, {}),
    ('ViT-B-16-SigLIP2', 2, 2, {'vocab_size': 1000}),   # tanh-GELU text
    ('ViT-SO400M-14-SigLIP', 1, 1, {}),
    ('ViT-SO400M-14-SigLIP-384', 1, 1, {}),  # 384px at patch 14: partial patches dropped
    ('ViT-SO400M-16-SigLIP-i18n-256', 1, 1, {'vocab_size': 1000}),  # text without projection
    ('ViT-gopt-16-SigLIP2-256', 1, 1, {'vocab_size': 1000}),  # 1152-wide text -> 1536 embed
]


def _overrides(vision_layers, text_layers, text_overrides):
  out = {f'text.{k}': v for k, v in text_overrides.items()}
  if vision_layers:
    out['vision.layers'] = vision_layers
  if text_layers:
    out['text.layers'] = text_layers
  return out


def _assert_close(reference, ours, what):
  diff = float(np.abs(reference - ours).max())
  assert diff <= TOLERANCE, f'{what}: max abs diff {diff:.3g} > {TOLERANCE}'


@pytest.mark.parametrize('name,vision_layers,text_layers,text_overrides', IMPORT_CASES,
                         ids=[c[0] for c in IMPORT_CASES])
def test_import_matches_open_clip(name, vision_layers, text_layers, text_overrides):
  torch_model = open_clip_model(name, vision_layers, text_layers, text_overrides)
  cfg = clip_jax.get_config(name, **_overrides(vision_layers, text_layers, text_overrides))
  model = model_from_params(cfg, import_state_dict(cfg, state_dict_numpy(torch_model)))
  images, tokens = random_inputs(cfg.vision.image_size, cfg.text.context_length,
                                 cfg.text.vocab_size)
  ref_img, ref_txt = torch_features(torch_model, images, tokens)
  img, txt = jax_features(model, images, tokens)
  _assert_close(ref_img, img, f'{name} image features')
  _assert_close(ref_txt, txt, f'{name} text features')
  assert float(model.logit_scale[...]) == pytest.approx(
      float(torch_model.logit_scale.detach()), abs=1e-7)
  if torch_model.logit_bias is not None:
    assert float(model.logit_bias[...]) == pytest.approx(
        float(torch_model.logit_bias.detach()), abs=1e-7)
  else:
    assert model.logit_bias is None


EXPORT_CASES = [
    pytest.param('tiny', {}, id='tiny'),
    pytest.param('tiny-quickgelu', {}, id='tiny-quickgelu'),
    # Training-only: OpenCLIP builds its PatchDropout, idle in eval mode, like our keyless call.
    pytest.param('tiny', {'vision.patch_dropout': 0.5}, id='tiny-patch-dropout'),
    pytest.param('ViT-B-32', {}, id='ViT-B-32'),
    pytest.param('ViT-B-16-quickgelu', {}, id='ViT-B-16-quickgelu'),
    pytest.param('ViT-M-16-alt', {'vision.layers': 2, 'text.layers': 2}, id='ViT-M-16-alt'),
    pytest.param('ViT-H-14', {'vision.layers': 2, 'text.layers': 2}, id='ViT-H-14'),
    pytest.param('ViT-bigG-14', {'vision.layers': 1, 'text.layers': 1}, id='ViT-bigG-14'),
    pytest.param('ViT-B-16', {'vision.pool': 'gap', 'text.causal': False, 'text.pool': 'last',
                              'vision.layers': 2, 'text.layers': 2}, id='ViT-B-16-gap-bidir'),
    # OpenCLIP builds timm trunks by name only, so the SigLIP export runs at full size.
    pytest.param('ViT-B-16-SigLIP', {}, id='ViT-B-16-SigLIP', marks=pytest.mark.slow),
]


def _perturbed_model(name, overrides):
  """A clip_jax model whose LayerNorms, biases and logit params are not at their init."""
  model = clip_jax.create_model(name, **overrides)
  params = get_params(model)
  rng = np.random.default_rng(1)

  def add_noise(tree):
    if isinstance(tree, dict):
      return {k: add_noise(v) for k, v in tree.items()}
    a = np.asarray(tree)
    return a + rng.normal(scale=0.02, size=a.shape).astype(a.dtype)

  return model_from_params(model.cfg, add_noise(params))


@pytest.mark.parametrize('name,overrides', EXPORT_CASES)
def test_export_loads_strictly_in_open_clip(name, overrides, tmp_path):
  model = _perturbed_model(name, overrides)
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
  _assert_close(ref_img, img, f'{name} image features')
  _assert_close(ref_txt, txt, f'{name} text features')
  assert float(torch_model.logit_scale.detach()) == pytest.approx(
      float(model.logit_scale[...]), abs=1e-7)
  if model.logit_bias is not None:
    assert float(torch_model.logit_bias.detach()) == pytest.approx(
        float(model.logit_bias[...]), abs=1e-7)


def test_export_bin_loads_as_pretrained_for_the_named_preset(tmp_path):
  """`create_model_and_transforms(NAME, pretrained=OUT/open_clip_pytorch_model.bin)`."""
  model = _perturbed_model('ViT-B-32', {})
  save_model(tmp_path / 'ckpt', model.cfg, get_params(model))
  out = export(str(tmp_path / 'ckpt'), str(tmp_path / 'open_clip'))
  torch_model, _, _ = open_clip.create_model_and_transforms('ViT-B-32',
                                                            pretrained=str(out / BIN_NAME))
  images, tokens = random_inputs(224, 77, 49408, seed=4)
  ref_img, ref_txt = torch_features(torch_model.eval(), images, tokens)
  img, txt = jax_features(model, images, tokens)
  _assert_close(ref_img, img, 'ViT-B-32 image features')
  _assert_close(ref_txt, txt, 'ViT-B-32 text features')


def test_import_then_export_reproduces_the_state_dict(tmp_path):
  torch_model = open_clip_model('ViT-B-16-SigLIP', 2, 2)
  cfg = clip_jax.get_config('ViT-B-16-SigLIP', **{'vision.layers': 2, 'text.layers': 2})
  original = state_dict_numpy(torch_model)
  params = import_state_dict(cfg, original)
  round_trip = params_to_open_clip(cfg, params)
  assert set(round_trip) == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(round_trip[key], value, err_msg=key)
    assert round_trip[key].shape == value.shape, key
