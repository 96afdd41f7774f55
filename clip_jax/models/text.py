"""Text tower: token + position embedding -> blocks -> ln_final -> pool -> projection.

CLIP: causal mask, pooled at the EOT token (the highest id, `argmax`). SigLIP:
bidirectional, pooled at the last position, projection with bias. CoCa (`embed_cls`): a
class token appended after the text is pooled, its output normalised alone; the outputs
before it (not normalised) are the caption decoder's input (`encode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models.config import TextConfig
from clip_jax.models.layers import Dense, LayerNorm, Transformer, param, step_layers


class TextTransformer(nnx.Module):

  def __init__(self, cfg: TextConfig, embed_dim: int, *, scan: bool, remat: str,
               attention: str = 'xla', dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.token_embed = param(rngs, jax.nn.initializers.normal(0.02), (cfg.vocab_size, d),
                             ('vocab', 'embed'), param_dtype)
    self.pos_embed = param(rngs, jax.nn.initializers.normal(0.01), (cfg.positions, d),
                           (None, 'embed'), param_dtype)
    self.cls_token = (param(rngs, jax.nn.initializers.normal(0.01), (d,), ('embed',), param_dtype)
                      if cfg.embed_cls else None)
    self.transformer = Transformer(cfg.layers, d, cfg.heads, cfg.mlp_dim, act=cfg.act,
                                   eps=cfg.norm_eps, ls_init=cfg.ls_init, scan=scan, remat=remat,
                                   attention=attention, unroll=cfg.scan_unroll, **kw)
    self.ln_final = LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.proj = (Dense((d,), (embed_dim,), ('embed', 'proj'), use_bias=cfg.proj_bias, **kw,
                       kernel_init=jax.nn.initializers.normal(d ** -0.5))
                 if cfg.proj else None)

  def pool(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
    pool = self.cfg.pool
    if pool == 'argmax':
      return jnp.take_along_axis(x, tokens.argmax(-1)[:, None, None], axis=1)[:, 0]
    if pool == 'last':
      return x[:, -1]
    if pool == 'first':
      return x[:, 0]
    valid = (tokens != self.cfg.pad_id)[..., None].astype(x.dtype)
    return (x * valid).sum(1) / jnp.maximum(valid.sum(1), 1)

  def embed(self, tokens: jax.Array, start: int | jax.Array = 0) -> jax.Array:
    """Token ids -> embeddings plus the position embedding of positions `start`, ..."""
    t = tokens.shape[-1]
    if t > self.cfg.context_length:
      raise ValueError(f'Got {t} tokens, more than text.context_length={self.cfg.context_length}.')
    x = jnp.take(self.token_embed[...], tokens, axis=0).astype(self.dtype)
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, t)
    return x + pos.astype(self.dtype)

  def encode(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Projected pooled features and the per-token outputs ([B, T, width]).

    With `embed_cls` the class token is appended and pooled, and keys are masked as
    OpenCLIP's CoCa does (`correct_cls_mask=False`, what its released weights were trained
    with): key 0 always, key j > 0 where token j - 1 is not padding.
    """
    x = self.embed(tokens)
    if self.cls_token is None:
      x = self.ln_final(self.transformer(x, causal=self.cfg.causal))
      pooled, token_out = self.pool(x, tokens), x
    else:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([x, cls + self.pos_embed[tokens.shape[-1]].astype(x.dtype)], axis=1)
      keys = jnp.concatenate([jnp.ones_like(tokens[:, :1], bool), tokens != self.cfg.pad_id], 1)
      x = self.transformer(x, causal=self.cfg.causal, key_mask=keys)
      pooled, token_out = self.ln_final(x[:, -1]), x[:, :-1]
    return (self.proj(pooled) if self.proj is not None else pooled), token_out

  def step(self, tokens: jax.Array, index: jax.Array, cache: jax.Array, key_mask: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    """`encode`'s token outputs for one new position `index` ([B, 1] ids) in generation,
    from the keys and values of the earlier positions (`cache`, [layers, B, T, 2, H, D]).

    Causal only (CoCa's tower): the class token `encode` appends after the text is never
    seen by the positions before it, so it is left out. `key_mask` ([B, T]): `encode`'s
    key mask of the sequence. Returns the outputs [B, 1, width] and the position's keys
    and values per layer [layers, B, 1, 2, H, D].
    """
    if not self.cfg.causal:
      raise ValueError('Cached generation needs a causal text tower (text.causal=True).')
    return step_layers(self.transformer.blocks, self.embed(tokens, index), cache,
                       lambda block, x, cache: block.step(x, cache, index, key_mask))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.encode(tokens)[0]
