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
SIZE = 256  # the global batch: large enough for activations to dominate memory


def _mesh(devices):
  return sharding.make_mesh(MESHES[devices], jax.devices()[:devices])


@functools.cache
def _host_params():
  return jax.tree.map(np.asarray, get_params(clip_jax.create_model(CFG)))


def _params(devices):
  """Sharded by the default rules: with fsdp, weights are split over devices too."""
  shardings = sharding.param_shardings(MODEL.abstract, _mesh(devices))
  return jax.device_put(_host_params(), shardings)


def _batch(devices):
  rng = np.random.default_rng(0)
  text = rng.integers(1, CFG.text.vocab_size - 1, (SIZE, CFG.text.context_length), np.int32)
  text[:, -1] = CFG.text.vocab_size - 1  # argmax pooling reads the highest id
  batch = {'image': rng.integers(0, 255, (SIZE, 32, 32, 3), dtype=np.uint8), 'text': text}
  return jax.device_put(batch, sharding.batch_sharding(_mesh(devices)))


@functools.cache
def _compiled(kind, devices, accum):
  """The compiled 'cache' gradient of a SIZE batch (K = 1: the plain one-shot gradient);
  cached, as the memory test reads the same programs the equivalence tests run."""
  mesh = _mesh(devices)

  def embed(params, stats, batch):
    img, txt, scale, bias = MODEL.bind(params)(
        normalize_on_device(batch['image'], CFG.preprocess), batch['text'])
    return (img, txt, scale, None if kind == 'softmax' else bias, {}), stats

  def loss(img, txt, scale, bias, rows):
    return contrastive_loss(img, txt, scale, bias, kind=kind, mesh=mesh,
                            batch_axes=sharding.BATCH_AXES)

  fn = accumulate.value_and_grad(embed, loss, accum=accum, mode='cache',
                                 batch_sharding=sharding.batch_sharding(mesh))
  return jax.jit(fn).lower(_params(devices), {}, _batch(devices)).compile()


def _grads(kind, devices, accum):
  (loss, _), grads, _ = _compiled(kind, devices, accum)(_params(devices), {}, _batch(devices))
  return float(loss), jax.tree.map(np.asarray, grads)


def _max_error(actual, expected):
  """Largest error of any leaf relative to that leaf's largest entry."""
  return max(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30)
             for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)))


# Each kind on each mesh (4 = data 2 x fsdp 2: two batch axes, weights sharded) and each K
# with each kind, without the full product: every case is a compile of its own. K = 1 is
# the reference itself (`value_and_grad` returns the plain one-shot gradient there), on 8
# devices.
@pytest.mark.parametrize('kind,devices,accum', [
    ('softmax', 8, 4), ('sigmoid', 8, 2), ('sigmoid_chunked', 8, 4),
    ('softmax', 4, 2), ('sigmoid', 4, 4), ('sigmoid_chunked', 4, 2),
    ('softmax', 1, 2), ('sigmoid', 1, 4), ('sigmoid_chunked', 1, 4)])
def test_feature_cache_gives_the_one_shot_loss_and_gradients(kind, devices, accum):
  """Every negative counts: K micro-batches give the global batch's loss and gradients
  (largest error seen 6.4e-7 of a leaf's largest entry, loss 1.5e-7)."""
  expected_loss, expected = _grads(kind, 8, 1)
  loss, grads = _grads(kind, devices, accum)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert _max_error(grads, expected) < 1e-5


def test_feature_cache_holds_one_micro_batch_of_activations():
  """Compiled temp memory per device at B = 256 on 8 devices: one-shot 31.4 MiB, cache at
  K = 4 9.1 MiB (0.29; 'micro' 8.8 MiB): activations of a quarter batch, plus the
  parameter gradients and the B x D embeddings the cache keeps."""
  temp_bytes = lambda accum: _compiled('softmax', 8, accum).memory_analysis().temp_size_in_bytes
  assert temp_bytes(4) < 0.4 * temp_bytes(1)
