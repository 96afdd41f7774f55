r"""OpenCLIP-style CLIP recipes on LAION-style tar shards (img2dataset output).

  python -m clip_jax.train --config configs/clip.py:model=ViT-B-32 --workdir gs://BUCKET/runs/b32 \
      --config.data.train='gs://BUCKET/laion400m/{00000..41455}.tar'

Variants (`configs/clip.py:model=NAME[,batch_size=N][,samples=N]`): ViT-B-32, ViT-B-16,
ViT-L-14. Defaults follow OpenCLIP's LAION-400M recipes: global batch 32,768, AdamW
(b2 0.98, eps 1e-6, wd 0.2), lr 5e-4 (B) / 4e-4 (L) with 2k warmup + cosine, 32 epochs
of 400M samples (`samples` sets the budget; steps = samples / batch). bf16 compute,
FSDP over all devices. Expected (OpenCLIP's published LAION-400M numbers, zero-shot
ImageNet top-1): B-32 62.9%, B-16 67.1%, L-14 72.8%; not reproduced here (no data).
"""

from clip_jax.config_base import base_config, parse_arg

# model: (lr, warmup, remat). remat: the least recompute that fits 256 pairs/chip on v5p
# (`python -m clip_jax.aot ... --topology v5p:2x2x1`, bench/RESULTS.md): `none` for all,
# scanned B-16 12.2 GiB by the compiler's peak; B-32 12.6 and L-14 70.5 summed (upper
# bounds), of 95.7 GiB. Smaller chips or more pairs per chip: `save_attn`, then `full`.
# Layers are scanned (least HBM); `--config.model.scan_layers=False` is estimated 1.3x
# faster where it fits (B-16 128/chip: 11.5 vs 6.4 GiB; L-14 on v5p:4x4x4: 38.2 vs 17.7).
RECIPES = {
    'ViT-B-32': (5e-4, 2000, 'none'),
    'ViT-B-16': (5e-4, 2000, 'none'),
    'ViT-L-14': (4e-4, 2000, 'none'),
}


# The :ARGS and their defaults (configs/flip.py takes them too).
ARGS = dict(model='ViT-B-32', batch_size=32768, samples=int(32 * 400e6))


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  return recipe(args.model, args.batch_size, args.samples)


def recipe(name: str, batch_size: int, samples: int):
  """OpenCLIP's LAION-400M recipe for `name` at `batch_size`, `samples` pairs seen."""
  if name not in RECIPES:
    raise ValueError(f'configs/clip.py: model must be one of {sorted(RECIPES)}, got {name!r}')
  lr, warmup, remat = RECIPES[name]
  c = base_config()
  c.model.name = name
  c.model.dtype = 'bfloat16'
  c.model.remat = remat
  c.batch_size = batch_size
  c.total_steps = samples // c.batch_size
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval_every = 5000
  c.data.train = ''  # set --config.data.train to your shards
  c.data.workers = 16
  c.data.shuffle_window = 10000
  c.data.cycle_length = 8
  c.loss.kind = 'softmax'
  c.optim.lr = lr
  c.optim.warmup_steps = warmup
  c.optim.weight_decay = 0.2
  c.mesh = {'data': 1, 'fsdp': -1, 'tensor': 1}
  return c
