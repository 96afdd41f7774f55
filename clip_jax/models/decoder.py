"""CoCa's caption decoder: text token outputs cross-attend to image tokens -> vocab logits.

OpenCLIP's `MultimodalTransformer`: per layer a causal self-attention block (as the towers'
`Block`) and a cross-attention block (`CrossBlock`: queries from the text, keys and values
from the image tokens, each normalised by its own LayerNorm), then `ln_final` and a
projection to the vocabulary. Layers are stacked on a leading axis and run by `run_layers`
(scan, unroll, remat) like the towers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models.config import DecoderConfig
from clip_jax.models.layers import (
  MLP,
  Block,
  CrossAttention,
  LayerNorm,
  param,
  run_layers,
  step_layers,
)


class CrossBlock(nnx.Module):
  """x + attn(ln_1(x), ln_1_kv(context)); x + mlp(ln_2(x)) (OpenCLIP `is_cross_attention`)."""

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.width
    self.ln_1 = LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.ln_1_kv = LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.attn = CrossAttention(d, cfg.heads, **kw)
    self.ln_2 = LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.mlp = MLP(d, cfg.mlp_dim, cfg.act, **kw)

  def context(self, image_tokens: jax.Array) -> jax.Array:
    """The image tokens' keys and values for this layer, [B, S, 2, H, D]."""
    return self.attn.project_context(self.ln_1_kv(image_tokens))

  def __call__(self, x: jax.Array, kv: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x), kv)
    return x + self.mlp(x, norm=self.ln_2)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_block = Block(cfg.width, cfg.heads, cfg.mlp_dim, act=cfg.act, eps=cfg.norm_eps,
                            ls_init=None, attention=attention, **kw)
    self.cross_block = CrossBlock(cfg, **kw)

  def __call__(self, x: jax.Array, image_tokens: jax.Array) -> jax.Array:
    x = self.self_block(x, causal=True)
    return self.cross_block(x, self.cross_block.context(image_tokens))

  def step(self, x: jax.Array, index: jax.Array, cache: jax.Array, image_kv: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    """`__call__` for one new position: self-attention over the cached keys and values,
    cross-attention over the image's (`CrossBlock.context`, computed once per image)."""
    x, kv = self.self_block.step(x, cache, index)
    return self.cross_block(x, image_kv), kv


class TextDecoder(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, scan: bool, remat: str, attention: str = 'xla',
               dtype, param_dtype, rngs: nnx.Rngs):

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(cfg, attention=attention, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    self.cfg = cfg
    if cfg.embed_tokens:  # LocCa: its own token and position embeddings
      self.token_embed = param(rngs, jax.nn.initializers.normal(0.02),
                               (cfg.vocab_size, cfg.width), ('vocab', 'embed'), param_dtype)
      self.pos_embed = param(rngs, jax.nn.initializers.normal(0.01),
                             (cfg.context_length, cfg.width), (None, 'embed'), param_dtype)
    # LocCa: where each image token sits (DecoderConfig). Std 0.3, measured on the demo: 1.0
    # cost zero-shot and captions, 0.1 learned places late (docs/captioning.md).
    if cfg.image_positions:
      self.image_pos = param(rngs, jax.nn.initializers.normal(0.3),
                             (cfg.image_positions, cfg.width), (None, 'embed'), param_dtype)
    self.layers = make_layers(rngs)
    self.ln_final = LayerNorm(cfg.width, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    self.proj = param(rngs, jax.nn.initializers.normal(cfg.width ** -0.5),
                      (cfg.width, cfg.vocab_size), ('embed', 'vocab'), param_dtype)
    self.scan, self.remat = scan, remat
    self.dtype = dtype

  def logits(self, x: jax.Array) -> jax.Array:
    """Decoder outputs [B, T, width] -> float32 vocabulary logits [B, T, vocab]."""
    y = self.ln_final(x)
    return jnp.einsum('btd,dv->btv', y, self.proj[...].astype(y.dtype),
                      preferred_element_type=jnp.float32)

  def embed(self, ids: jax.Array, start: int | jax.Array = 0) -> jax.Array:
    """LocCa: token ids [B, T] at positions `start`, ... -> the decoder's input."""
    x = jnp.take(self.token_embed[...], ids, axis=0).astype(self.dtype)
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, ids.shape[1])
    return x + pos.astype(self.dtype)

  def place(self, image_tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """The image tokens [B, S, width] the layers read: with `cfg.image_positions`, plus the
    embedding of each token's grid position (`positions` [B, S]: the patches patch dropout
    kept; None: all of them, in grid order)."""
    image_tokens = image_tokens.astype(self.dtype)
    if not self.cfg.image_positions:
      return image_tokens
    table = self.image_pos[...].astype(self.dtype)
    if positions is not None:
      return image_tokens + jnp.take(table, positions, axis=0)
    if image_tokens.shape[1] != self.cfg.image_positions:
      raise ValueError(f'Got {image_tokens.shape[1]} image tokens, the decoder places '
                       f'decoder.image_positions={self.cfg.image_positions}.')
    return image_tokens + table

  def image_context(self, image_tokens: jax.Array) -> jax.Array:
    """Every layer's keys and values of the image tokens, [layers, B, S, 2, H, D]: what
    generation computes once per image instead of at every step."""
    graphdef, state = nnx.split(self.layers)
    image_tokens = self.place(image_tokens)
    return jax.lax.map(lambda s: nnx.merge(graphdef, s).cross_block.context(image_tokens), state)

  def step(self, text_tokens: jax.Array, index: jax.Array, cache: jax.Array,
           image_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`__call__` for one new position `index` in generation: the text tower's output there
    [B, 1, width] (LocCa: the token ids [B, 1]), the earlier positions' self-attention keys
    and values (`cache`, [layers, B, T, 2, H, D]) and `image_context` -> the next token's
    logits [B, vocab] and this position's keys and values [layers, B, 1, 2, H, D]."""
    if self.cfg.embed_tokens:
      text_tokens = self.embed(text_tokens, index)
    x, kv = step_layers(self.layers, text_tokens.astype(self.dtype), (cache, image_kv),
                        lambda layer, x, c: layer.step(x, index, *c))
    return self.logits(x)[:, 0], kv

  def __call__(self, image_tokens: jax.Array, text_tokens: jax.Array,
               image_positions: jax.Array | None = None) -> jax.Array:
    """Image tokens [B, S, width] and the text tower's token outputs [B, T, width] (LocCa:
    token ids [B, T]) -> logits [B, T, vocab]: position t predicts the token after t
    (teacher forcing). `image_positions`: `place`."""
    if self.cfg.embed_tokens:
      text_tokens = self.embed(text_tokens)
    t = text_tokens.shape[1]
    if t > self.cfg.context_length:
      raise ValueError(f'Got {t} text tokens, more than decoder.context_length='
                       f'{self.cfg.context_length}.')
    image_tokens = self.place(image_tokens, image_positions)
    x = run_layers(self.layers, text_tokens.astype(self.dtype),
                   lambda layer, x: layer(x, image_tokens), layers=self.cfg.layers,
                   scan=self.scan, unroll=self.cfg.scan_unroll, remat=self.remat)
    return self.logits(x)
