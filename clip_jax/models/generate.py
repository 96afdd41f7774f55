"""Caption generation for CoCa and LocCa decoders, jitted, with a key-value cache.

OpenCLIP's `CoCa.generate` re-encodes the whole prefix through the text tower and the
decoder at every step (quadratic in the length). Here each step runs only the new token:
its keys and values are written into per-layer caches of a fixed maximum length
(`seq_len`), and the image's cross-attention keys and values are computed once per image
(`TextDecoder.image_context`). The loop is a `lax.while_loop` over positions that stops
when every sequence has ended, so one compiled program serves every batch of a shape, on
one device or with the batch sharded over many.

The semantics are OpenCLIP's (`generate` and `_generate_beamsearch`, with its defaults):
sequences start with `<start_of_text>` (or a given prefix), `<end_of_text>` is forbidden
before `min_seq_len` tokens and forced as the last token of sampled sequences, a
sequence ends at `<end_of_text>` or at the pad id and is padded after. The output is
always [B, seq_len] (OpenCLIP cuts it after the longest sequence's end).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

SOT_ID, EOS_ID, PAD_ID = 49406, 49407, 0  # OpenCLIP's CLIP tokenizer ids
GENERATION_TYPES = ('greedy', 'top_k', 'top_p', 'beam_search')
_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a compiled generation program depends on besides shapes (OpenCLIP's defaults)."""
  generation_type: str = 'beam_search'
  seq_len: int = 30
  min_seq_len: int = 5
  temperature: float = 1.0
  top_k: int = 1
  top_p: float = 0.1
  num_beams: int = 6
  num_beam_groups: int = 3
  repetition_penalty: float = 1.0
  sot_id: int = SOT_ID
  eos_id: int = EOS_ID
  pad_id: int = PAD_ID


class Cache(NamedTuple):
  """Keys and values of the positions generated so far, [layers, B, seq_len, 2, H, D] per
  tower (`text` is None for LocCa, whose decoder embeds its own tokens), and the image's
  cross-attention keys and values, [layers, B, S, 2, H, D]."""
  text: jax.Array | None
  decoder: jax.Array
  image: jax.Array


def generate(model, images: jax.Array, text: jax.Array | None = None, *,
             key: jax.Array | None = None, **settings) -> jax.Array:
  """Token ids [B, seq_len] of captions for NHWC `images`, as OpenCLIP's `generate`.

  `text`: a prefix every sequence starts with ([P] or [B, P] ids, `<start_of_text>` first;
  default `<start_of_text>` alone), e.g. a LocCa task token and a phrase. `key`: the random
  key of `top_k` / `top_p` sampling (default `jax.random.key(0)`). `settings`: the fields of
  `Settings`, OpenCLIP's keyword arguments of the same names (its `*_token_id` are
  `sot_id`, `eos_id`, `pad_id` here).
  """
  s = Settings(**settings)
  b = images.shape[0]
  prefix = jnp.asarray([[s.sot_id]] if text is None else text, jnp.int32)
  prefix = jnp.broadcast_to(prefix if prefix.ndim == 2 else prefix[None], (b, prefix.shape[-1]))
  _check(model, s, prefix.shape[1])
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _generate(graphdef, s, state, images, prefix, key)


def _check(model, s: Settings, prefix_len: int) -> None:
  """One-line errors for settings OpenCLIP or this model cannot run, before compiling."""
  if model.decoder is None:
    raise ValueError('This model has no caption decoder (config.model.decoder is None): '
                     'train a CoCa preset such as model=coca_ViT-B-32.')
  if s.generation_type not in GENERATION_TYPES:
    raise ValueError(f'generation_type {s.generation_type!r}: expected one of '
                     f'{", ".join(GENERATION_TYPES)}.')
  limit = min(model.decoder.cfg.context_length, model.text.cfg.context_length)
  if not s.min_seq_len < s.seq_len <= limit:
    raise ValueError(f'seq_len {s.seq_len} must exceed min_seq_len {s.min_seq_len} and be at '
                     f'most the context length {limit}.')
  if not 1 <= prefix_len < s.seq_len:
    raise ValueError(f'The prefix has {prefix_len} tokens: give 1 to seq_len - 1 '
                     f'({s.seq_len - 1}).')
  vocab = model.decoder.cfg.vocab_size
  for name in ('sot_id', 'eos_id', 'pad_id'):
    if not 0 <= getattr(s, name) < vocab:
      raise ValueError(f'{name} {getattr(s, name)} is outside the vocabulary (size {vocab}).')
  if s.temperature <= 0 or s.top_k < 1 or not 0 < s.top_p <= 1 or s.repetition_penalty <= 0:
    raise ValueError(f'Need temperature > 0, top_k >= 1, 0 < top_p <= 1 and '
                     f'repetition_penalty > 0; got {s.temperature}, {s.top_k}, {s.top_p}, '
                     f'{s.repetition_penalty}.')
  if s.generation_type == 'beam_search' and (
      s.num_beams < 1 or s.num_beam_groups < 1 or s.num_beams % s.num_beam_groups):
    raise ValueError(f'num_beams {s.num_beams} must be a positive multiple of '
                     f'num_beam_groups {s.num_beam_groups}.')


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(graphdef, s: Settings, state, images, prefix, key):
  model = nnx.merge(graphdef, state)
  if s.generation_type == 'beam_search':
    return _beam_search(model, s, images, prefix)
  return _sample(model, s, images, prefix, key)


def init_cache(model, images: jax.Array, seq_len: int, beams: int = 1) -> Cache:
  """Empty caches for `beams` sequences per image and the image's cross-attention keys and
  values (each image encoded once, then repeated per beam)."""
  _, image_tokens = model.visual.encode(images)
  image = model.decoder.image_context(jnp.repeat(image_tokens, beams, axis=0))
  rows = image.shape[1]

  def empty(tower):  # [layers, rows, seq_len, 2, heads, head_dim]
    kernel = tower.attn.qkv.kernel  # stacked: [layers, dim, 3, heads, head_dim]
    layers, _, _, heads, head_dim = kernel[...].shape
    return jnp.zeros((layers, rows, seq_len, 2, heads, head_dim), image.dtype)

  text = None if model.decoder.cfg.embed_tokens else empty(model.text.transformer.blocks)
  return Cache(text, empty(model.decoder.layers.self_block), image)


def decode_step(model, cache: Cache, tokens: jax.Array, index: jax.Array
                ) -> tuple[jax.Array, Cache]:
  """The logits [B, vocab] of the token after position `index` of `tokens` ([B, seq_len],
  filled up to `index`), and the caches with position `index` written in."""
  ids = jax.lax.dynamic_slice_in_dim(tokens, index, 1, axis=1)
  write = lambda cache, kv: jax.lax.dynamic_update_slice_in_dim(cache, kv, index, axis=2)
  text_cache = cache.text
  if text_cache is None:
    x = ids
  else:  # `TextTransformer.encode`'s key mask: key j > 0 where token j - 1 is not padding
    pad = model.text.cfg.pad_id
    keys = jnp.concatenate([jnp.ones_like(tokens[:, :1], bool), tokens[:, :-1] != pad], axis=1)
    x, kv = model.text.step(ids, index, text_cache, keys)
    text_cache = write(text_cache, kv)
  logits, kv = model.decoder.step(x, index, cache.decoder, cache.image)
  return logits, Cache(text_cache, write(cache.decoder, kv), cache.image)


def process_logits(logits: jax.Array, tokens: jax.Array, index: jax.Array, s: Settings
                   ) -> jax.Array:
  """OpenCLIP's logits processors: no `<end_of_text>` while the sequence (positions up to
  `index`) is shorter than `min_seq_len`; the repetition penalty on tokens already in it."""
  vocab = jnp.arange(logits.shape[-1])
  logits = jnp.where((index + 1 < s.min_seq_len) & (vocab == s.eos_id), _NEG_INF, logits)
  if s.repetition_penalty != 1.0:
    present = jnp.arange(tokens.shape[1]) <= index
    seen = jnp.zeros(logits.shape, bool).at[jnp.arange(tokens.shape[0])[:, None], tokens].max(
        jnp.broadcast_to(present, tokens.shape))
    penalised = jnp.where(logits < 0, logits * s.repetition_penalty,
                          logits / s.repetition_penalty)
    logits = jnp.where(seen, penalised, logits)
  return logits


def warp(logits: jax.Array, s: Settings) -> jax.Array:
  """transformers' top-k / top-p warpers as OpenCLIP applies them (before the temperature):
  logits outside the top `top_k`, or outside the smallest top set holding `top_p` of the
  probability, become -inf."""
  if s.generation_type == 'top_k':
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    return jnp.where(logits < kth, _NEG_INF, logits)
  ascending = jnp.sort(logits, axis=-1)
  removed = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1 - s.top_p
  removed = removed.at[:, -1].set(False)  # the most likely token always stays
  threshold = jnp.take_along_axis(ascending, removed.sum(-1, keepdims=True), axis=-1)
  return jnp.where(logits < threshold, _NEG_INF, logits)


def _ended(tokens: jax.Array, index: jax.Array, s: Settings) -> jax.Array:
  """Rows whose token at `index` ends the sequence: OpenCLIP stops at `<end_of_text>` and at
  the pad id (a generated pad id ends it too)."""
  last = jax.lax.dynamic_index_in_dim(tokens, index, axis=1, keepdims=False)
  return (last == s.eos_id) | (last == s.pad_id)


def _sample(model, s: Settings, images, prefix, key) -> jax.Array:
  """Greedy decoding or top-k / top-p sampling (OpenCLIP's `generate` loop)."""
  b, p = prefix.shape
  tokens = jnp.full((b, s.seq_len), s.pad_id, jnp.int32).at[:, :p].set(prefix)

  def choose(logits, tokens, t):
    logits = process_logits(logits, tokens, t, s)
    if s.generation_type == 'greedy':
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(jax.random.fold_in(key, t), warp(logits, s) / s.temperature,
                                  axis=-1).astype(jnp.int32)

  def step(carry):
    t, tokens, cache = carry
    logits, cache = decode_step(model, cache, tokens, t)
    token = jnp.where(t + 2 == s.seq_len, s.eos_id, choose(logits, tokens, t))
    token = jnp.where(_ended(tokens, t, s), s.pad_id, token)
    token = jnp.where(t + 1 < p, tokens[:, t + 1], token)  # inside the prefix: its token
    return t + 1, tokens.at[:, t + 1].set(token), cache

  def going(carry):
    t, tokens, _ = carry
    return (t + 1 < s.seq_len) & ((t + 1 < p) | ~_ended(tokens, t, s).all())

  cache = init_cache(model, images, s.seq_len)
  return jax.lax.while_loop(going, step, (jnp.int32(0), tokens, cache))[1]


class _Beams(NamedTuple):
  """Beam search state per image: `k` alive beams and the `k` best ended hypotheses."""
  tokens: jax.Array        # [B, k, seq_len] alive beams
  scores: jax.Array        # [B, k] their summed logits
  hyp_tokens: jax.Array    # [B, k, seq_len] ended hypotheses, `<end_of_text>` then pads
  hyp_scores: jax.Array    # [B, k] their length-normalised scores (-inf: empty)
  hyp_count: jax.Array     # [B] hypotheses held (at most k)
  done: jax.Array          # [B] no alive beam can beat the hypotheses any more


def _beam_search(model, s: Settings, images, prefix) -> jax.Array:
  """OpenCLIP's `_generate_beamsearch` (transformers' `BeamSearchScorer`, length penalty 1,
  no early stopping) with its quirks: a beam's score sums the decoder's raw logits (no
  log-softmax), and an ended hypothesis scores its sum over its length with the
  `<end_of_text>`. OpenCLIP's beam groups get no diversity penalty (its processors have
  none), so every group searches alike: one group of `num_beams // num_beam_groups` beams
  gives its result, computed once.
  """
  b, p = prefix.shape
  k = s.num_beams // s.num_beam_groups
  tokens = jnp.full((b, k, s.seq_len), s.pad_id, jnp.int32).at[:, :, :p].set(prefix[:, None])
  beams = _Beams(tokens, jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -1e9), (b, 1)),
                 jnp.full((b, k, s.seq_len), s.pad_id, jnp.int32), jnp.full((b, k), _NEG_INF),
                 jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
  flat = lambda x: x.reshape(b * k, *x.shape[2:])

  def step(carry):
    t, beams, cache = carry
    logits, cache = decode_step(model, cache, flat(beams.tokens), t)
    logits = process_logits(logits, flat(beams.tokens), t, s).reshape(b, k, -1)
    beams, origin = jax.lax.cond(t + 1 < p, _follow_prefix, functools.partial(_advance, s=s),
                                 beams, logits, t)
    reorder = lambda c: jnp.take_along_axis(
        c.reshape(c.shape[0], b, k, *c.shape[2:]),
        origin.reshape(1, b, k, *([1] * (c.ndim - 2))), axis=2).reshape(c.shape)
    cache = cache._replace(decoder=reorder(cache.decoder),
                           text=None if cache.text is None else reorder(cache.text))
    return t + 1, beams, cache

  def going(carry):
    t, beams, _ = carry
    return (t + 1 < s.seq_len) & ~beams.done.all()

  cache = init_cache(model, images, s.seq_len, k)
  _, beams, _ = jax.lax.while_loop(going, step, (jnp.int32(0), beams, cache))
  # Rows still searching at the maximum length add their alive beams, unended.
  open_scores = jnp.where(beams.done[:, None], _NEG_INF, beams.scores / s.seq_len)
  scores = jnp.concatenate([beams.hyp_scores, open_scores], axis=1)
  candidates = jnp.concatenate([beams.hyp_tokens, beams.tokens], axis=1)
  best = jnp.argmax(scores, axis=1)
  return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]


def _follow_prefix(beams: _Beams, logits, t) -> tuple[_Beams, jax.Array]:
  """Inside the prefix every beam takes its next token; none moves."""
  del logits
  return beams, jnp.broadcast_to(jnp.arange(beams.scores.shape[1]), beams.scores.shape)


def _advance(beams: _Beams, logits, t, *, s: Settings) -> tuple[_Beams, jax.Array]:
  """One `BeamSearchScorer.process` step: of the 2k best (beam, token) continuations, those
  ending among the first k become hypotheses, the k best others the next beams. Returns the
  new state and each new beam's origin among the old ones."""
  b, k, vocab = logits.shape
  totals = (logits + beams.scores[:, :, None]).reshape(b, k * vocab)
  top, index = jax.lax.top_k(totals, 2 * k)
  origin, token = index // vocab, (index % vocab).astype(jnp.int32)
  ends = token == s.eos_id
  rank = jnp.arange(2 * k)
  # Hypotheses: the ended continuations ranked within the first k, length with the end.
  new_scores = jnp.where(ends & (rank < k) & ~beams.done[:, None], top / (t + 2), _NEG_INF)
  ended = jnp.take_along_axis(beams.tokens, origin[:, :, None], axis=1)
  ended = jnp.where(jnp.arange(s.seq_len) == t + 1, s.eos_id, ended)
  pool_scores = jnp.concatenate([beams.hyp_scores, new_scores], axis=1)
  pool_tokens = jnp.concatenate([beams.hyp_tokens, ended], axis=1)
  hyp_scores, keep = jax.lax.top_k(pool_scores, k)
  hyp_tokens = jnp.take_along_axis(pool_tokens, keep[:, :, None], axis=1)
  added = (new_scores > _NEG_INF).sum(-1)
  count = jnp.minimum(beams.hyp_count + added, k)
  # Next beams: the k best continuations that do not end, in rank order.
  going = jnp.argsort(jnp.where(ends, 2 * k + rank, rank), axis=1, stable=True)[:, :k]
  origin = jnp.take_along_axis(origin, going, axis=1)
  tokens = jnp.take_along_axis(beams.tokens, origin[:, :, None], axis=1)
  tokens = tokens.at[:, :, t + 1].set(jnp.take_along_axis(token, going, axis=1))
  # transformers' early-stopping test: k hypotheses, none below the best continuation's score
  # over the current length (with the token it adds).
  worst = jnp.where(jnp.arange(k) < count[:, None], hyp_scores, jnp.inf).min(-1)
  done = beams.done | ((count >= k) & (worst >= top[:, 0] / (t + 2)))
  return _Beams(tokens, jnp.take_along_axis(top, going, axis=1), hyp_tokens, hyp_scores,
                count, done), origin
