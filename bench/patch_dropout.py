"""FLIP patch dropout: the ViT-B-16 image tower's training FLOPs and step time per rate.

  python bench/patch_dropout.py [--model ViT-B-16] [--batch 8] [--rates 0,0.5,0.75] [--steps 3]

For each rate, compiles the image tower's forward + backward (the gradient of a loss on
its embeddings w.r.t. every image-tower parameter, as in a training step) with one
dropout key per image, layers unrolled so that `cost_analysis()` counts every layer, and
reports the compiled FLOPs, the analytic count the trainer's MFU uses and the median wall
time of `--steps` steps on this machine's default device. The rates step in turn, so
load on a shared host hits them all alike.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import clip_jax
from clip_jax.metrics import tower_flops
from clip_jax.models.functional import FunctionalModel


def _shapes_to(fn, shapes):
  return jax.tree.map(fn, shapes, is_leaf=lambda x: isinstance(x, tuple))


class Variant:
  """One rate's compiled image-tower gradient, its inputs and timings."""

  def __init__(self, args, rate):
    self.cfg = clip_jax.get_config(args.model, **{'vision.patch_dropout': rate,
                                                  'scan_layers': False})
    model = FunctionalModel.create(self.cfg)
    # Constant weights: the cost of a step does not depend on their values.
    self.params = _shapes_to(lambda s: jnp.full(s, 0.02, jnp.float32), model.shapes())
    size = self.cfg.vision.image_size
    self.images = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, size, size, 3)),
                              jnp.float32)
    self.keys = jax.random.split(jax.random.key(0), args.batch)

    def loss(visual, params, images, keys):  # differentiated w.r.t. the image tower only
      embeddings = model.bind({**params, 'visual': visual}).encode_image(images, dropout_keys=keys)
      return jnp.square(embeddings).mean()

    self.compiled = jax.jit(jax.grad(loss)).lower(
        self.params['visual'], self.params, self.images, self.keys).compile()
    self.flops = self.compiled.cost_analysis()['flops']
    self.times = []
    jax.block_until_ready(self.run())  # warm-up

  def run(self):
    return self.compiled(self.params['visual'], self.params, self.images, self.keys)

  def time_step(self):
    start = time.perf_counter()
    jax.block_until_ready(self.run())
    self.times.append(time.perf_counter() - start)

  def analytic(self, batch):
    """The trainer's analytic count of the image tower's training FLOPs (x3 forward)."""
    v = self.cfg.vision
    forward = (tower_flops(v.layers, v.kept_patches + int(v.class_token), v.width, v.mlp_dim)
               + 2 * v.grid ** 2 * 3 * v.patch_size ** 2 * v.width)
    return 3 * forward * batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ViT-B-16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rates', default='0,0.5,0.75')
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  rates = [float(r) for r in args.rates.split(',')]
  variants = [Variant(args, rate) for rate in rates]
  for _ in range(args.steps):
    for variant in variants:
      variant.time_step()
  base = variants[0]
  print(f'{args.model} image tower, forward + backward, batch {args.batch}, '
        f'{jax.devices()[0].device_kind}')
  print('| patch_dropout | tokens | compiled GFLOPs | vs r=0 | analytic GFLOPs | step s | vs r=0 |')
  print('|---|---|---|---|---|---|---|')
  for rate, v in zip(rates, variants):
    step = float(np.median(v.times))
    print(f'| {rate} | {v.cfg.vision.kept_patches + int(v.cfg.vision.class_token)} | '
          f'{v.flops / 1e9:.1f} | {v.flops / base.flops:.2f} | {v.analytic(args.batch) / 1e9:.1f} '
          f'| {step:.2f} | {step / float(np.median(base.times)):.2f} |')


if __name__ == '__main__':
  main()
