r"""FLIP: OpenCLIP's CLIP recipe with half the image patches dropped, then an unmasked tail.

  python -m clip_jax.train --config configs/flip.py:model=ViT-B-16 --workdir gs://BUCKET/runs/flip \
      --config.data.train='gs://BUCKET/laion400m/{00000..41455}.tar'

`configs/clip.py`'s recipe for `model` (same args: `batch_size=`, `samples=`, `gpus=`), with
`model.vision.patch_dropout=rate` (default 0.5): each training step keeps a random half of
every image's patch tokens (the class token always), so the image tower runs on 99 instead
of 197 tokens at 224 px and a step costs ~0.5x the image tower's FLOPs (bench/RESULTS.md).
The last `tail` fraction of the steps (default 0.01) keeps every patch
(`patch_dropout_tail_steps`, OpenCLIP's `--force-patch-dropout 0` fine-tune) so the model
meets full images before evaluation; that tail runs a second compiled step. Evaluation,
export and `clip_jax.load` never drop patches. Args:
`configs/flip.py:model=ViT-B-16,rate=0.5,tail=0.01[,batch_size=N][,samples=N][,gpus=N]`
(layers unrolled as in configs/clip.py: dropping patches only lowers the memory).
A different `--config.total_steps` needs its own `--config.patch_dropout_tail_steps`.
Expected: FLIP reports 2-3x faster training than CLIP at similar zero-shot accuracy after
the unmasked tail; not reproduced here (no data).
"""

from clip_jax.config_base import parse_arg
from configs import clip


def get_config(arg=None):
  args = parse_arg(arg, **{**clip.ARGS, 'model': 'ViT-B-16'}, rate=0.5, tail=0.01)
  c = clip.recipe(args.model, args.batch_size, args.samples, args.gpus)
  c.model.vision.patch_dropout = args.rate
  c.patch_dropout_tail_steps = round(c.total_steps * args.tail)
  return c
