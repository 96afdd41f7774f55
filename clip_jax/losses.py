"""Contrastive losses over a device mesh: softmax (CLIP) and sigmoid (SigLIP).

`contrastive_loss` takes global embeddings whose batch dimension is sharded over the
mesh's batch axes and runs the per-device math under `jax.shard_map`:

- `softmax`: each device scores its B_local rows against the all-gathered other tower
  (B_local x B_global logits, OpenCLIP's `--local-loss --gather-with-grad`). `all_gather`
  transposes to a reduce-scatter, so gradients flow back to the owners of the features
  (on CPU to a psum and a slice: gloo's reduce-scatter slows every later collective).
- `sigmoid`: the same gathered layout with SigLIP's pairwise sigmoid loss.
- `sigmoid_chunked`: text features travel around a ring (`ppermute`) one device-chunk at a
  time; each step scores B_local x chunk logits under `jax.checkpoint`, so neither the
  forward nor the backward pass holds more than one chunk's logits (SigLIP section 3.1).

`distillation_loss` (OpenCLIP's `DistillClipLoss` term, a frozen teacher's logit
distributions as soft targets) uses the softmax's gathered layout.

`caption_rows` and `caption_loss`: CoCa's and LocCa's captioning cross-entropy (OpenCLIP's
`CoCaLoss` caption term: the mean over the batch's target tokens, padding ignored), kept as
per-row sums and counts so the mean over the global batch is exact under sharding and the
feature-cache accumulation (`clip_jax.accumulate`).

Logits, log-sum-exp and log-sigmoid are computed in float32 whatever the input dtype.
The mean over the global batch is taken with `psum`, so results equal the single-device
math on the whole batch (tests/test_losses.py compares them with a float64 reference).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

KINDS = ('softmax', 'sigmoid', 'sigmoid_chunked')
Metrics = dict[str, jax.Array]


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                     logit_bias: jax.Array | None = None, *, kind: str, mesh: Mesh,
                     batch_axes: Sequence[str] = ('data', 'fsdp'),
                     chunk_size: int | None = None) -> tuple[jax.Array, Metrics]:
  """Mean contrastive loss over the global batch, and in-batch metrics.

  Args:
    image_emb, text_emb: [B_global, D] L2-normalised features; row i of each is a pair.
    logit_scale: log of the temperature scale (used as exp(logit_scale)).
    logit_bias: SigLIP's bias (sigmoid kinds; required there). Ignored by softmax, where
      a constant shift cancels.
    kind: 'softmax', 'sigmoid' or 'sigmoid_chunked'.
    mesh: the device mesh; `batch_axes` are the axes the batch dimension is sharded over
      (axes missing from the mesh are ignored).
    chunk_size: sigmoid_chunked only: text rows per logits block inside a ring step
      (default B_local); must divide B_local. Smaller blocks cap memory further.

  Returns:
    (loss, metrics) with metrics `pos_logit`, `neg_logit` (means over positive and negative
    pairs), `i2t_acc`, `t2i_acc` (in-batch top-1 retrieval accuracy); all replicated.
  """
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  axes, n_shards = _mesh_batch_axes(mesh, batch_axes)
  global_batch = image_emb.shape[0]
  _check_shapes(image_emb, text_emb, n_shards, axes)
  local_batch = global_batch // n_shards
  if kind != 'softmax' and logit_bias is None:
    raise ValueError(f"kind={kind!r} needs logit_bias (SigLIP initialises it to -10).")
  if chunk_size is not None and (kind != 'sigmoid_chunked' or local_batch % chunk_size):
    raise ValueError(f'chunk_size={chunk_size} needs kind=sigmoid_chunked and must divide the '
                     f'per-device batch {local_batch}.')
  bias = jnp.zeros((), jnp.float32) if logit_bias is None else logit_bias
  gather = _gather_on(mesh, axes)
  per_device = {'softmax': functools.partial(_softmax_local, gather=gather),
                'sigmoid': functools.partial(_sigmoid_local, gather=gather),
                'sigmoid_chunked': functools.partial(_sigmoid_ring_local,
                                                     chunk_size=chunk_size or local_batch)}[kind]
  batch_spec = P(axes if axes else None)
  fn = jax.shard_map(functools.partial(per_device, axes=axes, global_batch=global_batch),
                     mesh=mesh, in_specs=(batch_spec, batch_spec, P(), P()), out_specs=P())
  return fn(image_emb, text_emb, jnp.asarray(logit_scale, jnp.float32),
            jnp.asarray(bias, jnp.float32))


def distillation_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                      teacher_image_emb: jax.Array, teacher_text_emb: jax.Array,
                      teacher_logit_scale: jax.Array, *, mesh: Mesh,
                      batch_axes: Sequence[str] = ('data', 'fsdp')) -> jax.Array:
  """OpenCLIP's `DistillClipLoss` distillation term over the global batch.

  For each row of the image->text and text->image logits, the cross-entropy from the
  teacher's softmax (its own embeddings and logit scale) to the student's; the mean over
  the B rows of both directions. Each device scores its rows against the gathered other
  tower, as `contrastive_loss`'s softmax does. The teacher is a target: its inputs get no
  gradient. Embeddings as in `contrastive_loss` ([B_global, D], sharded over `batch_axes`);
  the teacher's width may differ from the student's; scales are logs.
  """
  axes, n_shards = _mesh_batch_axes(mesh, batch_axes)
  _check_shapes(image_emb, text_emb, n_shards, axes)
  _check_shapes(teacher_image_emb, teacher_text_emb, n_shards, axes)
  if teacher_image_emb.shape[0] != image_emb.shape[0]:
    raise ValueError(f'The teacher embeds {teacher_image_emb.shape[0]} rows, the student '
                     f'{image_emb.shape[0]}.')
  teacher = jax.lax.stop_gradient(
      (teacher_image_emb, teacher_text_emb, jnp.asarray(teacher_logit_scale, jnp.float32)))
  batch_spec = P(axes if axes else None)
  fn = jax.shard_map(
      functools.partial(_distill_local, axes=axes, global_batch=image_emb.shape[0],
                        gather=_gather_on(mesh, axes)),
      mesh=mesh, in_specs=(batch_spec, batch_spec, P()) * 2, out_specs=P())
  return fn(image_emb, text_emb, jnp.asarray(logit_scale, jnp.float32), *teacher)


def _mesh_batch_axes(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[tuple[str, ...], int]:
  """(the mesh's batch axes, the number of batch shards); axes not in the mesh are left out."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  n_shards = 1
  for a in axes:
    n_shards *= mesh.shape[a]
  return axes, n_shards


def _gather_on(mesh: Mesh, axes):
  """`_gather` over `axes`; on CPU its backward avoids gloo's reduce-scatter."""
  return functools.partial(_gather, axes=axes,
                           reduce_scatter=mesh.devices.flat[0].platform != 'cpu')


def _check_shapes(image_emb, text_emb, n_shards, axes):
  if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
    raise ValueError(f'image_emb {image_emb.shape} and text_emb {text_emb.shape} must both be '
                     '[B_global, D].')
  if image_emb.shape[0] % n_shards:
    raise ValueError(f'Global batch {image_emb.shape[0]} is not divisible by the {n_shards} '
                     f'devices of batch axes {axes}.')


def _logits(a: jax.Array, b: jax.Array, scale: jax.Array, bias: jax.typing.ArrayLike
            ) -> jax.Array:
  """exp(scale) * a @ b.T + bias, accumulated and returned in float32."""
  dots = jnp.einsum('id,jd->ij', a, b, preferred_element_type=jnp.float32)
  return jnp.exp(scale) * dots + bias


def _shard_offset(axes, local_batch: int) -> jax.Array:
  """Global row index of this device's first example (row-major over `axes`)."""
  return jax.lax.axis_index(axes) * local_batch if axes else jnp.zeros((), jnp.int32)


def _gather(x: jax.Array, axes, *, reduce_scatter: bool = True) -> jax.Array:
  """All rows of `x` from every device; gradients flow back to each row's owner.

  The backward of `all_gather` is a reduce-scatter. With `reduce_scatter=False` it is a
  `psum` and a slice of this device's rows instead (same values, N times the bytes): on
  CPU, XLA's gloo reduce-scatter leaves the processes' gloo connections slow for every
  later collective (a 12 MB all-reduce then takes 12 s instead of 40 ms), which made
  multi-process CPU training ~50x slower than one process.
  """
  if not axes:
    return x
  if reduce_scatter:
    return jax.lax.all_gather(x, axes, tiled=True)
  return _gather_psum_backward(x, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_psum_backward(x: jax.Array, axes) -> jax.Array:
  return jax.lax.all_gather(x, axes, tiled=True)


def _gather_psum_backward_fwd(x, axes):
  return _gather_psum_backward(x, axes), None


def _gather_psum_backward_bwd(axes, _, grad):
  rows = grad.shape[0] // jax.lax.psum(1, axes)
  own = jax.lax.axis_index(axes) * rows
  return (jax.lax.dynamic_slice_in_dim(jax.lax.psum(grad, axes), own, rows),)


_gather_psum_backward.defvjp(_gather_psum_backward_fwd, _gather_psum_backward_bwd)


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _pair_metrics(pos_sum, all_sum, i2t_correct, t2i_correct, global_batch, axes) -> Metrics:
  """Global means from per-device sums; computed outside the gradient."""
  pos_sum, all_sum, i2t_correct, t2i_correct = jax.lax.stop_gradient(
      _psum((pos_sum, all_sum, i2t_correct, t2i_correct), axes))
  n_neg = float(global_batch) * (global_batch - 1)  # 64k^2 overflows int32
  return {'pos_logit': pos_sum / global_batch,
          'neg_logit': (all_sum - pos_sum) / max(n_neg, 1.0),
          'i2t_acc': i2t_correct / global_batch,
          't2i_acc': t2i_correct / global_batch}


def _softmax_local(img, txt, scale, bias, *, axes, global_batch, gather):
  del bias
  b = img.shape[0]
  labels = _shard_offset(axes, b) + jnp.arange(b)
  i2t = _logits(img, gather(txt), scale, 0.0)  # [b, B]
  t2i = _logits(txt, gather(img), scale, 0.0)  # [b, B]

  def cross_entropy_sum(logits):
    positives = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - positives), positives

  i2t_loss, positives = cross_entropy_sum(i2t)
  t2i_loss, _ = cross_entropy_sum(t2i)
  loss = _psum(i2t_loss + t2i_loss, axes) / (2 * global_batch)
  i2t, t2i, positives = jax.lax.stop_gradient((i2t, t2i, positives))  # metrics only
  metrics = _pair_metrics(positives.sum(), i2t.sum(),
                          (i2t.argmax(1) == labels).sum(), (t2i.argmax(1) == labels).sum(),
                          global_batch, axes)
  return loss, metrics


def _distill_local(img, txt, scale, t_img, t_txt, t_scale, *, axes, global_batch, gather):
  def soft_cross_entropy_sum(student, teacher):
    return -jnp.sum(jax.nn.softmax(teacher, axis=1) * jax.nn.log_softmax(student, axis=1))

  i2t = soft_cross_entropy_sum(_logits(img, gather(txt), scale, 0.0),
                               _logits(t_img, gather(t_txt), t_scale, 0.0))
  t2i = soft_cross_entropy_sum(_logits(txt, gather(img), scale, 0.0),
                               _logits(t_txt, gather(t_img), t_scale, 0.0))
  return _psum(i2t + t2i, axes) / (2 * global_batch)


def _sigmoid_local(img, txt, scale, bias, *, axes, global_batch, gather):
  b = img.shape[0]
  offset = _shard_offset(axes, b)
  logits = _logits(img, gather(txt), scale, bias)  # [b, B]
  is_pos = jnp.arange(global_batch)[None, :] == (offset + jnp.arange(b))[:, None]
  z = jnp.where(is_pos, 1.0, -1.0)
  loss = -_psum(jnp.sum(jax.nn.log_sigmoid(z * logits)), axes) / global_batch
  logits = jax.lax.stop_gradient(logits)  # metrics only from here on
  positives = jnp.where(is_pos, logits, 0.0).sum(1)
  col_max = jax.lax.pmax(logits.max(0), axes) if axes else logits.max(0)
  own_col_max = jax.lax.dynamic_slice_in_dim(col_max, offset, b)
  metrics = _pair_metrics(positives.sum(), logits.sum(),
                          (logits.argmax(1) == offset + jnp.arange(b)).sum(),
                          (positives >= own_col_max).sum(), global_batch, axes)
  return loss, metrics


def _sigmoid_ring_local(img, txt, scale, bias, *, axes, global_batch, chunk_size):
  """Ring sigmoid loss: n steps, each scoring local images against one travelling chunk.

  At step k a device holds the text chunk of device (me - k) mod n. The chunk's running
  column max travels with it (one extra hop brings it home), so text->image accuracy
  needs no gathered matrix. Each [b, chunk_size] logits block is rematerialised in the
  backward pass, so no block is stored.
  """
  b = img.shape[0]
  n = global_batch // b
  perm = [(i, (i + 1) % n) for i in range(n)]

  @jax.checkpoint
  def block(txt_block, is_home, first_col):
    logits = _logits(img, txt_block, scale, bias)
    is_pos = jnp.logical_and(is_home, jnp.arange(b)[:, None] ==
                             first_col + jnp.arange(txt_block.shape[0])[None, :])
    loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(is_pos, 1.0, -1.0) * logits))
    stats = (logits.sum(), jnp.where(is_pos, logits, 0.0).sum(1), logits.max(1), logits.max(0))
    return loss, jax.lax.stop_gradient(stats)

  def accumulate(txt_chunk, is_home, col_max, totals):
    """Adds one chunk's blocks to (loss, logit sum, positives, row max)."""
    starts = jnp.arange(0, b, chunk_size)
    blocks = txt_chunk.reshape(b // chunk_size, chunk_size, -1)
    losses, (sums, pos, row_max, block_col_max) = jax.lax.map(
        lambda args: block(args[0], is_home, args[1]), (blocks, starts))
    loss, logit_sum, positives, rows = totals
    totals = (loss + losses.sum(), logit_sum + sums.sum(), positives + pos.sum(0),
              jnp.maximum(rows, row_max.max(0)))
    return jnp.maximum(col_max, block_col_max.reshape(-1)), totals

  def ring_step(carry, step):
    txt_chunk, col_max, totals = carry
    col_max, totals = accumulate(txt_chunk, step == 0, col_max, totals)
    txt_chunk, col_max = jax.lax.ppermute((txt_chunk, col_max), axes, perm)
    return (txt_chunk, col_max, totals), None

  neg_inf = jnp.full((b,), -jnp.inf, jnp.float32)
  totals = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jnp.zeros((b,), jnp.float32), neg_inf)
  carry = (txt,) + jax.tree.map(lambda x: _vary(x, axes), (neg_inf, totals))
  if n > 1:
    carry, _ = jax.lax.scan(ring_step, carry, jnp.arange(n - 1))
  txt_chunk, col_max, totals = carry
  col_max, (loss, logit_sum, positives, row_max) = accumulate(txt_chunk, n == 1, col_max, totals)
  if n > 1:  # the last chunk's column max goes home; its features need not travel
    col_max = jax.lax.ppermute(col_max, axes, perm)
  loss = _psum(loss, axes) / global_batch
  metrics = _pair_metrics(positives.sum(), logit_sum, (positives >= row_max).sum(),
                          (positives >= col_max).sum(), global_batch, axes)
  return loss, metrics


def _vary(x, axes):
  """Marks a per-device value as varying over `axes` (shard_map's type system)."""
  return jax.lax.pcast(x, axes, to='varying') if axes else x


def caption_rows(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Per-row sums of the token cross-entropy and the target counts, each [B].

  logits: [B, T, vocab] (float32); targets: [B, T] ids; mask: [B, T], 1 where the target
  counts (CoCa: not padding; LocCa: the task's answer tokens).
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = mask.astype(jnp.float32)
  return {'caption_nll': (nll * mask).sum(-1), 'caption_tokens': mask.sum(-1)}


def caption_loss(rows: dict[str, jax.Array]) -> jax.Array:
  """The mean cross-entropy over every target token of the batch (`caption_rows`)."""
  return rows['caption_nll'].sum() / jnp.maximum(rows['caption_tokens'].sum(), 1.0)
