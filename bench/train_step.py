"""clip_jax's train step vs OpenCLIP's on the same machine, same model and batch, alternating.

  python bench/train_step.py [--model ViT-B-32] [--batch_size 32] [--dtype float32]
                             [--rounds 3] [--steps 3]

Each round times `--steps` steps of (a) clip_jax's jitted train step (the trainer's own
`clip_jax.step.build`: softmax loss, AdamW, global-norm clip) on one device and (b) OpenCLIP's
step (`ClipLoss`, `torch.optim.AdamW`, `clip_grad_norm_`, the order of its `train_one_epoch`)
on the same device kind, after one warm-up step each. Reports the median pairs/s of each,
the ratio, and each step's FLOP/s (the analytic count of metrics.py, the same for both)
as a share of the fastest square matmul either library runs on this device: a ratio only
means something beside how close the reference already is to the machine's limit.
`--dtype bfloat16` uses bf16 compute in clip_jax and `torch.autocast(bf16)` in OpenCLIP
(GPU runs). Needs torch and open_clip (the test extra); never used by tests.
"""

import argparse
import statistics
import time

import jax
import numpy as np
import open_clip
import torch

from clip_jax import run_config, sharding
from clip_jax import step as step_lib
from clip_jax.config_base import base_config
from clip_jax.metrics import train_flops_per_sample


def clip_jax_step(args):
  """A function running one clip_jax train step on a fixed batch (waits for the device)."""
  config = base_config()
  config.model.name, config.model.dtype = args.model, args.dtype
  config.model.scan_layers = False
  config.batch_size = args.batch_size
  config.mesh = {'data': 1, 'fsdp': 1, 'tensor': 1}
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  program = step_lib.build(run_config.resolve(config, 1, data=False), mesh)
  model, state, step = program.model, program.state, program.jitted_step
  cfg = model.cfg
  rng = np.random.default_rng(0)
  size, context = cfg.vision.image_size, cfg.text.context_length
  batch = {'image': rng.integers(0, 255, (args.batch_size, size, size, 3), dtype=np.uint8),
           'text': rng.integers(1, 49407, (args.batch_size, context)).astype(np.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  step = step.lower(state, batch).compile()
  # Analytic (metrics.py): on GPU cost_analysis() leaves out the cuBLAS/cuDNN custom calls
  # that do the matmuls (1.5 of 31.6 TFLOP per ViT-B-16 step at 256 on an H200).
  flops = train_flops_per_sample(cfg, context) * args.batch_size
  holder = {'state': state}

  def run():
    holder['state'], metrics = step(holder['state'], batch)
    jax.block_until_ready(metrics['loss'])

  return run, flops


def open_clip_step(args):
  """One OpenCLIP training step on a fixed batch (synchronised on GPU)."""
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = open_clip.create_model(args.model, device=device)
  model.train()
  loss_fn = open_clip.ClipLoss()
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                weight_decay=0.2)
  size = model.visual.image_size
  size = size[0] if isinstance(size, tuple) else size
  images = torch.randn(args.batch_size, 3, size, size, device=device)
  texts = torch.randint(1, 49407, (args.batch_size, 77), device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')

  def run():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      image_features, text_features, logit_scale = model(images, texts)
      loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  return run


def matmul_peak(dtype: str, repeats: int = 5) -> float:
  """FLOP/s of the faster of jax's and torch's [n, n] x [n, n] matmul on this device
  (n = 8192 on GPU, where a smaller one stays far from the peak; 2048 elsewhere)."""
  n = 8192 if torch.cuda.is_available() else 2048
  a = np.random.default_rng(0).random((n, n), dtype=np.float32)
  x = jax.numpy.asarray(a, dtype)
  t = torch.from_numpy(a).to('cuda' if torch.cuda.is_available() else 'cpu',
                             getattr(torch, dtype))
  matmul = jax.jit(lambda x: x @ x)
  def torch_matmul():
    t @ t
    if t.is_cuda:
      torch.cuda.synchronize()

  runs = {'jax': lambda: matmul(x).block_until_ready(), 'torch': torch_matmul}
  best = 0.0
  for run in runs.values():
    run()
    start = time.perf_counter()
    for _ in range(repeats):
      run()
    best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
  return best


def pairs_per_second(run, steps: int, batch_size: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    run()
  return steps * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ViT-B-32')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  clip_jax_run, flops = clip_jax_step(args)
  steps = {'clip_jax': clip_jax_run, 'open_clip': open_clip_step(args)}
  for run in steps.values():
    run()  # compile / warm up
  rates = {name: [] for name in steps}
  for round_ in range(args.rounds):
    for name, run in steps.items():
      rates[name].append(pairs_per_second(run, args.steps, args.batch_size))
      print(f'round {round_}: {name} {rates[name][-1]:.2f} pairs/s', flush=True)
  ours, theirs = (statistics.median(rates[k]) for k in ('clip_jax', 'open_clip'))
  print(f'{args.model} batch {args.batch_size} {args.dtype} on {jax.devices()[0].device_kind}: '
        f'clip_jax {ours:.2f} pairs/s, OpenCLIP {theirs:.2f} pairs/s, ratio {ours / theirs:.2f}')
  peak = matmul_peak(args.dtype)
  for name, rate in (('clip_jax', ours), ('OpenCLIP', theirs)):
    achieved = flops / args.batch_size * rate
    print(f'{name}: {achieved / 1e9:.0f} GFLOP/s = {achieved / peak:.0%} of the '
          f'matmul peak ({peak / 1e9:.0f} GFLOP/s; {flops / 1e9:.0f} GFLOP per step)')


if __name__ == '__main__':
  main()
