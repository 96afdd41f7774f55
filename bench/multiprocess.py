"""Multi-process training throughput on one machine: 2 processes x 2 devices vs 1 x 4.

  python bench/multiprocess.py [--steps 60] [--repeats 2] [--batch_size 128] [--fsdp 1]

Runs the demo config through `launch/local.sh` (jax.distributed + gloo collectives, the
code path of a TPU pod or a GPU cluster) and as one process with the same 4-device mesh,
alternating, and reads samples/s from each run's metrics.jsonl (the median of the log
windows after the first, which holds the compile). Prints both and the ratio. Needs the
demo data (generated on first use, ~5 s).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_args(workdir: pathlib.Path, args) -> list[str]:
  return ['--config', str(ROOT / 'configs' / 'demo.py'), '--workdir', str(workdir),
          f'--config.total_steps={args.steps}', f'--config.batch_size={args.batch_size}',
          '--config.log_every=10', '--config.eval.zeroshot_shards=',
          '--config.checkpoint_every=100000', f'--config.mesh.fsdp={args.fsdp}']


def run(layout: tuple[int, int], workdir: pathlib.Path, args) -> float:
  """Median samples/s of one run with `layout` = (processes, devices per process)."""
  processes, devices = layout
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', PYTHON=sys.executable,
             CLIP_JAX_LOG_DIR=str(workdir.parent / 'logs'))
  env.pop('XLA_FLAGS', None)
  if processes == 1:
    cmd = [sys.executable, '-m', 'clip_jax.train', *train_args(workdir, args)]
    env['JAX_NUM_CPU_DEVICES'] = str(devices)
  else:
    cmd = [str(ROOT / 'launch' / 'local.sh'), str(processes), str(devices), '--',
           *train_args(workdir, args)]
  subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=3600)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return statistics.median(r['samples_per_second'] for r in records[1:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--fsdp', type=int, default=1, help='FSDP axis size (1: data parallel)')
  args = parser.parse_args()
  results = {(1, 4): [], (2, 2): []}
  with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(args.repeats):
      for layout in results:
        workdir = pathlib.Path(tmp) / f'{layout[0]}x{layout[1]}_{repeat}'
        results[layout].append(run(layout, workdir, args))
        print(f'{layout[0]} process(es) x {layout[1]} devices: '
              f'{results[layout][-1]:.0f} samples/s', flush=True)
  one, two = (statistics.median(results[k]) for k in ((1, 4), (2, 2)))
  print(f'median: 1x4 {one:.0f} samples/s, 2x2 {two:.0f} samples/s, ratio 2x2/1x4 = '
        f'{two / one:.2f}')


if __name__ == '__main__':
  main()
