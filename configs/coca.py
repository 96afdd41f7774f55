r"""CoCa (contrastive + captioning, OpenCLIP's `coca_*` models) on LAION-style tar shards.

Pretraining (OpenCLIP's loss weights: contrastive 1, caption 2):

  python -m clip_jax.train --config configs/coca.py:model=coca_ViT-B-32 \
      --workdir gs://BUCKET/runs/coca_b32 \
      --config.data.train='gs://BUCKET/laion400m/{00000..41455}.tar'

Caption fine-tuning, OpenCLIP's README recipe for MSCOCO (`--coca-contrastive-loss-weight 0
--coca-caption-loss-weight 1 --lr 1e-5 --warmup 1000 --batch-size 128 --wd 0.1 --epochs 1`)
from OpenCLIP weights imported with `python -m clip_jax.import_open_clip --model
coca_ViT-L-14 --checkpoint FILE --out DIR`:

  python -m clip_jax.train \
      --config configs/coca.py:model=coca_ViT-L-14,finetune=True,samples=414113 \
      --workdir /runs/coca_coco --config.init_from=DIR \
      --config.data.train='/data/coco/train2014-{00000..00041}.tar'

Variants (`:ARGS`): `model` coca_ViT-B-32 (default), coca_ViT-L-14, coca_base; `batch_size`
(default 32,768; fine-tuning 128); `samples` pairs seen (default 32 x 400M; fine-tuning: one
epoch of your data); `finetune` (the recipe above). After training, `python -m
clip_jax.caption --checkpoint WORKDIR IMAGES...` writes captions and `python -m
clip_jax.export` hands the model to OpenCLIP as a CoCa. What a caption decoder costs per
step and what it buys: docs/captioning.md. Expected: not reproduced here (no data); the
CPU demo (`configs/demo.py:model=tiny-coca`) is measured in the README.
"""

from clip_jax.config_base import base_config, parse_arg

PRESETS = ('coca_ViT-B-32', 'coca_ViT-L-14', 'coca_base')


def get_config(arg=None):
  args = parse_arg(arg, model='coca_ViT-B-32', batch_size=0, samples=int(32 * 400e6),
                   finetune=False)
  if args.model not in PRESETS:
    raise ValueError(f'configs/coca.py: model must be one of {PRESETS}, got {args.model!r}')
  c = base_config()
  c.model.name = args.model
  c.model.dtype = 'bfloat16'
  c.batch_size = args.batch_size or (128 if args.finetune else 32768)
  c.total_steps = max(1, args.samples // c.batch_size)
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval_every = 5000
  c.data.shuffle_window = 10000
  c.data.cycle_length = 8
  c.mesh = {'data': 1, 'fsdp': -1, 'tensor': 1}
  if args.finetune:  # caption only: the towers' contrastive alignment is left as it is
    c.loss.contrastive_weight, c.loss.caption_weight = 0.0, 1.0
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-5, 1000, 0.1
  else:
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 5e-4, 2000, 0.2
  return c
