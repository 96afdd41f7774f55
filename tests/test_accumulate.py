"""Gradient accumulation: the feature cache reproduces the one-shot global batch exactly."""

import functools

import jax
import numpy as np
import pytest

import clip_jax
from clip_jax import accumulate, sharding
from clip_jax.data.transforms import normalize_on_device
from clip_jax.losses import contrastive_loss
from clip_jax.models.functional import FunctionalModel, get_params

# `tiny` with a small vocabulary (its 49k-row token table would dominate memory and time).
CFG = clip_jax.get_config('tiny', **{'text.vocab_size': 256, 'init_logit_bias': -10.0})
MODEL = FunctionalModel.create(CFG)
MESHES = {1: {'data': 1}, 4: {'data': 2, 'fsdp': 2}, 8: {'data': -1}}


def _mesh(devices):
  return sharding.make_mesh(MESHES[devices], jax.devices()[:devices])


@functools.cache
def _host_params():
  return jax.tree.map(np.asarray, get_params(clip_jax.create_model(CFG)))


def _params(devices):
  """Sharded by the default rules: with fsdp, weights are split over devices too."""
  shardings = sharding.param_shardings(MODEL.abstract, _mesh(devices))
  return jax.device_put(_host_params(), shardings)


def _batch(size, devices):
  rng = np.random.default_rng(size)
  text = rng.integers(1, CFG.text.vocab_size - 1, (size, CFG.text.context_length), np.int32)
  text[:, -1] = CFG.text.vocab_size - 1  # argmax pooling reads the highest id
  batch = {'image': rng.integers(0, 255, (size, 32, 32, 3), dtype=np.uint8), 'text': text}
  return jax.device_put(batch, sharding.batch_sharding(_mesh(devices)))


def _grad_fn(kind, devices, accum, mode='cache'):
  mesh = _mesh(devices)

  def embed(params, batch):
    img, txt, scale, bias = MODEL.bind(params)(
        normalize_on_device(batch['image'], CFG.preprocess), batch['text'])
    return img, txt, scale, None if kind == 'softmax' else bias

  def loss(img, txt, scale, bias):
    return contrastive_loss(img, txt, scale, bias, kind=kind, mesh=mesh,
                            batch_axes=sharding.BATCH_AXES)

  return jax.jit(accumulate.value_and_grad(embed, loss, accum=accum, mode=mode,
                                           batch_sharding=sharding.batch_sharding(mesh)))


@functools.cache
def _one_shot(kind, size):
  """The reference: plain `value_and_grad` of the whole batch's loss, on 8 devices."""
  (loss, _), grads = _grad_fn(kind, 8, 1)(_params(8), _batch(size, 8))
  return float(loss), jax.tree.map(np.asarray, grads)


def _max_error(actual, expected):
  """Largest error of any leaf relative to that leaf's largest entry."""
  return max(np.abs(np.asarray(a) - e).max() / max(np.abs(e).max(), 1e-30)
             for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)))


# Each kind on each mesh (4 = data 2 x fsdp 2: two batch axes, weights sharded) and each K
# with each kind, without the full product: every case is a compile of its own. K = 1 is
# the reference itself (`value_and_grad` returns the plain one-shot gradient there).
@pytest.mark.parametrize('kind,devices,accum', [
    ('softmax', 8, 2), ('sigmoid', 8, 4), ('sigmoid_chunked', 8, 4),
    ('softmax', 4, 4), ('sigmoid', 4, 2), ('sigmoid_chunked', 4, 2),
    ('softmax', 1, 4), ('sigmoid', 1, 2), ('sigmoid_chunked', 1, 4)])
def test_feature_cache_gives_the_one_shot_loss_and_gradients(kind, devices, accum):
  """Every negative counts: K micro-batches give the global batch's loss and gradients
  (largest error seen ~1.6e-6 of a leaf's largest entry)."""
  size = 32
  expected_loss, expected = _one_shot(kind, size)
  (loss, _), grads = _grad_fn(kind, devices, accum)(_params(devices), _batch(size, devices))
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  assert _max_error(grads, expected) < 1e-5


def test_feature_cache_holds_one_micro_batch_of_activations():
  """Compiled temp memory per device at B = 256 on 8 devices: one-shot 31.4 MiB, cache at
  K = 4 9.1 MiB (0.29; 'micro' 8.8 MiB): activations of a quarter batch, plus the
  parameter gradients and the B x D embeddings the cache keeps."""

  def temp_bytes(accum):
    fn = _grad_fn('softmax', 8, accum)
    compiled = fn.lower(_params(8), _batch(256, 8)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(4) < 0.4 * temp_bytes(1)
