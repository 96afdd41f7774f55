"""Gradient accumulation over K micro-batches of one global contrastive batch.

A contrastive loss is not a sum over examples: every pair is scored against the whole
batch. Accumulating per-micro-batch gradients therefore changes the loss; two modes:

- `cache` (feature cache, GradCache / OpenCLIP `--accum-freq`): pass 1 encodes the K
  micro-batches without gradients and keeps only their embeddings (B x D per tower); the
  loss and its gradient w.r.t. every embedding, the logit scale and bias are computed over
  the whole global batch, by the same `contrastive_loss` call as a one-shot step; pass 2
  re-encodes each micro-batch and pulls its slice of that gradient back through the
  towers (`jax.vjp`), summing parameter gradients. Loss and gradients are the one-shot
  step's (up to float rounding); activation memory is one micro-batch's; cost: one more
  forward pass of both towers (~4/3 of the one-shot compute).
- `micro`: each micro-batch is a small contrastive batch of its own (its negatives are its
  own B/K rows); the step applies the mean of their losses and gradients. Same memory, no
  extra compute, but the loss of a B/K batch: fewer negatives, a different optimum.

Besides the embeddings, `embed` returns per-row values (`rows`: a tree of [B] arrays, e.g.
CoCa's caption loss sums and token counts); a loss of them that is a sum over rows needs no
cross-batch term, and the feature cache keeps and pulls them back like the embeddings.

Micro-batch i holds rows j*K + i of the global batch, so every device keeps its own rows
(`split`); with K = 1 both modes are the plain one-shot `value_and_grad`.

`embed` also takes and returns the state its forward pass updates: BatchNorm's running
statistics (`clip_jax/models/batch_norm.py`; {} for models without BatchNorm), never
differentiated. Each micro-batch updates them once, in order, as K forward passes of a
torch model in training mode would (each normalised by its own micro-batch's statistics:
that is also what OpenCLIP's `--accum-freq` computes). The feature cache's second pass
recomputes the same normalisation and drops its updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MODES = ('cache', 'micro')
Params = Any
Stats = Any  # what the forward pass updates (BatchNorm's running statistics), or {}
Batch = dict[str, jax.Array]
# (image features, text features, log logit scale, logit bias or None, per-row values)
Embeddings = tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, Any]
Embed = Callable[[Params, Stats, Batch], tuple[Embeddings, Stats]]
Loss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
GradFn = Callable[[Params, Stats, Batch], tuple[tuple[jax.Array, dict], Params, Stats]]


def value_and_grad(embed: Embed, loss: Loss, *, accum: int, mode: str,
                   batch_sharding: NamedSharding) -> GradFn:
  """`(params, stats, batch) -> ((loss, metrics), grads, stats)` of
  `loss(*embed(params, stats, batch)[0])`, with the `stats` the forward passes left.

  `batch_sharding` is how the batch (rows on the mesh's batch axes) is laid out; the
  micro-batches and cached embeddings keep that layout.
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')

  def one_shot(params, stats, batch):
    def value(p):
      embeddings, new_stats = embed(p, stats, batch)
      loss_value, metrics = loss(*embeddings)
      return loss_value, (metrics, new_stats)

    (loss_value, (metrics, new_stats)), grads = jax.value_and_grad(value, has_aux=True)(params)
    return (loss_value, metrics), grads, new_stats

  if accum == 1:
    return one_shot
  if mode == 'micro':
    return _micro_batches(one_shot, accum, batch_sharding)
  return _feature_cache(embed, loss, accum, batch_sharding)


def split(x: jax.Array, accum: int, batch_sharding: NamedSharding) -> jax.Array:
  """[B, ...] -> [K, B/K, ...]; rows j*K + i form micro-batch i, so no row changes device."""
  x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
  return _constrain(x, batch_sharding, leading=1)


def merge(x: jax.Array, batch_sharding: NamedSharding) -> jax.Array:
  """The inverse of `split`: [K, B/K, ...] -> [B, ...] in the original row order."""
  x = x.swapaxes(0, 1).reshape(-1, *x.shape[2:])
  return _constrain(x, batch_sharding, leading=0)


def _constrain(x: jax.Array, batch_sharding: NamedSharding, leading: int) -> jax.Array:
  spec = P(*(None,) * leading, *batch_sharding.spec)
  return jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, spec))


def _micro_batches(grad_fn: GradFn, accum: int, batch_sharding: NamedSharding) -> GradFn:
  """Mean of the micro-batches' losses and gradients, each with its own negatives only."""

  def grads(params, stats, batch):
    micro = jax.tree.map(lambda x: split(x, accum, batch_sharding), batch)

    def body(carry, one):
      total, stats = carry
      value, g, stats = grad_fn(params, stats, one)
      return (jax.tree.map(jnp.add, total, (value, g)), stats), None

    first = jax.tree.map(lambda x: x[0], micro)
    value, g, _ = jax.eval_shape(grad_fn, params, stats, first)
    zeros = jax.tree.map(jnp.zeros_like, (value, g))
    (total, stats), _ = jax.lax.scan(body, (zeros, stats), micro)
    value, g = jax.tree.map(lambda x: x / accum, total)
    return value, g, stats

  return grads


def _feature_cache(embed: Embed, loss: Loss, accum: int, batch_sharding: NamedSharding
                   ) -> GradFn:
  """The global batch's loss and gradients, with one micro-batch's activations at a time."""

  def grads(params, stats, batch):
    micro = jax.tree.map(lambda x: split(x, accum, batch_sharding), batch)

    # Pass 1: embeddings only; no activation outlives its micro-batch. The forward state
    # (BatchNorm's statistics) is updated by each micro-batch in turn.
    def first_pass(stats, one):
      embeddings, stats = embed(params, stats, one)
      return stats, embeddings

    new_stats, (img, txt, scale, bias, rows) = jax.lax.scan(first_pass, stats, micro)
    scale, bias = jax.tree.map(lambda x: x[0], (scale, bias))  # the same in every micro-batch
    merged = jax.tree.map(lambda x: merge(x, batch_sharding), (img, txt, rows))
    (value, metrics), (d_img, d_txt, d_scale, d_bias, d_rows) = jax.value_and_grad(
        loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
            merged[0], merged[1], scale, bias, merged[2])

    # Pass 2: each micro-batch pulls its rows of the embedding gradient back through the
    # towers; the scale and bias gradient enters once, with micro-batch 0.
    def body(total, xs):
      index, one, d_rows_one = xs
      _, pullback = jax.vjp(lambda p: embed(p, stats, one)[0], params)
      d_scalars = jax.tree.map(lambda d: jnp.where(index == 0, d, jnp.zeros_like(d)),
                               (d_scale, d_bias))
      (g,) = pullback((d_rows_one[0], d_rows_one[1], *d_scalars, d_rows_one[2]))
      return jax.tree.map(jnp.add, total, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    d_per_row = jax.tree.map(lambda x: split(x, accum, batch_sharding), (d_img, d_txt, d_rows))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro, d_per_row))
    return (value, metrics), total, new_stats

  return grads
