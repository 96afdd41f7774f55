"""Text tower: token + position embedding -> blocks -> ln_final -> pool -> projection.

CLIP: causal mask, pooled at the EOT token (the highest id, `argmax`). SigLIP:
bidirectional, pooled at the last position, projection with bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models.config import TextConfig
from clip_jax.models.layers import Dense, LayerNorm, Transformer, param


class TextTransformer(nnx.Module):

  def __init__(self, cfg: TextConfig, embed_dim: int, *, scan: bool, remat: str,
               attention: str = 'xla', dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.token_embed = param(rngs, jax.nn.initializers.normal(0.02), (cfg.vocab_size, d),
                             ('vocab', 'embed'), param_dtype)
    self.pos_embed = param(rngs, jax.nn.initializers.normal(0.01), (cfg.context_length, d),
                           (None, 'embed'), param_dtype)
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

  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.cfg.context_length:
      raise ValueError(f'Got {t} tokens, more than text.context_length={self.cfg.context_length}.')
    x = jnp.take(self.token_embed[...], tokens, axis=0).astype(self.dtype)
    x = x + self.pos_embed[:t].astype(self.dtype)
    x = self.transformer(x, causal=self.cfg.causal)
    x = self.pool(self.ln_final(x), tokens)
    return self.proj(x) if self.proj is not None else x
