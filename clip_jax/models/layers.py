"""Transformer building blocks shared by both towers.

Every parameter is an `nnx.Param` carrying `axes`: its logical axis names (`embed`,
`mlp`, `heads`, `kv`, `vocab`, ...). `clip_jax.sharding` maps them onto mesh axes with
rules from the config; leading stacked-layer axes are implicit (`layers`).

Matmuls run in the compute dtype; LayerNorm statistics and attention softmax in float32.

Memory of the backward pass: LayerNorm and the activation (`recomputed`) keep only their
inputs for the backward pass and recompute the rest; the attention core keeps its inputs,
its output and the softmax's log-sum-exp and rebuilds the weights (`dot_product_attention`,
flash attention's backward pass). Under `lax.scan` (`scan_layers=True`)
XLA cannot rematerialise across the loop, so without this each layer stored LayerNorm's
float32 copies, the GELU's intermediates and the [B, H, T, T] attention weights in float32
and bf16. The matmuls after a LayerNorm or the activation likewise keep the LayerNorm's
or activation's input, not its output (`dense_of`). The block's matmul outputs carry
names (`checkpoint_name`: `qkv`, `attn`, `attn_out`, `mlp_hidden`) that the `remat`
policies below save or recompute.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from clip_jax.sharding import constrain_batch, context_batch_axes

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> nnx.Param:
  """Creates a parameter tagged with its logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def recomputed(fn: Callable) -> Callable:
  """`fn` keeping only its inputs for the backward pass, its intermediates recomputed.

  For the cheap ops between matmuls: their float32 intermediates cost more memory than
  recomputing them costs time. `prevent_cse=False` keeps XLA's fusions across the
  boundary; outside `lax.scan` XLA may then reuse the forward's values, which only
  forgoes the saving.
  """
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)


def dense_of(prepare: Callable[[Any], jax.Array], dense: Dense,
             x: jax.Array | tuple[jax.Array, ...]) -> jax.Array:
  """`dense(prepare(x))` keeping `x`, not `prepare(x)`, for the backward pass.

  A matmul's weight gradient needs its input: after a LayerNorm or an activation, the
  compiled scanned step stored that output per layer beside the norm's or activation's
  own input (a second [B, T, 4*width] tensor after the GELU), though JAX's own residuals
  (`print_saved_residuals`) did not list it. Recomputing the cheap `prepare` from `x`
  instead costs no matmul: the dense output is not needed by its own backward, so it is
  not recomputed (compiled FLOPs +0.09% on ViT-B-16).
  """
  return recomputed(lambda x: dense(prepare(x)))(x)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """OpenCLIP's activations: exact GELU, QuickGELU (x*sigmoid(1.702x)), tanh GELU."""
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == 'gelu_tanh':
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'silu':  # SwiGLU's gate (timm's nn.SiLU)
    return jax.nn.silu
  raise ValueError(f'Unknown activation {name!r}')


class Dense(nnx.Module):
  """A linear map contracting the last `len(in_shape)` input dims into `out_shape`.

  Multi-dimensional kernels (e.g. [embed, 3, heads, head_dim]) keep the head structure
  visible to the sharding rules instead of hiding it in a packed matrix.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str | None],
               *, use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs, kernel_init: Initializer | None = None):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    n_in = len(in_shape)
    if kernel_init is None:
      kernel_init = jax.nn.initializers.xavier_uniform(
          in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(out_shape))))
    self.kernel = param(rngs, kernel_init, in_shape + out_shape, axes, param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, out_shape, axes[n_in:], param_dtype)
                 if use_bias else None)
    self.n_in = n_in
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 (as OpenCLIP's LayerNormFp32), cast back to `dtype`.

  Normalises over the last `len(shape)` dims: (dim,) by default, (heads, head_dim) for the
  heads' outputs (timm's `scale_attn_inner`), with the logical `axes` of those dims.
  """

  def __init__(self, dim: int | tuple[int, ...], *, eps: float, axes: Sequence[str] = ('embed',),
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    shape = (dim,) if isinstance(dim, int) else tuple(dim)
    self.scale = param(rngs, jax.nn.initializers.ones, shape, axes, param_dtype)
    self.bias = param(rngs, jax.nn.initializers.zeros, shape, axes, param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return recomputed(self._normalize)(x, self.scale[...], self.bias[...])

  def _normalize(self, x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    dims = tuple(range(-scale.ndim, 0))
    mean = x32.mean(dims, keepdims=True)
    var = jnp.square(x32 - mean).mean(dims, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class MLP(nnx.Module):
  """fc2(act(fc1(x))); `gated`: fc2(act(gate(x)) * fc1(x)) (SwiGLU with act 'silu', timm's
  `SwiGLU`: `fc1_g` is `gate`, `fc1_x` is `fc1`); `norm_eps`: a LayerNorm on the hidden
  before fc2 (timm's `scale_mlp`)."""

  def __init__(self, dim: int, hidden: int, act: str, *, gated: bool = False,
               norm_eps: float | None = None, dtype, param_dtype, rngs: nnx.Rngs,
               kernel_init: Initializer | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=kernel_init)
    self.fc1 = Dense((dim,), (hidden,), ('embed', 'mlp'), **kw)
    self.gate = Dense((dim,), (hidden,), ('embed', 'mlp'), **kw) if gated else None
    self.norm = (LayerNorm(hidden, eps=norm_eps, axes=('mlp',), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs) if norm_eps is not None else None)
    self.fc2 = Dense((hidden,), (dim,), ('mlp', 'embed'), **kw)
    self.act = act

  def __call__(self, x: jax.Array, norm: Callable[[jax.Array], jax.Array] = lambda x: x
               ) -> jax.Array:
    """The MLP of `norm(x)`, storing neither `norm(x)` nor what the activation (and the
    gate's product, the hidden's norm) make of the matmul outputs (`dense_of`)."""
    act, hidden_norm = activation(self.act), self.norm or (lambda h: h)
    hidden = checkpoint_name(dense_of(norm, self.fc1, x), 'mlp_hidden')
    if self.gate is None:
      return dense_of(lambda h: hidden_norm(act(h)), self.fc2, hidden)
    gate = checkpoint_name(dense_of(norm, self.gate, x), 'mlp_hidden')
    return dense_of(lambda hg: hidden_norm(act(hg[1]) * hg[0]), self.fc2, (hidden, gate))


@dataclasses.dataclass(frozen=True)
class BlockVariant:
  """How a block departs from OpenCLIP's pre-LN block (the defaults): timm's Eva options.

  `k_bias=False`: q and v have biases, k none (EVA's `q_bias`/`v_bias`; with rotary
  embeddings a k bias would not cancel out of the softmax). `attn_norm`: LayerNorm over the
  heads' outputs before the output projection. `gated_mlp`, `mlp_norm`: `MLP`'s `gated` and
  hidden norm. `post_norm`: x + ln_1(attn(x)), x + ln_2(mlp(x)) (EVA02-E). Rotary position
  embeddings need no option: a block turns q and k by the table its caller passes
  (`Transformer.__call__`'s `rope`).
  """
  k_bias: bool = True
  attn_norm: bool = False
  gated_mlp: bool = False
  mlp_norm: bool = False
  post_norm: bool = False


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
  """timm's `apply_rot_embed_cat` (interleaved pairs) on the last N tokens of [B, T, H, D]
  `x`: pair (x_2j, x_2j+1) turned by angle j, whose sin and cos are `table`'s [..., N, 2D]
  halves (each angle repeated for its pair). The first T - N (class) tokens pass unchanged.
  Computed in float32, the result cast back to `x.dtype`."""
  n = table.shape[-2]
  prefix, tokens = x[:, :x.shape[1] - n], x[:, x.shape[1] - n:].astype(jnp.float32)
  sin, cos = jnp.split(table.astype(jnp.float32)[..., None, :], 2, axis=-1)  # [.., N, 1, D]
  turned = jnp.stack([-tokens[..., 1::2], tokens[..., ::2]], axis=-1).reshape(tokens.shape)
  return jnp.concatenate([prefix, (tokens * cos + turned * sin).astype(x.dtype)], axis=1)


class Attention(nnx.Module):
  """Multi-head self-attention with q, k, v packed on their own kernel axis.

  `impl` (the model's `attention` option) picks the attention core: see `attend`.
  `variant`'s `k_bias`, `attn_norm` and `rope` options as `BlockVariant` says.
  """

  def __init__(self, dim: int, heads: int, *, impl: str = 'xla',
               variant: BlockVariant = BlockVariant(), eps: float = 1e-5, dtype, param_dtype,
               rngs: nnx.Rngs):
    head_dim = dim // heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = Dense((dim,), (3, heads, head_dim), ('embed', None, 'heads', 'kv'),
                     use_bias=variant.k_bias, **kw)
    self.qv_bias = (None if variant.k_bias else
                    param(rngs, jax.nn.initializers.zeros, (2, heads, head_dim),
                          (None, 'heads', 'kv'), param_dtype))
    self.norm = (LayerNorm((heads, head_dim), eps=eps, axes=('heads', 'kv'), **kw)
                 if variant.attn_norm else None)
    self.out = Dense((heads, head_dim), (dim,), ('heads', 'kv', 'embed'), **kw)
    self.impl = impl
    self.dtype = dtype

  def project(self, x: jax.Array, norm: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """q, k, v of `norm(x)`: [B, T, 3, H, D], storing `x`, not `norm(x)` (`dense_of`)."""
    qkv = checkpoint_name(dense_of(norm, self.qkv, x), 'qkv')
    if self.qv_bias is None:
      return qkv
    q_bias, v_bias = self.qv_bias[...].astype(self.dtype)
    return qkv + jnp.stack([q_bias, jnp.zeros_like(q_bias), v_bias])

  def output(self, y: jax.Array) -> jax.Array:
    """The output projection of the heads' [B, T, H, D] outputs (after `norm`, if any)."""
    return self.out(y) if self.norm is None else dense_of(self.norm, self.out, y)

  def __call__(self, x: jax.Array, *, causal: bool,
               norm: Callable[[jax.Array], jax.Array] = lambda x: x,
               key_mask: jax.Array | None = None, rope: jax.Array | None = None) -> jax.Array:
    """Attention over `norm(x)`, storing `x`, not `norm(x)` (`dense_of`).

    `key_mask` ([B, T] bool, True = may be attended to) masks keys for every query; with it
    the XLA core runs on every platform (CoCa's text tower, the only user, is small).
    `rope`: the sin/cos table `apply_rope` turns q and k by (before any attention core).
    """
    qkv = self.project(x, norm)  # [B, T, 3, H, D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    if key_mask is None:
      y = attend(q, k, v, causal=causal, impl=self.impl)
    else:
      y = dot_product_attention(q, k, v, causal=causal, key_mask=key_mask)
    return checkpoint_name(self.output(y), 'attn_out')

  def step(self, x: jax.Array, cache: jax.Array, index: jax.Array, *,
           norm: Callable[[jax.Array], jax.Array] = lambda x: x,
           key_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal attention of one new position `index` ([B, 1, dim]) over the cached keys and
    values of positions < `index` (`cache`, [B, T, 2, H, D]) and its own, for generation.

    Returns the output and this position's keys and values [B, 1, 2, H, D]: the caller
    writes them into its cache, so a stacked cache is updated once per step, in place.
    `key_mask` ([B, T]) as in `__call__`.
    """
    qkv = self.project(x, norm)  # [B, 1, 3, H, D]
    kv = qkv[:, :, 1:]
    keys = jax.lax.dynamic_update_slice_in_dim(cache, kv.astype(cache.dtype), index, axis=1)
    visible = jnp.arange(cache.shape[1]) <= index
    visible = jnp.broadcast_to(visible if key_mask is None else key_mask & visible,
                               cache.shape[:2])
    y = dot_product_attention(qkv[:, :, 0], keys[:, :, 0], keys[:, :, 1], key_mask=visible)
    return self.output(y), kv


class CrossAttention(nnx.Module):
  """Queries from `x`, keys and values from `context` (OpenCLIP's cross-attention block).

  The q, k, v kernels stay packed on one axis as OpenCLIP packs `in_proj_weight` (q from the
  text, k and v from the image tokens), so the converter maps it like self-attention.
  """

  def __init__(self, dim: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = Dense((dim,), (3, heads, dim // heads), ('embed', None, 'heads', 'kv'), **kw)
    self.out = Dense((heads, dim // heads), (dim,), ('heads', 'kv', 'embed'), **kw)
    self.dtype = dtype

  def _bias(self) -> jax.Array:
    assert self.qkv.bias is not None  # made with a bias
    return self.qkv.bias[...].astype(self.dtype)

  def project_context(self, context: jax.Array) -> jax.Array:
    """[B, S, dim] -> keys and values [B, S, 2, H, D]: computed once per image in generation."""
    kernel = self.qkv.kernel[...][:, 1:].astype(self.dtype)
    bias = self._bias()[1:]
    return jnp.einsum('bsd,dkhe->bskhe', context.astype(self.dtype), kernel) + bias

  def __call__(self, x: jax.Array, kv: jax.Array) -> jax.Array:
    """`x` [B, T, dim] (normalised) attends over `kv` from `project_context`."""
    kernel = self.qkv.kernel[...][:, 0].astype(self.dtype)
    q = jnp.einsum('btd,dhe->bthe', x.astype(self.dtype), kernel)
    q = q + self._bias()[0]
    return self.out(dot_product_attention(q, kv[:, :, 0], kv[:, :, 1]))


# The kernel per platform the program is compiled for, by `model.attention` ('xla': none).
# 'auto' is what measured best per platform: cuDNN on GPU (+26% ViT-B-16 steps on an H200);
# splash is left out on TPU, as it compiled to more HBM than XLA's path at CLIP's sequence
# lengths and its speed is unmeasured (bench/RESULTS.md, 2026-11-30).
_KERNELS = {'auto': ('cuda',), 'cudnn': ('cuda',), 'splash': ('tpu',), 'xla': ()}


def attend(q, k, v, *, causal: bool, impl: str) -> jax.Array:
  """Attention over [B, T, H, D] q, k, v by the core `impl` names, chosen per platform.

  'xla': `dot_product_attention` everywhere. 'cudnn': cuDNN's flash attention
  (`cudnn_attention`) where the program is compiled for an NVIDIA GPU; 'splash': the Pallas
  kernel (`splash_attention`) where compiled for TPU; 'auto': the measured best per platform
  (`_KERNELS`). Every other platform (CPU) computes `dot_product_attention`, bit for bit, so
  a model trained with any of them evaluates and exports anywhere. The choice is made when
  the program is lowered (`lax.platform_dependent`): one jitted function is right on every
  backend, and a program lowered for another platform (`clip_jax.aot`) gets that platform's
  kernel.
  """
  if not _KERNELS[impl]:
    return dot_product_attention(q, k, v, causal=causal)
  return _platform_attention(q, k, v, causal, _KERNELS[impl])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _platform_attention(q, k, v, causal: bool, platforms: tuple[str, ...]) -> jax.Array:
  return _platform_forward(q, k, v, causal, platforms)[0]


def _platform_forward(q, k, v, causal: bool, platforms: tuple[str, ...]):
  """The output and the residuals every platform keeps: q, k, v, the output and (XLA's)
  the log-sum-exp, [B, H, T, 1] (zeros for the kernels).

  A gradient taken through `lax.platform_dependent` keeps the residuals of every branch,
  those of the branches not taken filled with zeros: the cuDNN branch's padded copies in
  the CPU and TPU programs, the XLA branch's in the GPU one. So the choice is made inside
  this VJP instead, once in the forward and once in the backward pass. The kernels'
  backward passes recompute their forward from q, k, v (inside their own VJPs: no
  [B, H, T, T] tensor), the XLA one is `dot_product_attention`'s. The output is named
  `attn`: a remat policy keeping `attn` saves it, never the logits.
  """
  def xla(q, k, v):
    y, residuals = _attention_forward(q, k, v, None, causal)
    return y, residuals[-1]

  def kernel(platform):
    attend = functools.partial(_KERNEL_FUNCTIONS[platform], causal=causal)
    no_log_sum_exp = jax.ShapeDtypeStruct(q.shape[:1] + (q.shape[2], q.shape[1], 1), jnp.float32)
    return lambda q, k, v: (attend(q, k, v), jnp.zeros_like(no_log_sum_exp))

  y, log_sum_exp = jax.lax.platform_dependent(
      q, k, v, default=xla, **{platform: kernel(platform) for platform in platforms})
  y = checkpoint_name(y, 'attn')
  return y, (q, k, v, y, log_sum_exp)


def _platform_backward(causal: bool, platforms: tuple[str, ...], residuals, dy):
  def kernel(platform):
    attend = functools.partial(_KERNEL_FUNCTIONS[platform], causal=causal)
    return lambda q, k, v, y, log_sum_exp, dy: jax.vjp(attend, q, k, v)[1](dy)

  def xla(q, k, v, y, log_sum_exp, dy):
    return _attention_backward(causal, (q, k, v, None, y, log_sum_exp), dy)[:3]
  return jax.lax.platform_dependent(
      *residuals, dy, default=xla, **{platform: kernel(platform) for platform in platforms})


_platform_attention.defvjp(_platform_forward, _platform_backward)


def dot_product_attention(q, k, v, *, causal: bool = False,
                          key_mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention over [B, T, H, D] inputs, with flash attention's backward pass.

  `key_mask` ([B, S] bool): the keys each row's queries may attend to (all without it).

  The q.k logits come out of the matmul in the compute dtype (bf16 in training, as under
  torch autocast), are scaled and softmaxed in float32, and the weights return to the
  compute dtype for the weights.v matmul; float32 inputs (the parity tests) stay float32
  throughout. `jax.nn.dot_product_attention` (XLA) makes float32 logits instead: the
  [B, H, T, T] tensor then crosses HBM at twice the bytes (the TPU compiler estimated a
  ViT-B-16 block at 5.36 ms that way against 4.63 ms).

  The gradient is written by hand (`jax.custom_vjp`), as flash attention computes it: the
  forward pass keeps q, k, v, the output and each row's float32 log-sum-exp, never the
  [B, H, T, T] weights. The backward pass rebuilds the weights from one q.k matmul and the
  log-sum-exp (elementwise: no max or sum over the rows again), and takes the softmax's
  row term sum_k(dweights * weights) as sum_d(dy * y) over [B, T, H, D] instead of over
  the 3x larger (ViT-B-16) weights. Autodiff of the same function recomputed the whole
  softmax and made that reduction: unrolled est. step ViT-B-16 81.3 -> 76.6 ms, ViT-L-14
  280.6 -> 262.6 ms (v5p, bench/RESULTS.md).
  """
  return _attention(q, k, v, key_mask, causal)


def _scaled_logits(q, k, key_mask, causal: bool) -> jax.Array:
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  if causal:
    # Masked by adding 0 or the lowest float32 (exp gives 0 either way). The [T, T] mask
    # passes through a barrier with q: a mask made of constants alone was broadcast to
    # [B, H, T, T] (bool and float32) once outside a scanned layer loop and kept for the
    # backward pass, in every platform's program under `lax.platform_dependent`.
    t = q.shape[1]
    bias = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, jnp.finfo(jnp.float32).min)
    bias, _ = jax.lax.optimization_barrier((bias, q))
    logits = logits + bias
  return logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_mask, causal: bool) -> jax.Array:
  return _attention_forward(q, k, v, key_mask, causal)[0]


def _attention_forward(q, k, v, key_mask, causal: bool):
  logits = _scaled_logits(q, k, key_mask, causal)
  # Softmax as max, exp, sum, divide, the log-sum-exp its by-product. `jax.nn.logsumexp`
  # and then exp(logits - log_sum_exp) cost about the same at T = 197 (ViT-B-16), but at 257
  # (ViT-L-14), unrolled, XLA laid the logits out batch-minor and copied them to and fro
  # (4 [B, H, T, T] copies a layer: est. step +9%, bench/RESULTS.md).
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  exp_logits = jnp.exp(logits - row_max)
  row_sum = jnp.sum(exp_logits, axis=-1, keepdims=True)
  y = jnp.einsum('bhqk,bkhd->bqhd', (exp_logits / row_sum).astype(v.dtype), v)
  log_sum_exp = row_max + jnp.log(row_sum)
  # Named here, where the backward pass reads it: a remat policy that keeps `attn` then does
  # not recompute the output (named only outside, it was kept and recomputed all the same).
  # The log-sum-exp is left to such a policy to recompute: its q.k matmul merges with the
  # backward pass's own. Saved across the remat boundary, its layout (batch minor) made XLA
  # copy the [B, H, T, T] logits to match it, forward and backward (ViT-B-16's estimated
  # step +10% under `minimal`).
  y = checkpoint_name(y, 'attn')
  return y, (q, k, v, key_mask, y, log_sum_exp)


def _attention_backward(causal: bool, residuals, dy):
  q, k, v, key_mask, y, log_sum_exp = residuals
  weights = jnp.exp(_scaled_logits(q, k, key_mask, causal) - log_sum_exp)
  dv = jnp.einsum('bhqk,bqhd->bkhd', weights.astype(v.dtype), dy)
  dweights = jnp.einsum('bqhd,bkhd->bhqk', dy, v).astype(jnp.float32)
  row_term = jnp.einsum('bqhd,bqhd->bhq', dy.astype(jnp.float32), y.astype(jnp.float32))
  dlogits = (weights * (dweights - row_term[..., None]) * q.shape[-1] ** -0.5).astype(q.dtype)
  return (jnp.einsum('bhqk,bkhd->bqhd', dlogits, k), jnp.einsum('bhqk,bqhd->bkhd', dlogits, q),
          dv, None)


_attention.defvjp(_attention_forward, _attention_backward)


def splash_attention(q, k, v, *, causal: bool = False, interpret: bool = False) -> jax.Array:
  """`dot_product_attention` by the Pallas splash (flash) attention kernel for TPU.

  The kernel never writes the [B, H, T, T] logits to HBM, in the forward or the backward
  pass. It tiles the sequence by 128, so T is padded up (197 -> 256 for ViT-B-16, 77 ->
  128 for the text tower) and the padding masked out by segment ids (real tokens see only
  real tokens). A Pallas call is opaque to GSPMD: it runs per device under `shard_map`
  over the batch axes (and `tensor` for the heads) of the mesh in context. `interpret`
  runs the kernel in Python on any backend (the CPU tests).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  def attend(q, k, v):  # [B, T, H, D] on one device
    _, t, heads, head_dim = q.shape
    padded = -(-t // 128) * 128
    block = next(size for size in (512, 256, 128) if padded % size == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                          block_q_dq=block, block_kv_dq=block)
    mask = (sm.CausalMask if causal else sm.FullMask)((padded, padded))
    kernel = sk.make_splash_mha(sm.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    ids = (jnp.arange(padded) >= t).astype(jnp.int32)
    segments = sk.SegmentIds(q=ids, kv=ids) if padded != t else None
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # the kernel does not scale
    to_heads_first = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))
                                       ).transpose(0, 2, 1, 3)
    y = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(
        *map(to_heads_first, (q, k, v)))
    return y.transpose(0, 2, 1, 3)[:, :t]

  # Keeps q, k, v for the backward pass, not the kernel's padded copies and output.
  return checkpoint_name(recomputed(per_device(attend))(q, k, v), 'attn')


def per_device(attend: Callable) -> Callable:
  """`attend` over [B, T, H, D] q, k, v run on each device's own rows and heads.

  Under `shard_map` over the batch axes of the mesh in context (heads over `tensor`) when
  there is one: a kernel call is opaque to GSPMD, which would otherwise gather its inputs
  or, for cuDNN, split them one way and its per-row sequence lengths another.
  """

  def sharded(q, k, v):
    mesh = jax.sharding.get_abstract_mesh()
    batch = context_batch_axes(q.shape[0])
    if not batch and 'tensor' not in mesh.axis_names:
      return attend(q, k, v)
    heads = 'tensor' if ('tensor' in mesh.axis_names
                         and q.shape[2] % mesh.shape['tensor'] == 0) else None
    spec = P(batch or None, None, heads, None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)

  return sharded


# cuDNN's flash attention takes sequences padded to a multiple of this (see `cudnn_attention`).
CUDNN_SEQUENCE_MULTIPLE = 16


def cudnn_attention(q, k, v, *, causal: bool = False) -> jax.Array:
  """`dot_product_attention` by cuDNN's flash attention (`jax.nn.dot_product_attention`).

  The kernel never writes the [B, H, T, T] logits to memory, in the forward or the backward
  pass. Its training path refuses odd sequence lengths (77, 197, 257: "Unsupported
  sequence length"), so T is padded to a multiple of `CUDNN_SEQUENCE_MULTIPLE` (197 -> 208,
  77 -> 80; measured on an H200, docs/performance.md) and the padding masked out by
  `query_seq_lengths`/`key_value_seq_lengths` = the true T (the causal mask kept); the
  output is cut back to T. What cuDNN cannot do at all (float32, a head dim over 128 or not
  a multiple of 8, no cuDNN installed) is found when the program is traced and computed by
  `dot_product_attention` instead, with one log line (`cudnn_refusal`), never an error at
  compile or run time. It runs per device (`per_device`).
  """
  t = q.shape[1]
  padded = -(-t // CUDNN_SEQUENCE_MULTIPLE) * CUDNN_SEQUENCE_MULTIPLE
  if cudnn_refusal(tuple(q.shape), padded, str(q.dtype), causal):
    return dot_product_attention(q, k, v, causal=causal)

  def attend(q, k, v):  # [B, T, H, D] on one device
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
    lengths = jnp.full(q.shape[:1], t, jnp.int32) if padded != t else None
    y = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal,
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation='cudnn')
    return y[:, :t]

  return checkpoint_name(per_device(attend)(q, k, v), 'attn')


_KERNEL_FUNCTIONS = {'cuda': cudnn_attention, 'tpu': splash_attention}


@functools.cache
def cudnn_refusal(shape: tuple[int, ...], padded: int, dtype: str, causal: bool) -> str:
  """Why cuDNN cannot run attention over q, k, v of `shape` padded to `padded` tokens ('' if
  it can), logged once per shape. JAX's own checks decide (they run when the call is
  traced), asked here on shapes alone before any real call is traced.
  """
  b, _, heads, head_dim = shape
  x = jax.ShapeDtypeStruct((b, padded, heads, head_dim), jnp.dtype(dtype))
  lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
  try:
    jax.eval_shape(functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                     implementation='cudnn'),
                   x, x, x, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  except (NotImplementedError, ValueError) as e:  # (NotImplementedError is a RuntimeError)
    logging.warning('cuDNN flash attention cannot take q, k, v of shape %s %s (%s): '
                    'attention over them uses the XLA path on GPU', list(shape), dtype, e)
    return str(e)
  except RuntimeError as e:  # no cuDNN here: this install cannot run on an NVIDIA GPU anyway
    logging.debug('cuDNN attention unavailable (%s): the XLA attention instead', e)
    return str(e)
  return ''


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init: float, *, param_dtype, rngs: nnx.Rngs):
    self.gamma = param(rngs, jax.nn.initializers.constant(init), (dim,), ('embed',), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x)) (optional LayerScale);
  `variant` (`BlockVariant`): timm Eva's options, post-norm among them."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, *, act: str, eps: float,
               ls_init: float | None, attention: str = 'xla',
               variant: BlockVariant = BlockVariant(), dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = LayerNorm(dim, eps=eps, **kw)
    self.attn = Attention(dim, heads, impl=attention, variant=variant, eps=eps, **kw)
    self.ln_2 = LayerNorm(dim, eps=eps, **kw)
    self.mlp = MLP(dim, mlp_dim, act, gated=variant.gated_mlp,
                   norm_eps=eps if variant.mlp_norm else None, **kw)
    self.post_norm = variant.post_norm
    if ls_init is not None:
      self.ls_1: LayerScale | None = LayerScale(dim, ls_init, param_dtype=param_dtype, rngs=rngs)
      self.ls_2: LayerScale | None = LayerScale(dim, ls_init, param_dtype=param_dtype, rngs=rngs)
    else:
      self.ls_1 = self.ls_2 = None

  def __call__(self, x: jax.Array, *, causal: bool, key_mask: jax.Array | None = None,
               rope: jax.Array | None = None) -> jax.Array:
    if self.post_norm:
      x = x + self.ln_1(self.attn(x, causal=causal, key_mask=key_mask, rope=rope))
      return x + self.ln_2(self.mlp(x))
    h = self.attn(x, causal=causal, norm=self.ln_1, key_mask=key_mask, rope=rope)
    x = x + (self.ls_1(h) if self.ls_1 is not None else h)
    h = self.mlp(x, norm=self.ln_2)
    return x + (self.ls_2(h) if self.ls_2 is not None else h)

  def step(self, x: jax.Array, cache: jax.Array, index: jax.Array,
           key_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`__call__` (causal) for one new position with a key-value cache (`Attention.step`):
    the output [B, 1, dim] and the position's keys and values."""
    h, kv = self.attn.step(x, cache, index, norm=self.ln_1, key_mask=key_mask)
    x = x + (self.ls_1(h) if self.ls_1 is not None else h)
    h = self.mlp(x, norm=self.ln_2)
    return x + (self.ls_2(h) if self.ls_2 is not None else h), kv


# Names the block gives its matmul outputs (`checkpoint_name`), for the policies below.
ACTIVATION_NAMES = ('qkv', 'attn', 'attn_out', 'mlp_hidden')
_save_only = jax.checkpoint_policies.save_only_these_names

# What each layer keeps for the backward pass (the layer input always); docs/performance.md.
_REMAT_POLICIES = {
    # Every matmul output: recomputes only LayerNorm, GELU, residual adds (maxtext's 'minimal').
    'minimal': _save_only(*ACTIVATION_NAMES),
    # The attention half: recomputes the MLP's first matmul (+~11% FLOPs), not its hidden.
    'save_attn': _save_only('qkv', 'attn', 'attn_out'),
    # 'minimal' kept in host memory: moved out after the forward, back for the backward.
    'minimal_offloaded': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(ACTIVATION_NAMES),
        offload_src='device', offload_dst='pinned_host'),
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """`layers` blocks stored stacked (leading axis = layer), run by scan or by a loop.

  One parameter layout for both execution modes keeps checkpoints and the OpenCLIP
  converter independent of `scan_layers`: `scan_layers=False` fully unrolls the same scan
  (bigger program, more room for XLA to fuse across layers); `unroll` layers per iteration
  of the scanned loop are the middle ground. `remat` wraps each layer in
  `jax.checkpoint` with the named policy. Each layer's input and output are pinned to the
  batch axes of the mesh (`sharding.constrain_batch`), which GSPMD lost inside the scan.
  """

  def __init__(self, layers: int, dim: int, heads: int, mlp_dim: int, *, act: str, eps: float,
               ls_init: float | None, scan: bool, remat: str, attention: str = 'xla',
               unroll: int = 1, variant: BlockVariant = BlockVariant(), dtype, param_dtype,
               rngs: nnx.Rngs):

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(dim, heads, mlp_dim, act=act, eps=eps, ls_init=ls_init, attention=attention,
                   variant=variant, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.layers = layers
    self.scan = scan
    self.unroll = unroll
    self.remat = remat

  def __call__(self, x: jax.Array, *, causal: bool, key_mask: jax.Array | None = None,
               rope: jax.Array | None = None) -> jax.Array:
    """`key_mask` ([B, T] bool): keys every layer's attention may see (all without it).
    `rope`: the rotary sin/cos table every layer's attention applies (`apply_rope`)."""
    return run_layers(self.blocks, x,
                      lambda block, x: block(x, causal=causal, key_mask=key_mask, rope=rope),
                      layers=self.layers, scan=self.scan, unroll=self.unroll, remat=self.remat)


def run_layers(stacked: nnx.Module, x: jax.Array, apply: Callable[..., jax.Array], *,
               layers: int, scan: bool, unroll: int, remat: str, xs: Any = None) -> jax.Array:
  """`apply(layer, x)` for each layer of `stacked` (modules stacked on a leading axis), by
  `lax.scan` (`unroll` layers per iteration; all of them without `scan`), each layer
  rematerialised by the `remat` policy and its input and output pinned to the batch axes.
  With `xs` (arrays with a leading layer axis), `apply(layer, x, xs_of_the_layer)`.
  What the layers change of their `nnx.BatchStat`s (BatchNorm's running statistics in
  training) is written back into `stacked`; models without BatchNorm have none."""
  graphdef, state = nnx.split(stacked)

  def layer(x, inputs):
    layer_state, extra = inputs
    block = nnx.merge(graphdef, layer_state)
    x = apply(block, constrain_batch(x)) if xs is None else apply(block, constrain_batch(x), extra)
    return constrain_batch(x), nnx.state(block, nnx.BatchStat)

  if remat != 'none':
    layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[remat], prevent_cse=not scan)
  x, stats = jax.lax.scan(layer, x, (state, xs), unroll=unroll if scan else layers)
  if jax.tree.leaves(stats):
    nnx.update(stacked, stats)
  return x


def run_block(module: nnx.Module, x: jax.Array, apply: Callable[..., jax.Array], *,
              remat: str) -> jax.Array:
  """`apply(module, x)` for one unstacked layer, as `run_layers` runs each stacked one:
  rematerialised by the `remat` policy, input and output pinned to the batch axes, its
  `nnx.BatchStat` changes written back."""
  graphdef, state = nnx.split(module)

  def layer(x, state):
    block = nnx.merge(graphdef, state)
    return constrain_batch(apply(block, constrain_batch(x))), nnx.state(block, nnx.BatchStat)

  if remat != 'none':
    layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[remat])
  x, stats = layer(x, state)
  if jax.tree.leaves(stats):
    nnx.update(module, stats)
  return x


def step_layers(stacked: nnx.Module, x: jax.Array, caches,
                apply: Callable[..., tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """`x, new = apply(layer, x, cache)` for each layer of `stacked` and its slice of `caches`
  (pytrees stacked on a leading layer axis, as the layers are), by `lax.scan`: one new
  position through the layers in generation. Returns `x` and the stacked `new` entries."""
  graphdef, state = nnx.split(stacked)

  def layer(x, xs):
    layer_state, cache = xs
    return apply(nnx.merge(graphdef, layer_state), x, cache)

  return jax.lax.scan(layer, x, (state, caches))
