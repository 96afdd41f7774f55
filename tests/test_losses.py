"""Distributed contrastive losses equal a float64 single-device reference.

Loss value and gradients w.r.t. both embeddings, the logit scale and the bias are compared
on 1, 2, 4 and 8 fake CPU devices, over meshes with one and two batch axes (and a mesh
with a non-batch axis the embeddings are replicated over).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.losses import contrastive_loss
from tests.jax_reference import contrastive_loss_float64

GLOBAL_BATCH, DIM = 32, 16
SCALE, BIAS = 2.3, -5.0
RTOL = 1e-5


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  img = _normalise(rng.normal(size=(GLOBAL_BATCH, DIM)))
  txt = _normalise(img + rng.normal(size=(GLOBAL_BATCH, DIM)))  # correlated, like trained towers
  return img, txt


def _reference(img, txt, kind):
  return contrastive_loss_float64(img, txt, SCALE, BIAS, kind)


MESHES = [  # (devices, mesh shape, mesh axes, batch axes)
    (1, (1,), ('data',), ('data',)),
    (2, (2,), ('data',), ('data',)),
    (4, (4,), ('fsdp',), ('data', 'fsdp')),
    (8, (8,), ('data',), ('data',)),
    (4, (2, 2), ('data', 'fsdp'), ('data', 'fsdp')),
    (8, (2, 4), ('data', 'fsdp'), ('data', 'fsdp')),
    (8, (4, 2), ('data', 'tensor'), ('data', 'fsdp')),
]
CASES = [(kind, chunk) for kind in ('softmax', 'sigmoid', 'sigmoid_chunked') for chunk in (None,)]
CASES.append(('sigmoid_chunked', 2))


def _mesh(n, shape, names):
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize('kind,chunk_size', CASES, ids=[f'{k}-{c}' for k, c in CASES])
@pytest.mark.parametrize('n,shape,names,batch_axes', MESHES,
                         ids=[f'{m[0]}dev-{m[1]}' for m in MESHES])
def test_loss_and_gradients_match_float64_reference(kind, chunk_size, n, shape, names, batch_axes):
  mesh = _mesh(n, shape, names)
  sharding = NamedSharding(mesh, P(tuple(a for a in batch_axes if a in names)))
  img, txt = _inputs()
  args = (jax.device_put(img.astype(np.float32), sharding),
          jax.device_put(txt.astype(np.float32), sharding), jnp.float32(SCALE), jnp.float32(BIAS))

  def loss_fn(img, txt, scale, bias):
    return contrastive_loss(img, txt, scale, bias, kind=kind, mesh=mesh, batch_axes=batch_axes,
                            chunk_size=chunk_size)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3),
                                                      has_aux=True))(*args)
  ref_loss, ref_grads = _reference(img, txt, 'softmax' if kind == 'softmax' else 'sigmoid')
  assert abs(float(loss) - ref_loss) / abs(ref_loss) <= RTOL
  names_ = ('image_emb', 'text_emb', 'logit_scale')
  for name, g, ref in zip(names_, grads, ref_grads):
    assert _rel_err(g, ref) <= RTOL, name
  if kind == 'softmax':
    assert float(grads[3]) == 0.0  # a constant shift cancels in softmax
  else:
    assert _rel_err(grads[3], ref_grads[3]) <= RTOL
  assert grads[0].sharding.is_equivalent_to(sharding, 2)  # gradients stay with their owners
  _check_metrics(metrics, img, txt, kind)


def _check_metrics(metrics, img, txt, kind):
  logits = np.exp(SCALE) * img @ txt.T + (0.0 if kind == 'softmax' else BIAS)
  eye = np.eye(GLOBAL_BATCH, dtype=bool)
  np.testing.assert_allclose(float(metrics['pos_logit']), logits[eye].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['neg_logit']), logits[~eye].mean(), rtol=1e-4, atol=1e-5)
  labels = np.arange(GLOBAL_BATCH)
  assert float(metrics['i2t_acc']) == pytest.approx((logits.argmax(1) == labels).mean())
  assert float(metrics['t2i_acc']) == pytest.approx((logits.argmax(0) == labels).mean())


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid', 'sigmoid_chunked'])
def test_bf16_embeddings_use_float32_logits(kind):
  mesh = _mesh(4, (4,), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  img, txt = _inputs(1)
  img16, txt16 = (jnp.asarray(x, jnp.bfloat16) for x in (img, txt))
  loss, _ = jax.jit(lambda a, b: contrastive_loss(a, b, SCALE, BIAS, kind=kind, mesh=mesh,
                                                  batch_axes=('data',)))(
      jax.device_put(img16, sharding), jax.device_put(txt16, sharding))
  ref_loss, _ = _reference(np.asarray(img16, np.float64), np.asarray(txt16, np.float64),
                           'softmax' if kind == 'softmax' else 'sigmoid')
  assert loss.dtype == jnp.float32
  assert abs(float(loss) - ref_loss) / abs(ref_loss) <= RTOL


def test_uneven_global_batch_is_a_clear_error():
  mesh = _mesh(8, (8,), ('data',))
  x = jnp.ones((12, DIM)) / np.sqrt(DIM)
  with pytest.raises(ValueError, match=r'Global batch 12 is not divisible by the 8 devices'):
    contrastive_loss(x, x, SCALE, BIAS, kind='sigmoid', mesh=mesh, batch_axes=('data',))


@pytest.mark.parametrize('kwargs,message', [
    ({'kind': 'hinge'}, 'kind must be one of'),
    ({'kind': 'sigmoid', 'logit_bias': None}, 'needs logit_bias'),
    ({'kind': 'sigmoid', 'chunk_size': 2}, 'chunk_size=2 needs kind=sigmoid_chunked'),
    ({'kind': 'sigmoid_chunked', 'chunk_size': 3}, 'must divide the per-device batch 4'),
])
def test_bad_arguments_fail_before_compute(kwargs, message):
  mesh = _mesh(8, (8,), ('data',))
  x = jnp.ones((GLOBAL_BATCH, DIM)) / np.sqrt(DIM)
  kwargs = {'logit_bias': BIAS, **kwargs}
  bias = kwargs.pop('logit_bias')
  with pytest.raises(ValueError, match=message):
    contrastive_loss(x, x, SCALE, bias, mesh=mesh, batch_axes=('data',), **kwargs)
