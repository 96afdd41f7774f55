r"""clip_jax's train step against OpenCLIP's on one GPU: every variant, one table.

  python bench/gpu_step.py [--models ViT-B-16:256,ViT-L-14:128,ViT-B-32:512] [--steps 10]
                           [--budget 480] [--attention auto,xla] [--json OUT.json]
  python bench/gpu_step.py --smoke      # CPU or GPU: the tiny preset, 2 steps, every kind

Per model (batch per GPU after the colon), in this order:
- clip_jax: `configs/clip.py`'s recipe (bf16, AdamW, softmax loss, clipping) through the
  trainer's own step builder (`clip_jax.step.build`) on one device, for each attention in
  `--attention` (passed to `model.attention` as given), layers unrolled and scanned;
- OpenCLIP: `create_model`, AdamW, `ClipLoss`, `clip_grad_norm_` in the order of its
  `train_one_epoch`, autocast bf16, TF32 on (as its `main.py` sets), eager and
  `torch.compile` (on CPU with the `aot_eager` backend: inductor would need minutes and a
  C++ toolchain there).
Printed per variant: compile/warm-up seconds, median step ms, pairs/s, MFU of the analytic
FLOPs (`clip_jax.metrics`, the same count for both sides) against the bf16 matmul peak
measured first on this device and against the 989 TFLOP/s H100/H200 spec, peak memory
(JAX: the device's `peak_bytes_in_use`, else the compiled program's; torch:
`max_memory_allocated`), the first loss (sides agree to ~1e-3: same init scheme, not the
same weights), then the whole table again at the end (and as JSON with `--json`).

Each variant runs in a process of its own: its peak memory is its own, and an error or
out-of-memory costs that row only. Time: the whole run keeps to `--budget` seconds (default
480, 8 minutes) including compiles. Each variant gets the time left divided by the
variants left (time a variant does not use passes on); a variant stops timing steps when
its share runs out (at least 2 timed steps) and is killed if its compile alone overruns,
its row saying so.

Needs on the GPU machine, beyond jax, flax, optax, orbax, torch and timm: the packages in
`NEEDS` (the script names the missing ones and stops before any compute). Bring them as
wheels: on a machine with network, `pip download --no-deps --only-binary=:all:
--python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
--platform any -d wheels NAMES`, carry `wheels/` along, then there `pip install --no-index
--no-deps --target /tmp/site wheels/*.whl` and run with `PYTHONPATH=/tmp/site`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_FLOPS = 989e12  # H100/H200 SXM dense bf16
# import name -> pip distribution: what clip_jax's step (config, pipeline, tokenizer
# modules) and OpenCLIP import beyond the GPU machine's jax, flax, optax, orbax, torch, timm.
NEEDS = {'ml_collections': 'ml-collections', 'grain': 'grain', 'array_record': 'array-record',
         'portpicker': 'portpicker', 'ftfy': 'ftfy', 'wcwidth': 'wcwidth', 'regex': 'regex',
         'open_clip': 'open-clip-torch'}
DEFAULT_MODELS = 'ViT-B-16:256,ViT-L-14:128,ViT-B-32:512'
SMOKE_MODEL = 'tiny:4'


@dataclasses.dataclass(frozen=True)
class Variant:
  side: str          # 'peak' | 'clip_jax' | 'open_clip'
  model: str = ''
  batch: int = 0
  mode: str = ''     # clip_jax: '<attention>/unrolled' or '<attention>/scanned';
                     # open_clip: 'eager' or 'compile'

  @property
  def name(self) -> str:
    return f'{self.side} {self.model} {self.mode}'.strip()


def variants(models: str, attentions: list[str]) -> list[Variant]:
  """The matmul peak first, then per model clip_jax's variants and OpenCLIP's."""
  out = [Variant('peak')]
  for item in models.split(','):
    model, _, batch = item.partition(':')
    out += [Variant('clip_jax', model, int(batch), f'{a}/{layers}')
            for a in attentions for layers in ('unrolled', 'scanned')]
    out += [Variant('open_clip', model, int(batch), mode) for mode in ('eager', 'compile')]
  return out


def missing_packages() -> list[str]:
  return [dist for module, dist in NEEDS.items() if importlib.util.find_spec(module) is None]


# ---- in the variant's own process ---------------------------------------------------


def time_steps(run: Callable[[], Any], steps: int, deadline: float) -> tuple[float, float, Any]:
  """(warm-up seconds, median step seconds, first result): one warm-up (compile) call,
  then up to `steps` timed calls, fewer when `deadline` (wall clock) comes (at least 2)."""
  start = time.perf_counter()
  first = run()
  warmup = time.perf_counter() - start
  times: list[float] = []
  while len(times) < steps and (len(times) < 2 or time.time() + times[-1] < deadline):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return warmup, statistics.median(times), first


def clip_jax_run(variant: Variant) -> tuple[Callable[[], Any], Callable[[], float], Any]:
  """One clip_jax train step on a fixed random batch (waits for the device), a reader of
  its peak memory, and the model config."""
  import jax
  import numpy as np

  from clip_jax import run_config, sharding
  from clip_jax import step as step_lib
  from configs import clip

  attention, layers = variant.mode.split('/')
  # --smoke: the tiny preset on ViT-B-32's recipe.
  recipe = variant.model if variant.model in clip.RECIPES else 'ViT-B-32'
  config = clip.recipe(recipe, variant.batch, variant.batch)
  config.model.name = variant.model
  config.model.attention = attention
  config.model.scan_layers = layers == 'scanned'
  config.mesh = {'data': 1, 'fsdp': 1, 'tensor': 1}
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  program = step_lib.build(run_config.resolve(config, 1, data=False), mesh)
  cfg = program.model.cfg
  rng = np.random.default_rng(0)
  size, context = cfg.vision.image_size, cfg.text.context_length
  batch = {'image': rng.integers(0, 255, (variant.batch, size, size, 3), dtype=np.uint8),
           'text': rng.integers(1, cfg.text.vocab_size, (variant.batch, context)).astype(np.int32)}
  batch = jax.device_put(batch, program.batch_sharding)
  compiled = program.jitted_step.lower(program.state, batch).compile()
  holder = {'state': program.state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)
    return float(metrics['loss'])

  def peak_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      return stats['peak_bytes_in_use']
    memory = compiled.memory_analysis()
    return memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes

  return run, peak_bytes, cfg


def open_clip_run(variant: Variant) -> tuple[Callable[[], Any], Callable[[], float], Any]:
  """One OpenCLIP training step as its trainer takes it (synchronised on GPU)."""
  import open_clip
  import torch

  from clip_jax.convert.open_clip_config import model_cfg
  from clip_jax.models.presets import get_config

  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  torch.backends.cuda.matmul.allow_tf32 = True  # OpenCLIP's main.py
  torch.backends.cudnn.allow_tf32 = True
  cfg = get_config(variant.model)
  if open_clip.get_model_config(variant.model) is not None:
    model = open_clip.create_model(variant.model, device=device)
  else:  # a clip_jax-only preset (tiny, --smoke): OpenCLIP builds our exported config
    model = open_clip.CLIP(**model_cfg(cfg)).to(device)
  model.train()
  loss_fn = open_clip.ClipLoss()
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                weight_decay=0.2)
  size = cfg.vision.image_size
  images = torch.randn(variant.batch, 3, size, size, device=device)
  texts = torch.randint(1, cfg.text.vocab_size, (variant.batch, cfg.text.context_length),
                        device=device)
  forward = model
  if variant.mode == 'compile':
    forward = torch.compile(model, backend='inductor' if cuda else 'aot_eager')

  def run():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
      image_features, text_features, logit_scale = forward(images, texts)
      loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss)  # waits for the device

  def peak_bytes() -> float:
    return torch.cuda.max_memory_allocated() if cuda else float('nan')

  return run, peak_bytes, cfg


def matmul_peak(deadline: float) -> dict[str, Any]:
  """bf16 FLOP/s of the faster of jax's and torch's square matmul on this device (n = 8192
  on GPU, where a smaller one stays far from the peak; 1024 elsewhere)."""
  import jax
  import numpy as np
  import torch

  cuda = torch.cuda.is_available()
  n = 8192 if cuda else 1024
  a = np.random.default_rng(0).random((n, n), dtype=np.float32)
  x = jax.numpy.asarray(a, 'bfloat16')
  t = torch.from_numpy(a).to('cuda' if cuda else 'cpu', torch.bfloat16)
  matmul = jax.jit(lambda x: x @ x)

  def torch_matmul():
    t @ t
    if cuda:
      torch.cuda.synchronize()

  seconds = {name: time_steps(run, 5, deadline)[1] for name, run in
             (('jax', lambda: matmul(x).block_until_ready()), ('torch', torch_matmul))}
  return {'peak_flops': 2 * n**3 / min(seconds.values()), 'device': jax.devices()[0].device_kind}


def run_variant(variant: Variant, steps: int, deadline: float) -> dict[str, Any]:
  """What the variant's row needs, measured in this process."""
  if variant.side == 'peak':
    return matmul_peak(deadline)
  from clip_jax.metrics import train_flops_per_sample
  build = clip_jax_run if variant.side == 'clip_jax' else open_clip_run
  start = time.perf_counter()
  run, peak_bytes, cfg = build(variant)
  build_s = time.perf_counter() - start
  warmup, step_s, loss = time_steps(run, steps, deadline)
  return {'compile_s': build_s + warmup, 'step_s': step_s, 'loss': loss,
          'peak_bytes': peak_bytes(),
          'flops_per_pair': train_flops_per_sample(cfg, cfg.text.context_length)}


# ---- the parent: one process per variant, the table -----------------------------------


def launch(variant: Variant, steps: int, limit: float) -> dict[str, Any]:
  """Runs `variant` in a child process for at most `limit` seconds; its result or error."""
  command = [sys.executable, os.path.abspath(__file__), '--child',
             json.dumps(dataclasses.asdict(variant)), '--steps', str(steps),
             '--deadline', str(time.time() + limit)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, env=env,
                          check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'over its time limit ({limit:.0f} s)'}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith('RESULT '):
      return json.loads(line.removeprefix('RESULT '))
  last = (done.stderr.strip().splitlines() or [f'exit {done.returncode}'])[-1]
  return {'error': last[:200]}


def row(variant: Variant, result: dict[str, Any], peak: float) -> str:
  if 'error' in result:
    return f'| {variant.name} | {variant.batch} | {result["error"]} |||||||'
  step_s = result['step_s']
  pairs = variant.batch / step_s
  achieved = result['flops_per_pair'] * pairs
  return (f'| {variant.name} | {variant.batch} | {pairs:,.1f} | {step_s * 1e3:.1f} | '
          f'{achieved / peak:.1%} | {achieved / SPEC_FLOPS:.1%} | '
          f'{result["peak_bytes"] / 2**30:.2f} | {result["compile_s"]:.1f} | '
          f'{result["loss"]:.4f} |')


HEADER = ('| variant | batch | pairs/s | step ms | MFU (measured peak) | MFU (989 TFLOP/s) | '
          'peak GiB | compile+warm-up s | first loss |\n|---|---|---|---|---|---|---|---|---|')


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=DEFAULT_MODELS,
                      help='MODEL:BATCH_PER_GPU,... (default %(default)s)')
  parser.add_argument('--attention', default='auto,xla',
                      help='model.attention values for clip_jax, comma-separated')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--budget', type=float, default=480.0, help='seconds for the whole run')
  parser.add_argument('--smoke', action='store_true', help=f'{SMOKE_MODEL}, 2 steps')
  parser.add_argument('--json', default='', help='also write the results here')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--deadline', type=float, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    result = run_variant(Variant(**json.loads(args.child)), args.steps, args.deadline)
    print('RESULT ' + json.dumps(result), flush=True)
    return 0
  missing = missing_packages()
  if missing:
    print(f'error: bench/gpu_step.py needs {" ".join(missing)} (not installed). Bring them as '
          'wheels: see the end of `python bench/gpu_step.py --help`.', file=sys.stderr)
    return 2
  if args.json and os.path.exists(args.json):
    print(f'error: --json {args.json} exists; not replaced.', file=sys.stderr)
    return 2
  models, steps = (SMOKE_MODEL, 2) if args.smoke else (args.models, args.steps)
  todo = variants(models, args.attention.split(','))
  end = time.time() + args.budget
  results: list[tuple[Variant, dict[str, Any]]] = []
  peak = float('nan')
  for i, variant in enumerate(todo):
    result = launch(variant, steps, (end - time.time()) / (len(todo) - i))
    if variant.side == 'peak':
      peak = result.get('peak_flops', float('nan'))
      print(f'{result.get("device", "?")}: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s '
            f'{result.get("error", "")}', flush=True)
      continue
    results.append((variant, result))
    print(row(variant, result, peak), flush=True)
  print('\n' + HEADER)
  for variant, result in results:
    print(row(variant, result, peak))
  if args.json:
    with open(args.json + '.tmp', 'w') as f:  # whole or not at all
      json.dump({'peak_flops': peak, 'rows': [
          {**dataclasses.asdict(v), **r} for v, r in results]}, f, indent=1)
    os.replace(args.json + '.tmp', args.json)
  return 0


if __name__ == '__main__':
  sys.exit(main())
