r"""The per-chip table of issue 10: five models on v5p and v5e pods, compiled on this host.

  python bench/aot_table.py [--topologies v5p:4x4x4,v5e:4x4] [--models ViT-B-32,...] \
      [--out /tmp/aot_table.jsonl]

For each model and topology: the largest power-of-two batch per chip (32 to 512) whose
train step fits in HBM with the config's remat policy (`save_attn` when nothing fits
without remat), as `clip_jax.aot` compiles it (the configs' scanned layers, bf16, FSDP over
all chips), and then that step's HBM per chip and est. MFU (time from the depth
extrapolation: the compiler's estimate, not a measurement). One JSON line per row goes to
`--out` as it is done (a long run can be read while it goes); the Markdown table is printed
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from clip_jax import aot
from configs import clip as clip_config
from configs import siglip as siglip_config

MODELS = {'ViT-B-32': clip_config, 'ViT-B-16': clip_config, 'ViT-L-14': clip_config,
          'ViT-B-16-SigLIP': siglip_config, 'ViT-SO400M-14-SigLIP': siglip_config}
PER_CHIP = (32, 64, 128, 256, 512)


def report_at(model: str, topology: str, chips: int, per_chip: int, remat: str,
              depth_estimate: bool) -> dict:
  config = MODELS[model].get_config(f'model={model},batch_size={per_chip * chips}')
  config.model.remat = remat
  return aot.analyse(config, topology, depth_estimate=depth_estimate)


def largest_fit(model: str, topology: str, chips: int) -> dict | None:
  """The report of the largest per-chip batch that fits: up from 64 by doubling, else 32."""
  def fits(per_chip: int, remat: str) -> bool:
    report = report_at(model, topology, chips, per_chip, remat, False)
    print(f'  {model} {topology} {per_chip}/chip remat={remat}: '
          f'{report["hbm"]["total_bytes"] / aot.GIB:.1f} GiB, fits: {report["fits"]}', flush=True)
    return report['fits']

  for remat in ('none', 'save_attn'):
    if fits(64, remat):
      per_chip = 64
      while per_chip < PER_CHIP[-1] and fits(2 * per_chip, remat):
        per_chip *= 2
    elif fits(32, remat):
      per_chip = 32
    else:
      continue
    return report_at(model, topology, chips, per_chip, remat, True)
  return None


def row(report: dict) -> str:
  est, hbm = report['estimate'], report['hbm']
  mfu = f'{est["mfu"]:.1%}' if est['mfu'] else '-'
  ms = f'{est["step_seconds"] * 1e3:.1f}' if est['step_seconds'] else '-'
  pairs = f'{est["pairs_per_second_per_chip"]:.0f}' if est['pairs_per_second_per_chip'] else '-'
  return (f'| {report["model"]} | {report["topology"]} | {report["batch_per_chip"]:g} | '
          f'{report["remat"]} | {report["loss"]} | {hbm["total_bytes"] / aot.GIB:.1f} of '
          f'{hbm["capacity_bytes"] / aot.GIB:.1f} | {ms} | {pairs} | {mfu} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--topologies', default='v5p:4x4x4,v5e:4x4')
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--out', default='/tmp/aot_table.jsonl')
  args = parser.parse_args()
  reports = []
  for topology in args.topologies.split(','):
    chips = len(aot.topology_devices(topology))
    for model in args.models.split(','):
      report = largest_fit(model, topology, chips)
      if report is None:
        print(f'{model} on {topology}: nothing fits at 32/chip with save_attn', flush=True)
        continue
      reports.append(report)
      with open(args.out, 'a') as f:
        f.write(json.dumps(report) + '\n')
      print(row(report), flush=True)
  print('| model | topology | pairs/chip | remat | loss | HBM/chip GiB | est. step ms | '
        'est. pairs/s/chip | est. MFU |')
  print('|---|---|---|---|---|---|---|---|---|')
  print('\n'.join(row(r) for r in reports))


if __name__ == '__main__':
  main()
