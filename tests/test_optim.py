"""The optimizer: LR schedules, the weight-decay mask and frozen parameters (clip_jax.optim)."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import clip_jax
from clip_jax import optim
from clip_jax.models.functional import get_params

LR, WARMUP, TOTAL, COOLDOWN, END_RATIO = 1e-3, 100, 1000, 200, 0.1
# A SigLIP-style tiny model: MAP head (its probe is an embedding), no image projection, a bias.
SIGLIP_STYLE = {'vision.class_token': False, 'vision.pool': 'map', 'vision.ln_pre': False,
                'vision.patch_bias': True, 'vision.proj': False, 'text.causal': False,
                'text.pool': 'last', 'text.proj_bias': True, 'init_logit_bias': -10.0}


def _cfg(**kw):
  cfg = dict(lr=LR, warmup_steps=WARMUP, schedule='cosine', end_lr_ratio=END_RATIO,
             cooldown_steps=COOLDOWN, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, clip_norm=1.0,
             freeze='')
  return ml_collections.ConfigDict({**cfg, **kw})


def _expected_lr(kind, steps, warmup=WARMUP, total=TOTAL):
  """The schedules written out in numpy: linear warmup from 0, then cosine/constant/cooldown."""
  steps = np.asarray(steps, np.float64)
  t = np.clip(steps - warmup, 0, total - warmup) / (total - warmup)  # 0..1 after warmup
  if kind == 'cosine':
    main = LR * (END_RATIO + (1 - END_RATIO) * 0.5 * (1 + np.cos(np.pi * t)))
  elif kind == 'constant':
    main = np.full_like(steps, LR)
  else:  # constant_cooldown: flat, then linear to 0 over the last COOLDOWN steps
    main = LR * np.clip((total - steps) / COOLDOWN, 0, 1)
  return np.where(steps < warmup, LR * steps / max(warmup, 1), main)


# (step, lr) by hand: warmup start, middle, end; the middle of the rest; the end; past the end.
HAND = {
    'cosine': [(0, 0.0), (50, 5e-4), (100, 1e-3), (550, 5.5e-4), (1000, 1e-4), (1200, 1e-4)],
    'constant': [(0, 0.0), (50, 5e-4), (100, 1e-3), (550, 1e-3), (1000, 1e-3), (1200, 1e-3)],
    'constant_cooldown': [(0, 0.0), (50, 5e-4), (100, 1e-3), (550, 1e-3), (800, 1e-3),
                          (900, 5e-4), (1000, 0.0), (1200, 0.0)],
}


@pytest.mark.parametrize('kind', optim.SCHEDULES)
def test_schedule_values_by_hand(kind):
  schedule = optim.schedule(_cfg(schedule=kind), TOTAL)
  for step, lr in HAND[kind]:
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-10), (kind, step)


@pytest.mark.parametrize('kind', optim.SCHEDULES)
@pytest.mark.parametrize('warmup', [WARMUP, 0])
def test_schedule_matches_numpy_at_every_step(kind, warmup):
  schedule = optim.schedule(_cfg(schedule=kind, warmup_steps=warmup), TOTAL)
  steps = np.arange(TOTAL + 50)
  got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  np.testing.assert_allclose(got, _expected_lr(kind, steps, warmup), rtol=1e-5, atol=1e-10)
  if warmup == 0:
    assert float(schedule(0)) == pytest.approx(LR)  # no warmup: full lr from the first step


def test_unknown_schedule_is_an_error_naming_the_key():
  with pytest.raises(ValueError, match=r"config.optim.schedule must be one of .*'linear'"):
    optim.schedule(_cfg(schedule='linear'), TOTAL)


def _paths(tree):
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


BLOCK_KERNELS = {f'{tower}/transformer/blocks/{name}/kernel' for tower in ('visual', 'text')
                 for name in ('attn/qkv', 'attn/out', 'mlp/fc1', 'mlp/fc2')}


@pytest.mark.parametrize('overrides, decayed', [
    ({}, BLOCK_KERNELS | {'visual/patch_embed/kernel', 'visual/proj', 'text/proj/kernel'}),
    (SIGLIP_STYLE, None),  # computed below: every '/kernel' (the MAP head's too), no proj
], ids=['clip', 'siglip_style'])
def test_weight_decay_applies_to_matrices_only(overrides, decayed):
  params = get_params(clip_jax.create_model('tiny', **overrides))
  mask = _paths(optim.decay_mask(params))
  assert set(mask) == set(traverse_util.flatten_dict(params, sep='/'))
  if decayed is None:
    decayed = {p for p in mask if p.endswith('/kernel')}
    assert BLOCK_KERNELS | {'visual/patch_embed/kernel', 'text/proj/kernel'} <= decayed
    assert 'logit_bias' in mask and not any(p.startswith('visual/proj') for p in mask)
  assert {p for p, d in mask.items() if d} == decayed
  kept = {p for p, d in mask.items() if not d}
  # Everything else is a bias, a norm, an embedding or the logit scale/bias.
  for path in kept:
    name = path.rsplit('/', 1)[-1]
    assert name in {'bias', 'scale', 'pos_embed', 'cls_token', 'token_embed', 'logit_scale',
                    'logit_bias', 'latent'}, path  # latent: the MAP head's probe
  assert {'logit_scale', 'text/token_embed', 'text/pos_embed', 'text/ln_final/scale',
          'visual/transformer/blocks/ln_1/bias'} <= kept


def test_adamw_decays_exactly_the_masked_parameters():
  """Zero gradients: Adam's step is 0, so only decoupled weight decay moves a parameter."""
  params = get_params(clip_jax.create_model('tiny'))
  cfg = _cfg(schedule='constant', warmup_steps=0)
  tx = optim.make_optimizer(cfg, TOTAL, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  mask = _paths(optim.decay_mask(params))
  for path, update in _paths(updates).items():
    param = _paths(params)[path]
    expected = -LR * cfg.weight_decay * np.asarray(param) if mask[path] else np.zeros(param.shape)
    np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, atol=1e-12, err_msg=path)


def test_freeze_labels_follow_the_regex():
  params = get_params(clip_jax.create_model('tiny'))
  labels = _paths(optim.freeze_labels(params, '^visual/'))
  assert {p for p, label in labels.items() if label == 'frozen'} == {p for p in labels
                                                               if p.startswith('visual/')}
  assert labels['visual/proj'] == 'frozen' and labels['logit_scale'] == 'trained'
  assert set(_paths(optim.freeze_labels(params, '')).values()) == {'trained'}
  ln_only = _paths(optim.freeze_labels(params, r'/ln_\w+/'))
  frozen = {p for p, label in ln_only.items() if label == 'frozen'}
  assert frozen == {p for p in ln_only if '/ln_' in p}


def test_frozen_parameters_get_no_update():
  params = get_params(clip_jax.create_model('tiny'))
  tx = optim.make_optimizer(_cfg(freeze='^visual/', warmup_steps=0), TOTAL, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, update in _paths(updates).items():
    moved = bool(np.any(np.asarray(update) != 0))
    assert moved != path.startswith('visual/'), path


def test_unmatched_freeze_regex_is_an_error_naming_the_key():
  params = get_params(clip_jax.create_model('tiny'))
  with pytest.raises(ValueError, match=re.escape("config.optim.freeze='^vision/' matches no "
                                                 'parameter path')) as error:
    optim.make_optimizer(_cfg(freeze='^vision/'), TOTAL, params)
  assert "'visual/" in str(error.value)  # shows what the paths look like
