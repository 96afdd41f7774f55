r"""OpenCLIP-style CLIP recipes on LAION-style tar shards (img2dataset output).

  python -m clip_jax.train --config configs/clip.py:model=ViT-B-32 --workdir gs://BUCKET/runs/b32 \
      --config.data.train='gs://BUCKET/laion400m/{00000..41455}.tar'

Variants (`configs/clip.py:model=NAME[,batch_size=N][,samples=N][,gpus=N]`): ViT-B-32,
ViT-B-16, ViT-L-14. Defaults follow OpenCLIP's LAION-400M recipes: global batch 32,768, AdamW
(b2 0.98, eps 1e-6, wd 0.2), lr 5e-4 (B) / 4e-4 (L) with 2k warmup + cosine, 32 epochs
of 400M samples (`samples` sets the budget; steps = samples / batch). bf16 compute,
FSDP over all devices, layers unrolled (see RECIPES). Expected (OpenCLIP's published
LAION-400M numbers, zero-shot ImageNet top-1): B-32 62.9%, B-16 67.1%, L-14 72.8%; not
reproduced here (no data).

GPU hosts (`gpus=N`, the GPUs of the whole run; launch/gpu_host.sh, launch/slurm.sbatch):
data parallel over every GPU (`GPU_MESH`), and unless `batch_size` is given, a global batch
of N x the model's per-GPU batch (`GPU_BATCH`, sized for 80 GB), e.g.

  launch/gpu_host.sh --config configs/clip.py:model=ViT-B-16,gpus=8 --workdir /runs/b16 \
      --config.data.train='/data/laion/{00000..41455}.tar'
"""

from clip_jax.config_base import base_config, parse_arg

# model: (lr, warmup, remat, scan_layers). Target: 256 pairs per chip on v5p (95.7 GiB).
# remat `none` (keep every activation) and layers unrolled for all three: the unrolled step
# fits and the TPU compiler estimates it 1.32x (B-16) to 1.34x (L-14) faster than the
# scanned one (bench/RESULTS.md 2026-12-01: the scan's per-layer stack slices). HBM per
# chip of the unrolled step at 256 pairs/chip, `python -m clip_jax.aot --config
# configs/clip.py:model=M,batch_size=1024 --topology v5p:2x2x1 --nodepth_estimate
# --config.model.scan_layers=False` (bench/RESULTS.md 2026-12-04): B-32 10.0 GiB, B-16
# 22.3, L-14 76.0 (79%, est. 57.3% MFU; scanned 17.7 at 128/chip). Scan
# (`--config.model.scan_layers=True`: about half the HBM, a compile independent of depth)
# or remat (`save_attn`, then `full`) only where a chip holds less or more pairs per chip
# are asked for: the aot tool says whether a setting fits.
RECIPES = {
    'ViT-B-32': (5e-4, 2000, 'none', False),
    'ViT-B-16': (5e-4, 2000, 'none', False),
    'ViT-L-14': (4e-4, 2000, 'none', False),
}

# GPUs (`gpus=N`): pairs per GPU for 80 GB at bf16 with the recipe's remat and unrolled
# layers. B-16 at 256: 30.7 GiB, the compiled CUDA program's memory on an H200
# (DESIGN.md, 2026-12-04). B-32 at 512 and L-14 at 128 ran unrolled on that H200 (141 GB;
# memory not recorded); the TPU compiler's HBM for the same step data parallel on 4 chips
# (a replicated state, as on GPUs) estimates the GPU program's (B-16: TPU 22.3 vs CUDA
# 30.7 GiB): `python -m clip_jax.aot --config configs/clip.py:model=M,batch_size=4B
# --topology v5p:2x2x1 --nodepth_estimate --config.model.scan_layers=False
# --config.model.attention=xla --config.mesh.data=4 --config.mesh.fsdp=1`. By FSDP
# numbers at 128 pairs/chip (RESULTS 2026-12-01: L-14 38.2 GiB) plus the replicated
# state (6.8 GB), L-14 at 128 is ~45 GiB; B-32 at 512 about twice its 10.0 GiB at 256.
GPU_BATCH = {'ViT-B-32': 512, 'ViT-B-16': 256, 'ViT-L-14': 128}
# Data parallel over all GPUs of all hosts: a replicated train state (float32 params,
# gradients, AdamW moments: 16 bytes per parameter) takes 2.4 GB (B-32, B-16) to 6.8 GB
# (L-14) of 80, so none of these needs FSDP, and a step's only collective is the gradient
# all-reduce. A model whose state does not fit: `--config.mesh.fsdp=GPUS_PER_HOST` shards
# it over the GPUs of each host (NVLink), data parallel across hosts.
GPU_MESH = {'data': -1, 'fsdp': 1, 'tensor': 1}


# The :ARGS and their defaults (configs/flip.py takes them too). batch_size 0: 32,768, or
# with gpus > 0, gpus x GPU_BATCH[model].
ARGS = dict(model='ViT-B-32', batch_size=0, samples=int(32 * 400e6), gpus=0)
OPENCLIP_BATCH = 32768


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  return recipe(args.model, args.batch_size, args.samples, args.gpus)


def recipe(name: str, batch_size: int, samples: int, gpus: int = 0):
  """OpenCLIP's LAION-400M recipe for `name` at `batch_size` (0: the default), `samples`
  pairs seen, on TPU or with `gpus` > 0 on that many GPUs."""
  if name not in RECIPES:
    raise ValueError(f'configs/clip.py: model must be one of {sorted(RECIPES)}, got {name!r}')
  if gpus < 0 or batch_size < 0:
    raise ValueError(f'configs/clip.py: gpus={gpus} and batch_size={batch_size} must be >= 0')
  lr, warmup, remat, scan_layers = RECIPES[name]
  c = base_config()
  c.model.name = name
  c.model.dtype = 'bfloat16'
  c.model.remat = remat
  c.model.scan_layers = scan_layers
  c.batch_size = batch_size or (gpus * GPU_BATCH[name] if gpus else OPENCLIP_BATCH)
  c.total_steps = samples // c.batch_size
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval_every = 5000
  c.data.train = ''  # set --config.data.train to your shards
  c.data.shuffle_window = 10000
  c.data.cycle_length = 8
  c.loss.kind = 'softmax'
  c.optim.lr = lr
  c.optim.warmup_steps = warmup
  c.optim.weight_decay = 0.2
  c.mesh = dict(GPU_MESH) if gpus else {'data': 1, 'fsdp': -1, 'tensor': 1}
  return c
