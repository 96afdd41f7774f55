r"""SigLIP: sigmoid loss with the SigLIP presets, memory-lean ring loss at large batch.

  python -m clip_jax.train --config configs/siglip.py:model=ViT-B-16-SigLIP \
      --workdir gs://BUCKET/runs/siglip_b16 \
      --config.data.train='gs://BUCKET/webli/{00000..09999}.tar' \
      --config.model.text.tokenizer=gs://BUCKET/spiece.model

Variants: `model=` any SigLIP preset (ViT-B-16-SigLIP, ViT-L-16-SigLIP-256,
ViT-SO400M-14-SigLIP, ...), `batch_size=` (default 32,768), `samples=` (default 9B, the
paper's B/16 budget). SigLIP presets need a sentencepiece tokenizer file
(`model.text.tokenizer`; train one with `python -m clip_jax.data.train_tokenizer`).
Recipe (SigLIP paper): lr 1e-3, wd 1e-4, warmup 5k... here 2k, b2 0.95, logit scale
log(10) and bias -10 at init, `sigmoid_chunked` loss (ring over devices).
Expected (paper, WebLI, ImageNet zero-shot): B/16 at 224px ~76%; not reproduced here.
"""

from clip_jax.config_base import base_config, parse_arg

# Presets whose unrolled step is measured to fit 256 pairs per v5p chip: they unroll their
# layers, which the TPU compiler estimates 1.3x faster than scanned (bench/RESULTS.md
# 2026-12-01). ViT-B-16-SigLIP: 24.2 GiB of 95.7, est. 53.0% MFU (`python -m clip_jax.aot
# --config configs/siglip.py:model=ViT-B-16-SigLIP,batch_size=1024 --topology v5p:2x2x1
# --nodepth_estimate --config.model.scan_layers=False`, bench/RESULTS.md 2026-12-04).
# Other presets stay scanned (about half the HBM) until measured at their batch per chip:
# ViT-SO400M-14-SigLIP unrolled takes 20.0 GiB at 64 pairs per chip on v5p:4x4x4.
UNROLLED = ('ViT-B-16-SigLIP',)


def get_config(arg=None):
  args = parse_arg(arg, model='ViT-B-16-SigLIP', batch_size=32768, samples=int(9e9))
  c = base_config()
  c.model.name = args.model
  c.model.dtype = 'bfloat16'
  c.model.remat = 'none'  # fits 256 pairs/chip on v5p (B/16 unrolled: 24.2 GiB, UNROLLED)
  c.model.scan_layers = args.model not in UNROLLED
  c.batch_size = args.batch_size
  c.total_steps = args.samples // c.batch_size
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval_every = 5000
  c.data.shuffle_window = 10000
  c.data.cycle_length = 8
  c.data.augment = 'squash'
  c.loss.kind = 'sigmoid_chunked'
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2000
  c.optim.b2 = 0.95
  c.optim.weight_decay = 1e-4
  c.mesh = {'data': 1, 'fsdp': -1, 'tensor': 1}
  return c
