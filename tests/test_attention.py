"""The XLA attention path against PyTorch's, the splash (Pallas flash) path against it, and
`attention='auto'` (the default) against it.

The kernel runs in Pallas' interpreter here (CPU); tests/test_aot.py compiles it for TPU.
cuDNN needs a CUDA jaxlib: tests/test_cuda_lowering.py lowers the train step for GPU in its
own environment (.ci/run).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax import sharding
from clip_jax.models.functional import FunctionalModel, get_params, model_from_params
from clip_jax.models.layers import cudnn_refusal, dot_product_attention, splash_attention
from tests.jax_reference import jax_features, random_inputs


def _qkv(batch, tokens, heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), jnp.float32)
               for _ in range(3))


def _torch_value_and_grads(q, k, v, dy, causal):
  """y and the q, k, v gradients for cotangent `dy` from torch's own attention (autograd)."""
  import torch
  q, k, v = (torch.tensor(np.asarray(x, np.float32)).transpose(1, 2).requires_grad_()
             for x in (q, k, v))  # torch's layout: [B, H, T, D]
  y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
  y.backward(torch.tensor(np.asarray(dy, np.float32)).transpose(1, 2))
  return [x.detach().transpose(1, 2).numpy() for x in (y, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize(('q_tokens', 'causal'), [(50, False), (50, True), (1, False)],
                         ids=['bidirectional', 'causal', 'one_query'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_xla_attention_and_its_hand_written_gradient_equal_torch(q_tokens, causal, dtype):
  """`dot_product_attention`'s custom VJP (the weights rebuilt from the log-sum-exp, the
  softmax row term from dy.y) gives torch's autograd gradients: to float32 rounding, and in
  bf16 (the training dtype: bf16 logits and matmuls) to bf16's. One query is the MAP head."""
  q, k, v = _qkv(2, 50, heads=3, head_dim=16, seed=1)
  q = q[:, :q_tokens]
  dy = _qkv(2, q_tokens, heads=3, head_dim=16, seed=2)[0]
  ours = jax.vjp(lambda *a: dot_product_attention(*a, causal=causal),
                 *(x.astype(dtype) for x in (q, k, v)))
  # The reference sees the same (bf16-rounded) inputs, in float32.
  rounded = [np.asarray(x.astype(dtype), np.float32) for x in (q, k, v, dy)]
  expected = _torch_value_and_grads(*rounded, causal)
  actual = [ours[0], *ours[1](dy.astype(dtype))]
  tolerance = 2e-6 if dtype == 'float32' else 2e-2
  for name, a, e in zip(('y', 'dq', 'dk', 'dv'), actual, expected):
    assert a.dtype == jnp.dtype(dtype), name
    np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=0,
                               atol=tolerance * float(np.abs(e).max()), err_msg=name)


def _value_and_grads(attend, q, k, v, causal):
  loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, causal=causal)))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize(('tokens', 'causal'), [(50, False), (77, True), (128, False)],
                         ids=['padded', 'padded_causal', 'whole_tiles'])
def test_splash_equals_xla_attention_forward_and_backward(tokens, causal):
  """float32: padding to 128-token tiles is masked out (and the causal mask kept)."""
  q, k, v = _qkv(2, tokens)
  np.testing.assert_allclose(splash_attention(q, k, v, causal=causal, interpret=True),
                             dot_product_attention(q, k, v, causal=causal), rtol=0, atol=2e-6)
  splash = lambda *a, causal: splash_attention(*a, causal=causal, interpret=True)
  value, grads = _value_and_grads(splash, q, k, v, causal)
  ref_value, ref_grads = _value_and_grads(dot_product_attention, q, k, v, causal)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))


def test_splash_runs_per_device_on_a_mesh():
  """Under a mesh (as in the train step) the kernel runs under shard_map over the batch
  axes and heads over `tensor`: 8 devices give the single-device numbers."""
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  q, k, v = _qkv(8, 40, heads=4)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp'), None,
                                                                      'tensor', None))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))

  @jax.jit
  def sharded(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return splash_attention(q, k, v, interpret=True)

  np.testing.assert_allclose(sharded(q, k, v), dot_product_attention(q, k, v), rtol=0,
                             atol=2e-6)


def test_a_splash_model_computes_the_xla_numbers_off_tpu():
  """`attention='splash'` uses the kernel only where the program is compiled for TPU: the
  same weights give bit-identical features on CPU, so checkpoints evaluate anywhere."""
  base = clip_jax.create_model('tiny')
  splash = model_from_params(base.cfg.replace(attention='splash'), get_params(base))
  images, tokens = random_inputs(32, 32, 49408, batch=2)
  for a, b in zip(jax_features(base, images, tokens), jax_features(splash, images, tokens)):
    np.testing.assert_array_equal(a, b)


def test_an_unknown_attention_is_a_config_error():
  with pytest.raises(ValueError, match='attention must be one of'):
    clip_jax.create_model('tiny', attention='flash')


@functools.cache
def _features_and_grads(attention, remat, dtype, map_pool):
  """Both towers' features and every param's gradient of sum(sin(features)), jitted, on one
  set of weights (`tiny`; with `map_pool` the image tower ends in the MAP head)."""
  overrides = {'vision.pool': 'map', 'vision.class_token': False} if map_pool else {}
  base = clip_jax.create_model('tiny', **overrides)
  model = FunctionalModel.create(base.cfg.replace(attention=attention, remat=remat, dtype=dtype))
  images, tokens = random_inputs(32, 32, 49408, batch=2)

  def loss(params):
    m = model.bind(params)
    features = (m.encode_image(jnp.asarray(images)), m.encode_text(jnp.asarray(tokens)))
    return sum(jnp.sum(jnp.sin(f.astype(jnp.float32))) for f in features), features

  grads, features = jax.jit(jax.grad(loss, has_aux=True))(get_params(base))
  return features, jax.tree.leaves(grads)


@pytest.mark.parametrize(('remat', 'dtype', 'map_pool'),
                         [('none', 'float32', True), ('minimal', 'bfloat16', False)],
                         ids=['float32_map_head', 'bfloat16_minimal_remat'])
def test_auto_computes_the_xla_numbers_bit_for_bit_off_gpu_and_tpu(remat, dtype, map_pool):
  """On CPU `attention='auto'` (cuDNN where compiled for GPU, XLA elsewhere) is the XLA
  path: the image tower (with the MAP head, or the class token) and the causal text tower
  give the same bits, features and every parameter's gradient, in float32 and in bf16 under
  a remat policy."""
  auto_features, auto_grads = _features_and_grads('auto', remat, dtype, map_pool)
  xla_features, xla_grads = _features_and_grads('xla', remat, dtype, map_pool)
  for tower, a, b in zip(('image', 'text'), auto_features, xla_features):
    np.testing.assert_array_equal(a, b, err_msg=tower)
  assert len(auto_grads) == len(xla_grads) > 20
  for a, b in zip(auto_grads, xla_grads):
    np.testing.assert_array_equal(a, b)


def test_auto_is_the_default_attention():
  assert clip_jax.create_model('tiny').cfg.attention == 'auto'


def test_cudnn_refusal_is_decided_when_traced_without_cuda():
  """Without a CUDA jaxlib (this environment) every shape is refused with JAX's reason, so a
  program lowered for GPU here computes the XLA path instead of failing later."""
  assert 'cuDNN' in cudnn_refusal((2, 80, 4, 64), 80, 'bfloat16', False)
