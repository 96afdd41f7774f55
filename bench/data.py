"""Input pipeline vs webdataset + torchvision DataLoader on the same shards and cores, and
the data workers one GPU needs.

  python bench/data.py [--samples 4096] [--workers 2] [--batch_size 256] [--batches 12]

Writes JPEG shards (256-512px, drawn shapes over noise), then measures samples/s of
(a) clip_jax's grain pipeline and (b) webdataset + torch DataLoader doing the same work:
decode, RandomResizedCrop(224, scale=(0.9, 1)), normalise, CLIP-tokenise, batch. Both use
the same number of worker processes; one warm-up batch is excluded. clip_jax ships uint8
images and normalises on the accelerator; torchvision normalises float32 in the workers
(its standard recipe). Prints the ratio, then clip_jax's samples/s per worker and the
workers (one core each) that keep one GPU fed at the train step rates measured on an H200
(`GPU_PAIRS_PER_SECOND`). Run it with as many workers as the host has cores to spare: the
per-worker rate holds while each worker has a core of its own.

Then the NaFlex path on the same shards (`--naflex`): each image cropped at its own aspect
ratio, resized to its grid at 196 tokens (224 px at patch 16: the square path's tokens),
patchified and padded, batches of the same 196 x batch tokens; its samples/s per worker
against the square path's.
"""

import argparse
import dataclasses
import io
import math
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

import clip_jax
from clip_jax.data.bench import measure
from clip_jax.data.naflex import NaFlexBatching
from clip_jax.data.pipeline import PipelineConfig
from clip_jax.data.shard_writer import ShardWriter

# clip_jax's train step on one H200, bf16, pairs/s (bench/RESULTS.md 2026-12-04 and DESIGN.md:
# unrolled layers, cuDNN attention for B-16 and L-14). An H100 is slower, so needs no more.
GPU_PAIRS_PER_SECOND = {'ViT-B-32 at 512/GPU': 5622, 'ViT-B-16 at 256/GPU': 2571,
                        'ViT-L-14 at 128/GPU': 699}


def write_shards(root: str, samples: int, per_shard: int = 512) -> str:
  rng = np.random.default_rng(0)
  writer = ShardWriter(root, per_shard)
  for i in range(samples):
    w, h = (int(v) for v in rng.integers(256, 513, 2))
    pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8) + np.uint8(120)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
      x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 120)
      colour = tuple(int(c) for c in rng.integers(0, 255, 3))
      draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    writer.write(buffer.getvalue(), 'jpg', f'a photo of {i % 97} shapes on a noisy background')
  writer.close()
  return f'{root}/{{00000..{len(writer.shards) - 1:05d}}}.tar'


def torch_loader_speed(spec: str, workers: int, batch_size: int, batches: int) -> float:
  import open_clip
  import torch
  import webdataset as wds
  from torchvision import transforms as T

  tokenizer = open_clip.get_tokenizer('ViT-B-32')
  transform = T.Compose([
      T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
      T.ToTensor(), T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
  dataset = (wds.WebDataset(spec, shardshuffle=100, nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker).repeat()
             .shuffle(1024).decode('pil').to_tuple('jpg', 'txt')
             .map_tuple(transform, lambda t: tokenizer([t])[0])
             .batched(batch_size))
  loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
  iterator = iter(loader)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    images, _ = next(iterator)
    assert images.shape == (batch_size, 3, 224, 224) and images.dtype == torch.float32
  return batches * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--samples', type=int, default=4096)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--naflex', action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    spec = write_shards(root, args.samples)
    cfg = PipelineConfig(global_batch_size=args.batch_size, image_size=224,
                         tokenizer=clip_jax.get_tokenizer('clip'), train=spec,
                         workers=args.workers)
    ours = measure(cfg, args.batches)['samples_per_second']
    theirs = torch_loader_speed(spec, args.workers, args.batch_size, args.batches)
    if args.naflex:
      batching = NaFlexBatching(patch_size=16, seq_lens=(196,),
                                max_tokens_per_batch=196 * args.batch_size)
      naflex = measure(dataclasses.replace(cfg, naflex=batching),
                       args.batches)['samples_per_second']
  print(f'{args.workers} workers, batch {args.batch_size}, 224px from 256-512px JPEGs')
  print(f'clip_jax grain pipeline:               {ours:8.1f} samples/s')
  print(f'webdataset + torch DataLoader:          {theirs:8.1f} samples/s')
  print(f'ratio: {ours / theirs:.2f}x')
  per_worker = ours / args.workers
  print(f'clip_jax per worker: {per_worker:.1f} samples/s')
  for model, rate in GPU_PAIRS_PER_SECOND.items():
    print(f'{model} ({rate:,} pairs/s): {math.ceil(rate / per_worker)} workers per GPU')
  if args.naflex:
    print(f'NaFlex (196 tokens) per worker: {naflex / args.workers:.1f} samples/s, '
          f'{naflex / ours:.2f}x the square path')


if __name__ == '__main__':
  main()
