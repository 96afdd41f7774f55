"""Model options (scan, loop, remat, bf16), logical axes, presets and config errors."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import clip_jax
from clip_jax.convert.open_clip_config import model_cfg
from clip_jax.models.config import REMAT_POLICIES
from clip_jax.models.functional import get_params, model_from_params
from tests.jax_reference import jax_features, random_inputs

# A SigLIP-style tiny model: MAP head, no class token, bidirectional text, logit bias.
SIGLIP_STYLE = {'vision.class_token': False, 'vision.pool': 'map', 'vision.ln_pre': False,
                'vision.patch_bias': True, 'vision.proj': False, 'text.causal': False,
                'text.pool': 'last', 'text.proj_bias': True, 'init_logit_bias': -10.0}


def _loss_and_grads(model, images, tokens):
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def loss_fn(params):
    img, txt, scale, _ = nnx.merge(graphdef, params)(images, tokens)
    logits = jnp.exp(scale) * img @ txt.T
    return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=-1)))

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize('overrides', [{}, SIGLIP_STYLE], ids=['clip', 'siglip_style'])
def test_scan_and_loop_give_the_same_numbers(overrides):
  base = clip_jax.create_model('tiny', **overrides)
  params = get_params(base)
  images, tokens = random_inputs(32, 32, 49408, batch=4)
  loop = model_from_params(base.cfg.replace(scan_layers=False), params)
  scan_feats, loop_feats = jax_features(base, images, tokens), jax_features(loop, images, tokens)
  # The image tower (and any bidirectional text tower) is bit-identical. XLA fuses the
  # unrolled causal text layers differently, which moves results by float32 rounding only.
  np.testing.assert_array_equal(scan_feats[0], loop_feats[0])
  if base.cfg.text.causal:
    np.testing.assert_allclose(scan_feats[1], loop_feats[1], rtol=0, atol=2e-6)
  else:
    np.testing.assert_array_equal(scan_feats[1], loop_feats[1])


def test_layers_per_scan_iteration_keep_loss_and_gradients():
  """`scan_unroll=2` over 3 layers (one iteration of 2, and the remainder): same loss and
  gradients as one layer per iteration, up to float32 rounding of XLA's other fusions."""
  layers = {'vision.layers': 3, 'text.layers': 3}
  base = clip_jax.create_model('tiny', **layers)
  params = get_params(base)
  unrolled = model_from_params(base.cfg.replace(**{'vision.scan_unroll': 2,
                                                   'text.scan_unroll': 2}), params)
  assert unrolled.visual.transformer.unroll == unrolled.text.transformer.unroll == 2
  images, tokens = random_inputs(32, 32, 49408, batch=4)
  (loss, grads), (unrolled_loss, unrolled_grads) = (_loss_and_grads(m, images, tokens)
                                                    for m in (base, unrolled))
  np.testing.assert_allclose(float(unrolled_loss), float(loss), rtol=1e-6)
  for g, ug in zip(jax.tree.leaves(grads), jax.tree.leaves(unrolled_grads)):
    np.testing.assert_allclose(np.asarray(ug), np.asarray(g), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', ['ViT-B-16', 'ViT-B-16-SigLIP'])
def test_execution_options_stay_out_of_the_exported_open_clip_config(name):
  cfg = clip_jax.get_config(name)
  fast = cfg.replace(**{'vision.scan_unroll': 2, 'text.scan_unroll': 2, 'scan_layers': False})
  assert model_cfg(fast) == model_cfg(cfg)


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'loop'])
@pytest.mark.parametrize('policy', [p for p in REMAT_POLICIES if p != 'none'])
def test_remat_keeps_loss_and_gradients(policy, scan):
  base = clip_jax.create_model('tiny', scan_layers=scan)
  params = get_params(base)
  images, tokens = random_inputs(32, 32, 49408, batch=4)
  loss, grads = _loss_and_grads(base, images, tokens)
  remat = model_from_params(base.cfg.replace(remat=policy), params)
  remat_loss, remat_grads = _loss_and_grads(remat, images, tokens)
  # The recomputed forward pass is fused apart from the rest: float32 rounding only.
  np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
  for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    g = np.asarray(g)  # a few small entries are sums of larger terms: scale by the largest
    np.testing.assert_allclose(np.asarray(rg), g, rtol=1e-4, atol=1e-4 * np.abs(g).max())


def test_bf16_compute_stays_close_to_fp32():
  """bf16 matmuls (fp32 params, LayerNorm and softmax): features within 2e-2, cosine > 0.999."""
  base = clip_jax.create_model('ViT-B-32', **{'vision.layers': 4, 'text.layers': 4})
  bf16 = model_from_params(base.cfg.replace(dtype='bfloat16'), get_params(base))
  images, tokens = random_inputs(224, 77, 49408, batch=4)
  for fp32_feat, bf16_feat in zip(jax_features(base, images, tokens),
                                  jax_features(bf16, images, tokens)):
    assert np.abs(fp32_feat - bf16_feat).max() < 2e-2
    assert (fp32_feat * bf16_feat).sum(-1).min() > 0.999
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(get_params(bf16)))


def test_every_parameter_names_its_logical_axes():
  model = clip_jax.create_model('tiny', **SIGLIP_STYLE)
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves
  for var in leaves:
    axes = var.get_metadata()['axes']
    # Stacked layers add one leading (layer) axis that the sharding rules leave unsharded.
    assert var.value.ndim - len(axes) in (0, 1), (axes, var.value.shape)
  names = {a for v in leaves for a in v.get_metadata()['axes']}
  assert {'embed', 'mlp', 'heads', 'kv', 'vocab'} <= names


def test_call_returns_normalised_features_and_logit_params():
  model = clip_jax.create_model('tiny', **SIGLIP_STYLE)
  images, tokens = random_inputs(32, 32, 49408, batch=3)
  img, txt, scale, bias = model(images, tokens)
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
  assert float(scale) == pytest.approx(np.log(1 / 0.07), rel=1e-6) and float(bias) == -10.0


def test_text_pooling_modes_pick_the_documented_token():
  _images, tokens = random_inputs(32, 32, 49408, batch=2)
  base = clip_jax.create_model('tiny', **{'text.proj': False})  # pooled hidden state out
  params = get_params(base)
  pooled = {pool: np.asarray(model_from_params(base.cfg.replace(**{'text.pool': pool}), params)
                             .encode_text(tokens))
            for pool in ('argmax', 'last', 'first', 'mean')}
  text = base.text
  x = text.ln_final(text.transformer(
      jnp.take(text.token_embed[...], tokens, axis=0) + text.pos_embed[...], causal=True))
  x = np.asarray(x)
  eot = tokens.argmax(-1)
  assert eot[0] != eot[1]  # the rows end at different places
  np.testing.assert_allclose(pooled['argmax'], x[np.arange(2), eot], atol=1e-6)
  np.testing.assert_allclose(pooled['last'], x[:, -1], atol=1e-6)
  np.testing.assert_allclose(pooled['first'], x[:, 0], atol=1e-6)
  valid = (tokens != 0)[..., None]
  np.testing.assert_allclose(pooled['mean'], (x * valid).sum(1) / valid.sum(1), atol=1e-5)


def test_non_divisible_image_size_drops_partial_patches():
  model = clip_jax.create_model('tiny', **{'vision.image_size': 36})
  images = np.random.default_rng(0).normal(size=(2, 36, 36, 3)).astype(np.float32)
  cropped = images.copy()
  cropped[:, 32:, :] = 0
  cropped[:, :, 32:] = 0
  np.testing.assert_array_equal(np.asarray(model.encode_image(images)),
                                np.asarray(model.encode_image(cropped)))


def test_unknown_preset_lists_close_matches():
  with pytest.raises(ValueError, match=r"Unknown model preset 'ViT-B32'.*ViT-B-32"):
    clip_jax.create_model('ViT-B32')


@pytest.mark.parametrize('overrides,message', [
    ({'vision.width': 102}, 'vision.width must be divisible by vision.heads'),
    ({'vision.pool': 'max'}, 'vision.pool must be one of'),
    ({'text.pool': 'cls'}, 'text.pool must be one of'),
    ({'vision.class_token': False}, "vision.pool='tok' needs vision.class_token=True"),
    ({'remat': 'some'}, 'remat must be one of'),
    ({'text.scan_unroll': 0}, 'text.scan_unroll must be >= 1'),
])
def test_impossible_configs_fail_with_the_field_name(overrides, message):
  with pytest.raises(ValueError, match=message):
    clip_jax.get_config('tiny', **overrides)


def test_unknown_override_key_is_an_error():
  with pytest.raises(KeyError, match='depth'):
    clip_jax.get_config('tiny', **{'vision.depth': 3})
  with pytest.raises(KeyError, match='tower'):
    clip_jax.get_config('tiny', **{'tower.layers': 3})


PURE_JAX_TEST_MODULES = ('tests.jax_reference', 'tests.test_models', 'tests.test_losses',
                         'tests.test_optim', 'tests.test_metrics', 'tests.test_data')


def test_pure_jax_test_modules_do_not_import_torch():
  """The OpenCLIP side (tests/reference.py) is for parity tests only: no torch elsewhere."""
  code = ('import sys\n'
          + ''.join(f'import {m}\n' for m in PURE_JAX_TEST_MODULES)
          + "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True,
                          check=True, timeout=300)
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout


def test_overrides_are_typed_by_the_config_fields():
  """`CLIPConfig.replace` is the one override parser (trainer keys and --override strings)."""
  cfg = clip_jax.get_config('tiny', **{'vision.layers': '3', 'text.causal': 'False',
                                       'vision.ls_init': '0.1', 'embed_dim': 32,
                                       'vision.timm_model_name': 'None'})
  assert (cfg.vision.layers, cfg.text.causal, cfg.vision.ls_init, cfg.embed_dim) == (3, False,
                                                                                     0.1, 32)
  assert cfg.vision.timm_model_name is None
  with pytest.raises(ValueError, match=r"VisionConfig.layers expects int, got 'three'"):
    clip_jax.get_config('tiny', **{'vision.layers': 'three'})
  with pytest.raises(ValueError, match=r"VisionConfig.layers expects int, got 'None'"):
    clip_jax.get_config('tiny', **{'vision.layers': 'None'})  # only Optional fields take None
  with pytest.raises(KeyError, match='Unknown TextConfig keys'):
    clip_jax.get_config('tiny', **{'text.depth': 2})
