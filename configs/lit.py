r"""LiT: locked-image tuning. The image tower comes from a checkpoint and stays frozen;
the text tower learns to match it.

  python -m clip_jax.import_open_clip --model ViT-B-32 \
      --checkpoint open_clip_model.safetensors --out /ckpt/b32
  python -m clip_jax.train --config configs/lit.py:model=ViT-B-32 --workdir /runs/lit_b32 \
      --config.init_from=/ckpt/b32 --config.data.train='/data/cc12m/{00000..01242}.tar'

`init_from` may be an imported OpenCLIP checkpoint or any clip_jax checkpoint/workdir.
Everything under `visual/` gets no update (`optim.freeze`); weight decay and the
schedule apply to the text tower and the logit scale only. Quick CPU try:
`configs/lit.py:model=tiny,steps=200` with the demo data and a demo-trained init.
"""

from clip_jax.config_base import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, model='ViT-B-32', dtype='bfloat16', batch_size=16384, steps=20000)
  c = base_config()
  c.model.name = args.model
  c.model.dtype = args.dtype
  c.batch_size = args.batch_size
  c.total_steps = args.steps
  c.init_from = ''  # required: --config.init_from=CHECKPOINT
  c.optim.freeze = '^visual/'
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 1000
  c.optim.weight_decay = 1e-4
  c.loss.kind = 'softmax'
  # Layers unrolled: the TPU compiler estimates the scanned step 1.3x slower (its per-layer
  # stack slices, bench/RESULTS.md 2026-12-01). The frozen image tower keeps no gradients or
  # optimizer state, so LiT needs less than configs/clip.py's ViT-B-32 step, whose unrolled
  # step takes 10.0 GiB at 256 pairs per v5p chip. Other models or small chips: check with
  # `python -m clip_jax.aot`, and `--config.model.scan_layers=True` halves the activations.
  c.model.scan_layers = False
  c.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}
  return c
