r"""Where the TPU compiler's step-time estimate goes: estimated cycles per kind of op.

  python bench/tpu_cycles.py [--model ViT-B-16] [--batch_size 512] [--topology v5p:2x2x1] \
      [--top 12]

Compiles the trainer's step of `configs/clip.py` (layers unrolled, so that every layer's ops
are in the program) for the topology's chips, as `clip_jax.aot` does, and sums the
`estimated_cycles` the TPU compiler writes into each top-level op of the optimized HLO:
per op kind (matmul fusions, elementwise fusions, copies, ...), and the costliest copies
(layout changes, which move bytes and compute nothing) by shape and source op. The cycles
are the compiler's per-op estimates, summed without the overlap its `optimal_seconds`
allows: read them as shares, not as a step time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from clip_jax import aot
from clip_jax.distributed import quiet_stderr
from configs import clip as clip_config


def op_cycles(hlo: str) -> list[tuple[int, str, str, str]]:
  """(cycles, op kind, result shape, source op name) of every op that carries an estimate."""
  rows = []
  for line in hlo.splitlines():
    cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
    # The result shape may be a tuple (a multi-output fusion): "(bf16[..]{..}, ...) fusion(%..".
    op = re.match(r'\s+(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z][\w\-]*)\((?:%|\))', line)
    if not (cycles and op):
      continue
    fusion = re.search(r'kind=(k\w+)', line)
    source = re.search(r'op_name="([^"]*)"', line)
    kind = op.group(2) + (f' ({fusion.group(1)})' if fusion else '')
    rows.append((int(cycles.group(1)), kind, re.sub(r'\{.*', '', op.group(1)),
                 re.sub(r'\d+', 'N', source.group(1)) if source else ''))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ViT-B-16')
  parser.add_argument('--batch_size', type=int, default=512)
  parser.add_argument('--topology', default='v5p:2x2x1')
  parser.add_argument('--top', type=int, default=12)
  args = parser.parse_args()
  config = clip_config.get_config(f'model={args.model},batch_size={args.batch_size}')
  config.model.scan_layers = False
  lowered = aot.lower_train_step(config, aot.topology_devices(args.topology))[0]
  with quiet_stderr():
    compiled = lowered.compile()
  rows = op_cycles(compiled.as_text())
  total = sum(row[0] for row in rows)
  print(f'{args.model}, {args.batch_size} pairs on {args.topology}, unrolled: est. step '
        f'{compiled.cost_analysis()["optimal_seconds"] * 1e3:.2f} ms; {total:.4g} op cycles')
  by_kind = collections.Counter()
  for cycles, kind, _, _ in rows:
    by_kind[kind] += cycles
  for kind, cycles in by_kind.most_common(args.top):
    print(f'  {cycles / total:6.1%}  {kind}')
  copies = collections.Counter()
  for cycles, kind, shape, source in rows:
    if kind == 'copy':
      copies[shape, source] += cycles
  print('costliest copies (shape, source op):')
  for (shape, source), cycles in copies.most_common(args.top):
    print(f'  {cycles / total:6.2%}  {shape}  {source[-90:]}')


if __name__ == '__main__':
  main()
