"""Memory of the train step: scanned layers vs unrolled ones, and what remat policies save.

The train step of a widened tiny model is compiled for this machine's 8 CPU devices (FSDP
over all of them) and its memory read from `memory_analysis()`. The CPU compiler shows
what the TPU compiler does (bench/RESULTS.md): before the fix the scanned step needed
2.4x the memory of the unrolled one here (740 vs 306 MiB; each device ran the layer loop
on the global batch and stored every float32 intermediate), ViT-B-16 on v5p 4.7x. Unlike
the TPU compiler, the CPU one gives unrolled layers the same memory at every policy, so
with remat the bound is loose here. The CPU compiler reports no real peak, so these are
summed figures (`aot.hbm_use`), which over-count a scanned program; bench/RESULTS.md has
the TPU compiler's peaks (scanned 0.54-0.97x of unrolled).
"""

import contextlib
import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.extend import core as jax_core

from clip_jax import aot
from clip_jax.config_base import base_config
from clip_jax.models import layers

# Enough pairs and tokens (65 image, 32 text) per device that activations dominate.
MODEL = {'model.name': 'tiny', 'model.vision.width': 256, 'model.vision.mlp_dim': 1024,
         'model.text.width': 256, 'model.text.mlp_dim': 1024, 'model.text.vocab_size': 1024,
         'model.vision.image_size': 64, 'model.dtype': 'bfloat16', 'batch_size': 128,
         'mesh.data': 1, 'mesh.fsdp': -1}


@functools.cache
def _step_bytes(scan: bool, remat: str) -> int:
  config = base_config()
  config.update_from_flattened_dict({**MODEL, 'model.scan_layers': scan, 'model.remat': remat})
  return aot.analyse(config, 'local')['hbm']['total_bytes']


@pytest.mark.parametrize('remat', ['none', 'minimal', 'full'])
def test_scanned_layers_need_at_most_10_percent_more_memory_than_unrolled(remat):
  assert _step_bytes(True, remat) <= 1.1 * _step_bytes(False, remat)


def test_remat_policies_keep_less_the_more_they_recompute():
  """Scanned (where XLA cannot rematerialise by itself): none ~ minimal > save_attn > full.

  `minimal` keeps what `none` keeps but the softmax's log-sum-exp (1/16 of a [B, T, width]
  unit at 4 heads of 16), so the two differ only by where temporaries fall: within 1%."""
  none, minimal, save_attn, full = (_step_bytes(True, remat)
                                    for remat in ('none', 'minimal', 'save_attn', 'full'))
  assert abs(minimal - none) <= 0.01 * none, (none, minimal)
  assert full < save_attn < min(none, minimal), (none, minimal, save_attn, full)


def _matmuls(jaxpr: jax_core.Jaxpr) -> int:
  return (sum(eqn.primitive.name == 'dot_general' for eqn in jaxpr.eqns)
          + sum(map(_matmuls, jax_core.subjaxprs(jaxpr))))


def test_remat_policies_recompute_only_the_matmuls_they_do_not_keep():
  """Matmuls in a scanned layer's gradient (the loop body, traced once): 6 forward and 14
  backward without remat (attention's hand-written backward: q.k again, dv, dweights, the
  dy.y row term, dq, dk). `minimal` keeps every matmul output and recomputes only the q.k
  logits for the softmax's log-sum-exp (XLA merges them with the backward's own q.k);
  `save_attn` also the MLP's first matmul; `full` the forward's 5 whose outputs the
  backward reads. The attention output must carry the `attn` name where the hand-written
  backward reads it: named only on the module's output, `minimal` recomputed the attention
  forward (q.k and weights.v, +2)."""
  def count(remat):
    stack = layers.Transformer(2, 64, 4, 256, act='gelu', eps=1e-5, ls_init=None, scan=True,
                               remat=remat, dtype=jnp.float32, param_dtype=jnp.float32,
                               rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(stack)
    loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, causal=False))
    return _matmuls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, jnp.ones((2, 9, 64))
                                                                   ).jaxpr)
  assert {remat: count(remat) for remat in ('none', 'minimal', 'save_attn', 'full')} == {
      'none': 20, 'minimal': 21, 'save_attn': 22, 'full': 25}


@pytest.mark.parametrize(('remat', 'units'), [('none', 10 + 1 / 16), ('minimal', 10),
                                              ('save_attn', 6), ('full', 1)])
def test_a_scanned_layer_keeps_each_activation_once(remat, units):
  """What each scanned layer stores for the backward pass, by JAX's own residuals, in
  [B, T, width] units: without remat its input, q, k, v, the attention output, the residual
  stream after attention, the 4-wide MLP hidden (10) and the softmax's log-sum-exp (one
  float per query and head: 1/16 at 4 heads of 16); `minimal` the packed q, k, v, the
  attention output and its projection, the MLP hidden and the input (10); `save_attn` those
  minus the hidden (6); `full` the input. The attention output named `attn` twice (inside
  the attention core and around it) was kept twice under `minimal` (11): ViT-B-16 +0.55 GiB
  per chip."""
  layers_count, batch, tokens, width = 2, 2, 9, 64
  stack = layers.Transformer(layers_count, width, 4, 4 * width, act='gelu', eps=1e-5,
                             ls_init=None, scan=True, remat=remat, dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(stack)
  loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, causal=False)))
  printed = io.StringIO()  # "f32[2,2,9,64] output of scan from ..." per stacked residual
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(loss, state, jnp.ones((batch, tokens, width)))
  stacked = sum(math.prod(map(int, shape.split(','))) for shape in
                re.findall(r'^f32\[([\d,]+)\] output of scan', printed.getvalue(), re.M))
  assert stacked / (layers_count * batch * tokens * width) == units, printed.getvalue()


def scanned_stack_memory(layers_count: int, batch: int, tokens: int, width: int, *,
                         remat: str = 'none', device: jax.Device | None = None):
  """`memory_analysis()` of the gradient of a scanned bf16 stack of `layers_count` blocks,
  compiled for `device` (a TPU topology's, say) or this machine's default device."""
  stack = layers.Transformer(layers_count, width, width // 64, 4 * width, act='gelu', eps=1e-5,
                             ls_init=None, scan=True, remat=remat, dtype=jnp.bfloat16,
                             param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(stack)

  def loss(state, x):
    y = nnx.merge(graphdef, state)(x, causal=False)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  on = (jax.sharding.NamedSharding(jax.sharding.Mesh([device], ('data',)),
                                   jax.sharding.PartitionSpec()) if device else None)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), state)
  x = jax.ShapeDtypeStruct((batch, tokens, width), jnp.bfloat16, sharding=on)
  return jax.jit(jax.grad(loss)).lower(shapes, x).compile().memory_analysis()


def test_a_scanned_layer_keeps_neither_layernorm_nor_activation_outputs():
  """What one more layer adds to the backward pass's memory, in [B, T, width] bf16 units.

  Autodiff needs 10 per layer (input, q, k, v, attention output, residual, the 4-wide MLP
  hidden). Before `layers.dense_of` the matmuls after the LayerNorms and the GELU kept those
  outputs too: 38 units here on CPU (ViT-B-16 on v5p: 9.62 vs 6.37 GiB per chip at 128
  pairs by the compiler's peak); 20.5 now. These are the CPU compiler's temporaries (it gives
  no peak), which on TPU over-count a scanned stack: the bound tracks the change, not the
  true size.
  """
  batch, tokens, width = 16, 64, 256
  temp = lambda depth: scanned_stack_memory(depth, batch, tokens, width).temp_size_in_bytes
  per_layer = (temp(6) - temp(2)) / 4
  assert per_layer <= 24 * batch * tokens * width * 2, per_layer / (batch * tokens * width * 2)
