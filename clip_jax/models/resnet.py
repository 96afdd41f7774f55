"""ModifiedResNet image tower: OpenAI CLIP's ResNet (OpenCLIP `open_clip/modified_resnet.py`).

Channels-last throughout (NHWC activations, HWIO kernels). Stem: three 3x3 convs (the first
with stride 2), each with BatchNorm and ReLU, then a 2x2 average pool. Then 4 stages of
bottleneck blocks, `relu(bn3(conv3(pool(relu(bn2(conv2(relu(bn1(conv1(x))))))))) + shortcut)`.
The first block of stages 2-4 halves the grid by average pooling after its 3x3 conv, and its
shortcut is avgpool, 1x1 conv, BatchNorm (anti-aliased downsampling: no strided conv in the
blocks). The first block of stage 1 has the conv shortcut without the pool, since it widens
the channels. Head: AttentionPool2d, the mean token and the grid's tokens plus a learned
position embedding, attended by the mean token alone, projected to `embed_dim`.

The first block of a stage differs from the others (width, grid, shortcut), so it is its own
module; the rest are stored stacked (leading axis = block) and run by `run_layers`,
scanned with `scan_layers` and rematerialised by the `remat` policy as the ViT's layers
are. The stem and the first blocks run through `run_block` under the same policy. Conv
kernels and per-channel vectors are sharded over their output channels (`embed`, which FSDP
takes). BatchNorm's running statistics are replicated, see `clip_jax/models/batch_norm.py`
for where they live and how they are updated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models.batch_norm import BatchNorm
from clip_jax.models.config import ResNetConfig
from clip_jax.models.convnext import Conv
from clip_jax.models.layers import Dense, dot_product_attention, param, run_block, run_layers

# He init for convs followed by ReLU (torch's default differs; BatchNorm follows every conv).
_CONV_INIT = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torch's AvgPool2d(size) (stride = size, no padding) over NHWC; identity for size 1."""
  if size == 1:
    return x
  b, h, w, c = x.shape
  h, w = h // size, w // size
  x = x[:, :h * size, :w * size].reshape(b, h, size, w, size, c)
  return x.mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


class ConvBN(nnx.Module):
  """A conv without bias, then BatchNorm."""

  def __init__(self, in_ch: int, out_ch: int, size: int, *, stride: int = 1, sync: bool,
               zero_init: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = Conv(in_ch, out_ch, size, stride=stride, padding=size // 2, use_bias=False,
                     kernel_init=_CONV_INIT, **kw)
    self.bn = BatchNorm(out_ch, sync=sync, zero_init=zero_init, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class Stem(nnx.Module):
  """3x3 convs to width/2 (stride 2), width/2 and width, each with BN and ReLU; 2x2 pool."""

  def __init__(self, width: int, *, sync: bool, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(sync=sync, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = ConvBN(3, width // 2, 3, stride=2, **kw)
    self.conv2 = ConvBN(width // 2, width // 2, 3, **kw)
    self.conv3 = ConvBN(width // 2, width, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in (self.conv1, self.conv2, self.conv3):
      x = jax.nn.relu(conv(x))
    return avg_pool(x, 2)


class Bottleneck(nnx.Module):
  """1x1 conv, 3x3 conv, (avgpool), 1x1 conv to 4x planes, each with BN; ReLU after the
  residual add. The shortcut is (avgpool) 1x1 conv + BN where the shape changes. The last
  BN's scale starts at 0 (OpenCLIP's init), so each block starts as its shortcut."""

  def __init__(self, inplanes: int, planes: int, stride: int, *, sync: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(sync=sync, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    out = planes * 4
    self.conv1 = ConvBN(inplanes, planes, 1, **kw)
    self.conv2 = ConvBN(planes, planes, 3, **kw)
    self.conv3 = ConvBN(planes, out, 1, zero_init=True, **kw)
    self.downsample = (ConvBN(inplanes, out, 1, **kw) if stride > 1 or inplanes != out
                       else None)
    self.stride = stride

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.conv1(x))
    h = jax.nn.relu(self.conv2(h))
    h = self.conv3(avg_pool(h, self.stride))
    shortcut = x if self.downsample is None else self.downsample(avg_pool(x, self.stride))
    return jax.nn.relu(h + shortcut)


class Stage(nnx.Module):
  """The first block (`first`: it changes the width, and in stages 2-4 the grid), then
  `depth - 1` alike blocks stored stacked (`blocks`; None for a stage of one block)."""

  def __init__(self, inplanes: int, planes: int, depth: int, stride: int, *, sync: bool,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(sync=sync, dtype=dtype, param_dtype=param_dtype)
    self.first = Bottleneck(inplanes, planes, stride, rngs=rngs, **kw)

    @nnx.split_rngs(splits=max(depth - 1, 1))
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Bottleneck:
      return Bottleneck(planes * 4, planes, 1, rngs=rngs, **kw)

    self.blocks = make_blocks(rngs) if depth > 1 else None
    self.depth = depth

  def __call__(self, x: jax.Array, run: Callable[..., jax.Array], remat: str) -> jax.Array:
    x = run_block(self.first, x, lambda block, x: block(x), remat=remat)
    if self.blocks is None:
      return x
    return run(self.blocks, x, lambda block, x: block(x), layers=self.depth - 1)


class AttentionPool(nnx.Module):
  """OpenCLIP's AttentionPool2d: tokens [B, T, C] -> [B, embed_dim]. The tokens' mean goes
  first, the position embedding ([T + 1, C], scale C^-0.5) is added, and the mean token
  alone queries all of them (`heads` heads). Then `c_proj`. OpenCLIP's init: normal with
  std C^-0.5 for the q, k, v and c_proj weights."""

  def __init__(self, tokens: int, dim: int, heads: int, embed_dim: int, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(dim ** -0.5)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=init)
    hd = (heads, dim // heads)
    self.pos_embed = param(rngs, init, (tokens + 1, dim), (None, 'embed'), param_dtype)
    self.q = Dense((dim,), hd, ('embed', 'heads', 'kv'), **kw)
    self.k = Dense((dim,), hd, ('embed', 'heads', 'kv'), **kw)
    self.v = Dense((dim,), hd, ('embed', 'heads', 'kv'), **kw)
    self.c_proj = Dense(hd, (embed_dim,), ('heads', 'kv', 'proj'), **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = x.mean(axis=1, keepdims=True, dtype=jnp.float32).astype(x.dtype)
    x = jnp.concatenate([mean, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    y = dot_product_attention(self.q(x[:, :1]), self.k(x), self.v(x))  # [B, 1, H, D]
    return self.c_proj(y[:, 0])


class ModifiedResNet(nnx.Module):
  """`encode(images)` -> (features [B, embed_dim], final feature map as tokens [B, HW, C])."""

  def __init__(self, cfg: ResNetConfig, embed_dim: int, *, scan: bool, remat: str,
               attention: str = 'xla', dtype, param_dtype, rngs: nnx.Rngs):
    del attention  # the pool's one query over <= 197 tokens: the XLA core
    kw = dict(sync=cfg.sync_bn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.scan, self.remat = scan, remat
    w = cfg.width
    self.stem = Stem(w, **kw)
    self.layer1 = Stage(w, w, cfg.depths[0], 1, **kw)
    self.layer2 = Stage(w * 4, w * 2, cfg.depths[1], 2, **kw)
    self.layer3 = Stage(w * 8, w * 4, cfg.depths[2], 2, **kw)
    self.layer4 = Stage(w * 16, w * 8, cfg.depths[3], 2, **kw)
    self.attnpool = AttentionPool(cfg.grid ** 2, cfg.features, cfg.heads, embed_dim,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  @property
  def stages(self) -> tuple[Stage, ...]:
    return (self.layer1, self.layer2, self.layer3, self.layer4)

  def features(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> the last stage's feature map [B, H/32, W/32, 32 x width]."""

    def run(stacked, x, apply, *, layers):
      return run_layers(stacked, x, apply, layers=layers, scan=self.scan,
                        unroll=self.cfg.scan_unroll, remat=self.remat)

    x = run_block(self.stem, images, lambda stem, x: stem(x), remat=self.remat)
    for stage in self.stages:
      x = stage(x, run, self.remat)
    return x

  def encode(self, images: jax.Array, dropout_keys: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Pooled, projected features and the final feature map as [B, HW, C] tokens.
    `dropout_keys` is accepted for the towers' common signature; nothing here is random."""
    del dropout_keys
    x = self.features(images)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    return self.attnpool(tokens), tokens

  def __call__(self, images: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
    return self.encode(images, dropout_keys)[0]
