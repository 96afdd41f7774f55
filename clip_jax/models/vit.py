"""ViT image tower: patches -> (class token) + position embedding -> blocks -> pool -> proj.

Covers OpenCLIP's native VisionTransformer (class token, ln_pre, `tok`/`gap` pooling,
projection without bias, CoCa's attentional pooler) and timm's SigLIP trunk (patch bias, no
class token, MAP head); `models/eva.py` extends it to timm's Eva trunks (EVA-01/02, PE-Core:
rotary embeddings, SwiGLU, ...). `encode` also returns the image tokens a caption decoder reads.
Images are NHWC floats, already normalised, or with `vision.naflex` padded patch sequences
at each image's own aspect ratio (`models/naflex.py`). Given one random key per image,
training drops a fraction of the patch tokens (FLIP's patch dropout) before the blocks run.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clip_jax.models.config import VisionConfig
from clip_jax.models.layers import (
  MLP,
  BlockVariant,
  Dense,
  LayerNorm,
  Transformer,
  dot_product_attention,
  param,
)
from clip_jax.models.naflex import (
  NaFlexPatches,
  kept_valid_patches,
  resized_position_embedding,
  square_patches,
)

Images = jax.Array | NaFlexPatches


def kept_patch_indices(keys: jax.Array, patches: int, keep: int) -> jax.Array:
  """[B, keep] the grid indices of the patches each image's key keeps (`drop_patches`); a
  LocCa decoder places the kept tokens by them."""
  noise = jax.vmap(lambda key: jax.random.uniform(key, (patches,)))(keys)
  return jax.lax.top_k(noise, keep)[1]


def drop_patches(x: jax.Array, keep: int, prefix: int, keys: jax.Array) -> jax.Array:
  """Keeps `keep` random patch tokens of each image, plus its `prefix` (class) token.

  A gather, not a mask: the blocks then run on fewer tokens, which is where FLIP's saving
  comes from. `keys` holds one random key per image, so an image's kept patches depend on
  its key only, not on how the batch is split over devices or micro-batches.
  """
  return take_patches(x, kept_patch_indices(keys, x.shape[1] - prefix, keep), prefix)


def take_patches(x: jax.Array, kept: jax.Array, prefix: int) -> jax.Array:
  """The patch tokens at grid indices `kept` ([B, keep]) of each image, after its `prefix`."""
  patches = jnp.take_along_axis(x[:, prefix:], kept[..., None], axis=1)
  return jnp.concatenate([x[:, :prefix], patches], axis=1)


class MAPHead(nnx.Module):
  """Multihead attention pooling: one learned query attends over all tokens (timm's
  `AttentionPoolLatent`: SigLIP with the trunk's heads and MLP, PE-Core with its own)."""

  def __init__(self, d: int, h: int, mlp_dim: int, act: str, eps: float, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.latent = param(rngs, jax.nn.initializers.normal(d ** -0.5), (1, d), (None, 'embed'),
                        param_dtype)
    self.q = Dense((d,), (h, d // h), ('embed', 'heads', 'kv'), **kw)
    self.kv = Dense((d,), (2, h, d // h), ('embed', None, 'heads', 'kv'), **kw)
    self.out = Dense((h, d // h), (d,), ('heads', 'kv', 'embed'), **kw)
    self.norm = LayerNorm(d, eps=eps, **kw)
    self.mlp = MLP(d, mlp_dim, act, **kw)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """`key_mask` ([B, T] bool): the tokens the query may attend to (NaFlex: not padding)."""
    latent = jnp.broadcast_to(self.latent[...], (x.shape[0],) + self.latent.shape)
    q = self.q(latent)
    kv = self.kv(x)
    y = self.out(dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], key_mask=key_mask))
    y = y + self.mlp(y, norm=self.norm)
    return y[:, 0]


class AttentionalPooler(nnx.Module):
  """CoCa's pooler (OpenCLIP `AttentionalPooler`): `queries` learned queries attend over the
  tokens, keys from width `context_dim` into width `dim`. The q, k, v projections are
  separate kernels and one packed bias, as in torch's MultiheadAttention with kdim != dim."""

  def __init__(self, dim: int, context_dim: int, heads: int, queries: int, eps: float, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hd = (heads, dim // heads)
    self.query = param(rngs, jax.nn.initializers.normal(1.0), (queries, dim), (None, 'embed'),
                       param_dtype)
    self.ln_q = LayerNorm(dim, eps=eps, **kw)
    self.ln_k = LayerNorm(context_dim, eps=eps, **kw)
    self.q = Dense((dim,), hd, ('embed', 'heads', 'kv'), use_bias=False, **kw)
    self.k = Dense((context_dim,), hd, ('embed', 'heads', 'kv'), use_bias=False, **kw)
    self.v = Dense((context_dim,), hd, ('embed', 'heads', 'kv'), use_bias=False, **kw)
    self.in_bias = param(rngs, jax.nn.initializers.zeros, (3,) + hd, (None, 'heads', 'kv'),
                         param_dtype)
    self.out = Dense(hd, (dim,), ('heads', 'kv', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.ln_k(x)
    bias = self.in_bias[...].astype(x.dtype)
    q = self.q(self.ln_q(self.query[...])) + bias[0]
    q = jnp.broadcast_to(q, (x.shape[0],) + q.shape)
    return self.out(dot_product_attention(q, self.k(x) + bias[1], self.v(x) + bias[2]))


class VisionTransformer(nnx.Module):
  """The ViT image tower. A subclass for timm's Eva trunks (`models/eva.py`) passes its block
  `variant`, the MAP head's size (`map_shape`: heads, MLP width; default the trunk's), a
  projection bias, and its rotary table (`rope`)."""

  def __init__(self, cfg: VisionConfig, embed_dim: int, *, scan: bool, remat: str,
               attention: str = 'xla', variant: BlockVariant | None = None,
               map_shape: tuple[int, int] | None = None, proj_bias: bool = False, dtype,
               param_dtype, rngs: nnx.Rngs):
    d, p = cfg.width, cfg.patch_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.patch_embed = Dense((p, p, 3), (d,), (None, None, None, 'embed'),
                             use_bias=cfg.patch_bias, **kw)
    scale = d ** -0.5
    self.cls_token = (param(rngs, jax.nn.initializers.normal(scale), (d,), ('embed',), param_dtype)
                      if cfg.class_token else None)
    n_tokens = cfg.grid ** 2 + int(cfg.class_token)
    self.pos_embed = param(rngs, jax.nn.initializers.normal(scale), (n_tokens, d),
                           (None, 'embed'), param_dtype)
    self.ln_pre = LayerNorm(d, eps=cfg.norm_eps, **kw) if cfg.ln_pre else None
    self.transformer = Transformer(cfg.layers, d, cfg.heads, cfg.mlp_dim, act=cfg.act,
                                   eps=cfg.norm_eps, ls_init=cfg.ls_init, scan=scan, remat=remat,
                                   attention=attention, unroll=cfg.scan_unroll,
                                   variant=variant or BlockVariant(), **kw)
    self.attn_pool = (AttentionalPooler(embed_dim, d, cfg.attn_pool_heads, cfg.attn_pool_queries,
                                        cfg.norm_eps, **kw) if cfg.attn_pool_queries else None)
    pool_dim = embed_dim if cfg.attn_pool_queries else d
    self.ln_post = LayerNorm(pool_dim, eps=cfg.norm_eps, **kw)
    self.map_head = (MAPHead(d, *(map_shape or (cfg.heads, cfg.mlp_dim)), cfg.act, cfg.norm_eps,
                             **kw) if cfg.pool == 'map' else None)
    self.proj = (param(rngs, jax.nn.initializers.normal(scale), (pool_dim, embed_dim),
                       ('embed', 'proj'), param_dtype) if cfg.proj else None)
    self.proj_bias = (param(rngs, jax.nn.initializers.zeros, (embed_dim,), ('proj',), param_dtype)
                      if proj_bias else None)

  def rope(self) -> np.ndarray | None:
    """The rotary sin/cos table of the patch tokens ([N, 2 * head_dim]); None: no rotary
    position embedding (OpenCLIP's and SigLIP's ViTs)."""
    return None

  def embed(self, images: Images) -> jax.Array:
    """[B, H, W, 3] -> [B, N(+1), width] tokens with position embedding."""
    if isinstance(images, NaFlexPatches):
      return self.embed_naflex(images)
    p, n = self.cfg.patch_size, self.cfg.grid * self.cfg.patch_size
    # Like a strided conv, pixels past the last whole patch are ignored (e.g. 384px at /14).
    patches = einops.rearrange(images[:, :n, :n], 'b (h p1) (w p2) c -> b (h w) p1 p2 c',
                               p1=p, p2=p)
    x = self.patch_embed(patches)
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    return x + self.pos_embed[...].astype(x.dtype)

  def embed_naflex(self, images: NaFlexPatches) -> jax.Array:
    """[B, N, P*P*3] patches -> [B, N, width] tokens, each with the position grid resized to
    its image's grid (no class token: `CLIPConfig.validate`). Padding tokens are zeros,
    whatever the padding held: attention masks them, and a non-finite value there would
    still reach real tokens through 0 x inf in the attention's weights-values product."""
    p = self.cfg.patch_size
    patches = images.patches.reshape(*images.patches.shape[:2], p, p, 3)
    x = self.patch_embed(patches)
    pos = resized_position_embedding(self.pos_embed[...], images.coords, images.valid)
    return jnp.where(images.valid[..., None], x + pos.astype(x.dtype), 0)

  def pool(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """The pooled token; `valid` ([B, T] bool, NaFlex): the tokens that are not padding."""
    if self.map_head is not None:  # cfg.pool == 'map'
      return self.map_head(x, key_mask=valid)
    if self.cfg.pool == 'tok':
      return x[:, 0]
    x = x[:, int(self.cfg.class_token):]
    if valid is None:
      return x.mean(axis=1)
    weights = valid.astype(x.dtype)[..., None]
    return (x * weights).sum(axis=1) / weights.sum(axis=1)

  def encode(self, images: Images, dropout_keys: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Projected pooled features and the image tokens a decoder reads: the attentional
    pooler's queries after the first, else the normalised tokens after the class token.

    `dropout_keys` (one key per image, training only) turns on `cfg.patch_dropout`; NaFlex
    sequences drop real patches only (`naflex.kept_valid_patches`).
    """
    if self.cfg.naflex and not isinstance(images, NaFlexPatches):
      # Whole images (evaluation, `clip_jax.load`): every patch of their own grid is real.
      images = square_patches(images, self.cfg.patch_size)
    x = self.embed(images)
    valid = images.valid if isinstance(images, NaFlexPatches) else None
    rope: jax.Array | np.ndarray | None = self.rope()
    if dropout_keys is not None and self.cfg.patch_dropout > 0:  # after the position embedding
      if valid is None:
        kept = kept_patch_indices(dropout_keys, self.cfg.grid ** 2, self.cfg.kept_patches)
      else:
        kept, valid = kept_valid_patches(dropout_keys, valid, self.cfg.patch_dropout)
      x = take_patches(x, kept, int(self.cfg.class_token))
      if rope is not None:  # each kept patch keeps its rotation: [B, keep, 2 * head_dim]
        rope = jnp.take(jnp.asarray(rope), kept, axis=0)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    x = self.transformer(x, causal=False, key_mask=valid,
                         rope=None if rope is None else jnp.asarray(rope))
    if self.attn_pool is not None:  # OpenCLIP's CoCa: pool, then normalise
      x = self.attn_pool(x)
    x = self.ln_post(x)
    pooled = self.pool(x, valid)
    if self.proj is not None:
      pooled = pooled @ self.proj[...].astype(x.dtype)
    if self.proj_bias is not None:
      pooled = pooled + self.proj_bias[...].astype(x.dtype)
    return pooled, x[:, int(self.cfg.class_token or self.attn_pool is not None):]

  def __call__(self, images: Images, dropout_keys: jax.Array | None = None) -> jax.Array:
    return self.encode(images, dropout_keys)[0]
