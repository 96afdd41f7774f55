"""Gradient accumulation on 8 fake CPU devices: one-shot vs 'cache' vs 'micro'.

  python bench/accumulation.py [--model tiny] [--batch 1024] [--accums 2,4,8] [--loss softmax]

Builds the trainer's own step (`clip_jax.step.build`: AdamW, clipping, the
contrastive loss) at one global batch, once in one shot and then with each K in both
accumulation modes, and reports XLA's compiled temp memory per device
(`memory_analysis()`) and the median step time, the variants stepping in turn so that
load on a shared host hits them all alike. 'cache' scores every pair against the
whole global batch (the one-shot loss); 'micro' against its own B/K rows only.
"""

import argparse
import os
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import numpy as np

from clip_jax import run_config, sharding, step
from clip_jax.config_base import base_config


def build(args, accum, mode):
  """(compiled step, state, batch) for one accumulation setting."""
  config = base_config()
  config.update_from_flattened_dict({
      'model.name': args.model, 'batch_size': args.batch, 'loss.kind': args.loss,
      'optim.grad_accum': accum, 'optim.grad_accum_mode': mode})
  if args.loss != 'softmax':
    config.model.init_logit_bias = -10.0
  run = run_config.resolve(config, jax.device_count(), data=False)
  program = step.build(run, sharding.make_mesh(run.mesh))
  cfg, state = run.model, program.state
  rng = np.random.default_rng(0)
  size, context = cfg.vision.image_size, cfg.text.context_length
  batch = jax.device_put(
      {'image': rng.integers(0, 255, (args.batch, size, size, 3), dtype=np.uint8),
       'text': rng.integers(1, cfg.text.vocab_size, (args.batch, context)).astype(np.int32)},
      program.batch_sharding)
  return program.jitted_step.lower(state, batch).compile(), state, batch


class Variant:
  """One compiled step with its own state; `run` times one step."""

  def __init__(self, args, accum, mode):
    self.compiled, self.state, self.batch = build(args, accum, mode)
    self.memory = self.compiled.memory_analysis().temp_size_in_bytes / 2**20
    self.times = []
    self.loss = float(self.run())  # warm-up; the first step's loss
    self.times.clear()

  def run(self):
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)  # the state is donated
    jax.block_until_ready(metrics)
    self.times.append(time.perf_counter() - start)
    return metrics['loss']

  @property
  def seconds(self):
    return float(np.median(self.times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='tiny')
  parser.add_argument('--batch', type=int, default=1024)
  parser.add_argument('--accums', default='2,4,8')
  parser.add_argument('--loss', default='softmax')
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  n = jax.device_count()
  settings = [(1, 'cache')] + [(int(k), mode) for k in args.accums.split(',')
                               for mode in ('cache', 'micro')]
  variants = [Variant(args, accum, mode) for accum, mode in settings]
  for _ in range(args.repeats):  # interleaved, so load on a shared host hits every variant
    for variant in variants:
      variant.run()
  print(f'{args.model}, {args.loss}, global batch {args.batch} on {n} devices '
        f'({args.batch // n} per device), float32, median of {args.repeats} interleaved steps\n')
  print('| mode | K | rows per micro-batch and device | temp MiB/device | vs one-shot | '
        'step s | vs one-shot | first-step loss |')
  print('|---|---|---|---|---|---|---|---|')
  base = variants[0]
  for (accum, mode), v in zip(settings, variants):
    print(f'| {"one-shot" if accum == 1 else mode} | {accum} | {args.batch // n // accum} | '
          f'{v.memory:.1f} | {v.memory / base.memory:.2f} | {v.seconds:.3f} | '
          f'{v.seconds / base.seconds:.2f} | {v.loss:.4f} |')


if __name__ == '__main__':
  main()
