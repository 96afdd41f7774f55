"""Input-pipeline throughput: samples/s and skip counts of the grain pipeline alone.

  python -m clip_jax.data.bench --shards 'data/{00000..00099}.tar' --batch_size 256 \
      --image_size 224 --workers 8 --batches 50

Use it to size `data.workers` before a run: if this is below the model's samples/s on
your accelerators, the run will be input-bound.
"""

from __future__ import annotations

import argparse
import time

import clip_jax
from clip_jax.data.pipeline import Loader, PipelineConfig


def measure(cfg: PipelineConfig, batches: int) -> dict:
  """Samples/s over `batches` batches after one warm-up batch (worker start-up); samples
  counted per batch (NaFlex batches vary in size)."""
  loader = Loader(cfg)
  samples = 0
  try:
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
      samples += len(next(loader)['text'])
    seconds = time.perf_counter() - start
  finally:
    loader.close()
  return {'samples_per_second': samples / seconds, 'seconds': seconds,
          'skipped': dict(loader.skipped)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shards', required=True, help="shard spec, e.g. 'dir/{00000..00099}.tar'")
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--workers', type=int, default=4)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--tokenizer', default='clip', help="'clip' or a sentencepiece .model")
  parser.add_argument('--context_length', type=int, default=77)
  args = parser.parse_args(argv)
  cfg = PipelineConfig(global_batch_size=args.batch_size, image_size=args.image_size,
                       tokenizer=clip_jax.get_tokenizer(args.tokenizer, args.context_length),
                       train=args.shards, workers=args.workers)
  result = measure(cfg, args.batches)
  print(f'{result["samples_per_second"]:.1f} samples/s ({args.batches} batches of '
        f'{args.batch_size}, {args.workers} workers, {args.image_size}px); '
        f'skipped: {result["skipped"] or "none"}')


if __name__ == '__main__':
  main()
