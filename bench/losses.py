"""Loss memory and speed on 8 fake CPU devices: ours vs a naive full-matrix loss.

  python bench/losses.py [--batches 1024,4096,16384,65536] [--dim 512] [--time_max 16384]

For each global batch B and kind, compiles value_and_grad w.r.t. both embeddings, scale
and bias, and reports XLA's peak temp memory per device (`memory_analysis()`, nothing is
allocated) and the median step time (only up to --time_max: the naive loss at 64k would
need 16 GiB per fake device). The naive baseline is what OpenCLIP does without
--local-loss: every device gathers both towers and builds the full B x B logits.
Prints a markdown table; ratios are against the naive loss of the same kind family.
"""

import argparse
import os
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.losses import contrastive_loss

AXES = ('data',)


def naive_loss(img, txt, scale, bias, *, kind, mesh):
  """Full B x B logits on every device (the baseline)."""

  def per_device(img, txt, scale, bias):
    img, txt = (jax.lax.all_gather(x, AXES, tiled=True) for x in (img, txt))
    logits = jnp.exp(scale) * jnp.einsum('id,jd->ij', img, txt,
                                         preferred_element_type=jnp.float32)
    n = img.shape[0]
    if kind == 'softmax':
      diag = jnp.diagonal(logits)
      return (jnp.sum(jax.nn.logsumexp(logits, 1) - diag)
              + jnp.sum(jax.nn.logsumexp(logits, 0) - diag)) / (2 * n)
    z = 2 * jnp.eye(n) - 1
    return -jnp.sum(jax.nn.log_sigmoid(z * (logits + bias))) / n

  spec = P(AXES)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P(), P()),
                       out_specs=P(), check_vma=False)(img, txt, scale, bias)


def ours(img, txt, scale, bias, *, kind, mesh):
  return contrastive_loss(img, txt, scale, bias, kind=kind, mesh=mesh, batch_axes=AXES)[0]


def compile_step(loss_fn, kind, mesh, batch, dim):
  sharding = NamedSharding(mesh, P(AXES))
  step = jax.jit(jax.value_and_grad(lambda a, b, s, c: loss_fn(a, b, s, c, kind=kind, mesh=mesh),
                                    argnums=(0, 1, 2, 3)))
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  return step.lower(spec, spec, scalar, scalar).compile(), sharding


def time_step(compiled, sharding, batch, dim, repeats=3):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  img = jax.device_put(x, sharding)
  txt = jax.device_put(np.roll(x, 1, axis=1), sharding)
  args = (img, txt, jnp.float32(2.3), jnp.float32(-10.0))
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(loss_fn, kind, mesh, batch, dim, time_max):
  """(temp MiB per device, median step seconds or None) of one compiled step."""
  compiled, sharding = compile_step(loss_fn, kind, mesh, batch, dim)
  mem = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return mem, (time_step(compiled, sharding, batch, dim) if batch <= time_max else None)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', default='1024,4096,16384,65536')
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--time_max', type=int, default=16384)
  args = parser.parse_args()
  mesh = Mesh(np.array(jax.devices()), AXES)
  n = len(jax.devices())
  print(f'{n} devices, embedding dim {args.dim}, value_and_grad w.r.t. embeddings, scale, bias\n')
  print('| B global | B local | loss | temp MiB/device | vs naive | step s | vs naive |')
  print('|---|---|---|---|---|---|---|')
  for batch in (int(b) for b in args.batches.split(',')):
    naive = {k: measure(naive_loss, k, mesh, batch, args.dim, args.time_max)
             for k in ('softmax', 'sigmoid')}
    for kind in ('softmax', 'sigmoid', 'sigmoid_chunked'):
      base_kind = 'softmax' if kind == 'softmax' else 'sigmoid'
      (naive_mem, naive_s), (mem, secs) = naive[base_kind], measure(
          ours, kind, mesh, batch, args.dim, args.time_max)
      if kind != 'sigmoid_chunked':
        print(f'| {batch} | {batch // n} | naive {kind} | {naive_mem:.1f} | 1.00 | '
              f'{_fmt(naive_s)} | 1.00 |')
      print(f'| {batch} | {batch // n} | {kind} | {mem:.1f} | {mem / naive_mem:.3f} | '
            f'{_fmt(secs)} | {_ratio(secs, naive_s)} |', flush=True)


def _fmt(secs):
  return '-' if secs is None else f'{secs:.3f}'


def _ratio(a, b):
  return '-' if a is None or b is None else f'{a / b:.2f}'


if __name__ == '__main__':
  main()
