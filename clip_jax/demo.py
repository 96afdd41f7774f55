"""Zero-shot demo: a model names the colour and shape in new generated images.

  python -m clip_jax.demo --checkpoint /tmp/clip_demo     # after training configs/demo.py
  python -m clip_jax.demo                                  # a random-init tiny model

Images are drawn like the demo dataset's held-out split (one group of shapes); each is
classified among the 40 colour x shape classes by a zero-shot text classifier. A
random-init model sits near chance (2.5%); the trained demo model is far above it.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import clip_jax
from clip_jax.cli import naming, positive_int, user_errors
from clip_jax.data.make_demo import CLASSNAMES, draw_sample
from clip_jax.data.transforms import make_preprocess
from clip_jax.eval.zeroshot import build_classifier

TEMPLATES = ('a photo of a {}.', 'a {}.')


def zero_shot(model, preprocess, tokenizer, images: list[Image.Image], labels: list[str]
              ) -> np.ndarray:
  """Class probabilities [images, labels] from a zero-shot classifier over the labels."""
  classifier = build_classifier(lambda t: model.encode_text(jnp.asarray(t), normalize=True),
                                tokenizer, labels, TEMPLATES)
  pixels = jnp.asarray(np.stack([preprocess(im) for im in images]))
  image_features = model.encode_image(pixels, normalize=True)
  logits = jnp.exp(model.logit_scale[...]) * image_features @ classifier.T
  return np.asarray(jax.nn.softmax(logits, axis=-1))


@user_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', help='clip_jax checkpoint or training workdir')
  parser.add_argument('--model', default='tiny', help='preset for a random-init model')
  parser.add_argument('--images', type=positive_int, default=12)
  parser.add_argument('--seed', type=int, default=123)
  args = parser.parse_args(argv)
  if args.checkpoint:
    with naming('--checkpoint'):
      model, preprocess, tokenizer = clip_jax.load(args.checkpoint)
  else:
    with naming('--model'):
      model = clip_jax.create_model(args.model)
    preprocess = make_preprocess(model.cfg.preprocess, model.cfg.vision.image_size)
    tokenizer = clip_jax.get_tokenizer(args.model)
  rng = np.random.default_rng(args.seed)
  samples = [draw_sample(rng, 64, groups=1) for _ in range(args.images)]
  probs = zero_shot(model, preprocess, tokenizer, [s[0] for s in samples], CLASSNAMES)
  print(f'{"image":>5}  {"true class":<16} {"predicted":<16} p(predicted)')
  for i, ((_, _, label), p) in enumerate(zip(samples, probs)):
    print(f'{i:>5}  {CLASSNAMES[label]:<16} {CLASSNAMES[p.argmax()]:<16} {p.max():.3f}')
  accuracy = np.mean([p.argmax() == s[2] for p, s in zip(probs, samples)])
  print(f'zero-shot top-1: {accuracy:.1%} over {len(CLASSNAMES)} classes (chance '
        f'{1 / len(CLASSNAMES):.1%}; {"trained" if args.checkpoint else "random init"})')


if __name__ == '__main__':
  main()
