"""ConvNeXt image tower: timm's `convnext_*` trunk and OpenCLIP's `TimmModel` head.

Channels-last throughout (NHWC activations, HWIO kernels): stem (4x4 stride-4 conv,
LayerNorm), 4 stages (the later three open with LayerNorm + 2x2 stride-2 conv) of blocks
`x + drop_path(gamma * mlp(norm(dwconv7x7(x))))`, then global average pool, the head
LayerNorm and OpenCLIP's projection (`linear` without bias, or `mlp`). This is what
OpenCLIP builds for `timm_pool: ''` (timm's own head: pool, norm; no classifier) with
`timm_proj: linear|mlp`.

Each stage's blocks are stored stacked (leading axis = block) and run by `run_layers`
(scanned with `scan_layers`, rematerialised by the `remat` policy), as the ViT's layers
are. Parameters carry logical axes: conv kernels and every per-channel vector are sharded
over their output channels (`embed`, FSDP), MLP hidden units over `mlp`, the projection's
output over `proj`. Stochastic depth (timm's `drop_path`, per image, rates rising
linearly over the blocks) runs only when the call is given one random key per image.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from clip_jax.models.config import ConvNeXtConfig
from clip_jax.models.layers import (
  MLP,
  Dense,
  Initializer,
  LayerNorm,
  activation,
  param,
  run_layers,
)

# timm's init for convolutions and linear layers (biases start at zero).
_INIT = jax.nn.initializers.truncated_normal(0.02)


class Conv(nnx.Module):
  """A 2-D convolution over NHWC inputs, kernel HWIO; `groups == channels`: depthwise."""

  def __init__(self, in_ch: int, out_ch: int, size: int, *, stride: int = 1, padding: int = 0,
               groups: int = 1, use_bias: bool = True, kernel_init: Initializer = _INIT, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.kernel = param(rngs, kernel_init, (size, size, in_ch // groups, out_ch),
                        (None, None, None, 'embed'), param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_ch,), ('embed',), param_dtype)
                 if use_bias else None)
    self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if self.groups == 1 and self.stride == kernel.shape[0] and not self.padding:
      y = patchify_conv(x, kernel)
    elif self.groups == x.shape[-1] and self.stride == 1:
      y = depthwise_conv(x, kernel[:, :, 0], self.padding)
    else:
      pad = ((self.padding, self.padding),) * 2
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.stride,) * 2, pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=self.groups)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def patchify_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A conv whose stride is its kernel size (no padding) as one matmul over the patches:
  the same numbers, and XLA's CPU backward of a strided conv is avoided. Rows and columns
  past the last whole patch are ignored, as by the conv."""
  p = kernel.shape[0]
  b, h, w, c = x.shape
  h, w = h // p, w // p
  patches = x[:, :h * p, :w * p].reshape(b, h, p, w, p, c)
  return jnp.einsum('bhpwqc,pqco->bhwo', patches, kernel)


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """A stride-1 depthwise conv ([k, k, C] kernel, zero padding) as a sum of shifted
  products: one elementwise fusion forward and backward. XLA's CPU grouped convolution
  took ~40x longer per step under `lax.scan` (its kernel gradient)."""
  k = kernel.shape[0]
  h, w = x.shape[1] + 2 * padding - k + 1, x.shape[2] + 2 * padding - k + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = jnp.zeros(x.shape[:1] + (h, w) + x.shape[3:], x.dtype)
  for i in range(k):
    for j in range(k):
      out = out + xp[:, i:i + h, j:j + w] * kernel[i, j]
  return out


def drop_path(h: jax.Array, rate: jax.Array, keys: jax.Array, index: jax.Array) -> jax.Array:
  """timm's DropPath: each image's residual branch zeroed with probability `rate`, the kept
  ones scaled by 1 / (1 - rate). Block `index` draws from each image's key folded with it,
  so what is dropped depends on the image's key only, not on the batch split."""
  keep = 1.0 - rate
  u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, index)))(keys)
  mask = (u < keep).astype(h.dtype) / keep.astype(h.dtype)
  return h * mask[:, None, None, None]


class Block(nnx.Module):
  """Depthwise 7x7 conv -> LayerNorm -> MLP (4x, GELU) -> LayerScale, on a residual."""

  def __init__(self, dim: int, *, eps: float, ls_init: float | None, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv_dw = Conv(dim, dim, 7, padding=3, groups=dim, **kw)
    self.norm = LayerNorm(dim, eps=eps, **kw)
    self.mlp = MLP(dim, 4 * dim, 'gelu', kernel_init=_INIT, **kw)
    self.gamma = (param(rngs, jax.nn.initializers.constant(ls_init), (dim,), ('embed',),
                        param_dtype) if ls_init is not None else None)

  def __call__(self, x: jax.Array, rate: jax.Array | None = None, keys: jax.Array | None = None,
               index: jax.Array | None = None) -> jax.Array:
    h = checkpoint_name(self.conv_dw(x), 'conv_dw')
    h = self.mlp(h, norm=self.norm)
    if self.gamma is not None:
      h = h * self.gamma[...].astype(h.dtype)
    if keys is not None and rate is not None and index is not None:
      h = drop_path(h, rate, keys, index)
    return x + h


class Stage(nnx.Module):
  """(LayerNorm + 2x2 stride-2 conv, except the first stage) then `depth` stacked blocks."""

  def __init__(self, in_dim: int, dim: int, depth: int, *, first: bool, cfg: ConvNeXtConfig,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down_norm = None if first else LayerNorm(in_dim, eps=cfg.norm_eps, **kw)
    self.down = None if first else Conv(in_dim, dim, 2, stride=2, **kw)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(dim, eps=cfg.norm_eps, ls_init=cfg.ls_init, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.depth = depth

  def __call__(self, x: jax.Array, run: Callable[..., jax.Array], rates: tuple[float, ...],
               first_index: int, keys: jax.Array | None) -> jax.Array:
    if self.down is not None and self.down_norm is not None:
      x = self.down(self.down_norm(x))
    if keys is None:
      return run(self.blocks, x, lambda block, x: block(x), layers=self.depth)
    xs = (jnp.asarray(rates, jnp.float32), first_index + jnp.arange(self.depth))
    return run(self.blocks, x, lambda block, x, extra: block(x, extra[0], keys, extra[1]),
               layers=self.depth, xs=xs)


class ConvNeXt(nnx.Module):
  """`encode(images)` -> (features [B, embed_dim], final feature map as tokens [B, HW, C])."""

  def __init__(self, cfg: ConvNeXtConfig, embed_dim: int, *, scan: bool, remat: str,
               attention: str = 'xla', dtype, param_dtype, rngs: nnx.Rngs):
    del attention  # no attention in this tower
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.scan, self.remat = scan, remat
    dims = cfg.dims
    self.stem = Conv(3, dims[0], 4, stride=4, **kw)
    self.stem_norm = LayerNorm(dims[0], eps=cfg.norm_eps, **kw)
    self.stage0 = Stage(dims[0], dims[0], cfg.depths[0], first=True, cfg=cfg, **kw)
    self.stage1 = Stage(dims[0], dims[1], cfg.depths[1], first=False, cfg=cfg, **kw)
    self.stage2 = Stage(dims[1], dims[2], cfg.depths[2], first=False, cfg=cfg, **kw)
    self.stage3 = Stage(dims[2], dims[3], cfg.depths[3], first=False, cfg=cfg, **kw)
    self.head_norm = LayerNorm(dims[-1], eps=cfg.norm_eps, **kw)
    if cfg.head_proj == 'linear':
      self.proj: Dense | None = Dense((dims[-1],), (embed_dim,), ('embed', 'proj'),
                                      use_bias=cfg.proj_bias, **kw)
      self.head_mlp: HeadMLP | None = None
    else:
      self.proj = None
      self.head_mlp = HeadMLP(dims[-1], embed_dim, bias=cfg.proj_bias, **kw)

  @property
  def stages(self) -> tuple[Stage, ...]:
    return (self.stage0, self.stage1, self.stage2, self.stage3)

  def features(self, images: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
    """[B, H, W, 3] -> the last stage's feature map [B, H/32, W/32, dims[-1]]."""
    cfg = self.cfg

    def run(stacked, x, apply, *, layers, xs=None):
      return run_layers(stacked, x, apply, layers=layers, scan=self.scan,
                        unroll=cfg.scan_unroll, remat=self.remat, xs=xs)

    keys = dropout_keys if cfg.drop_path > 0 else None
    x = self.stem_norm(self.stem(images))
    first = 0
    for stage, rates in zip(self.stages, cfg.drop_path_rates):
      x = stage(x, run, rates, first, keys)
      first += stage.depth
    return x

  def encode(self, images: jax.Array, dropout_keys: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Projected features and the final feature map as [B, HW, C] tokens.

    `dropout_keys` (one key per image, training only) turns on `cfg.drop_path`.
    """
    x = self.features(images, dropout_keys)
    pooled = self.head_norm(x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype))
    out = self.proj(pooled) if self.proj is not None else self.head_mlp(pooled)  # type: ignore[misc]
    return out, x.reshape(x.shape[0], -1, x.shape[-1])

  def __call__(self, images: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
    return self.encode(images, dropout_keys)[0]


class HeadMLP(nnx.Module):
  """OpenCLIP's `timm_proj: mlp`: Linear(width, 2*embed) with bias, GELU, Linear(2*embed,
  embed) (bias with `proj_bias`)."""

  def __init__(self, dim: int, embed_dim: int, *, bias: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense((dim,), (2 * embed_dim,), ('embed', 'mlp'), **kw)
    self.fc2 = Dense((2 * embed_dim,), (embed_dim,), ('mlp', 'proj'), use_bias=bias, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation('gelu')(self.fc1(x)))
