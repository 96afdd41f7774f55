"""Zero-shot demo: a model classifies generated images of coloured shapes by free text.

  python -m clip_jax.demo [--model tiny] [--checkpoint DIR]

Without --checkpoint the model is randomly initialised, so accuracy sits near chance;
the demo shows the whole inference path (preprocess -> encode_image, tokenizer ->
encode_text, cosine similarity -> softmax) that a trained checkpoint runs.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

import clip_jax
from clip_jax.data.transforms import make_preprocess

COLOURS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 80, 220)}
SHAPES = ('circle', 'square')


def draw_shape(colour: str, shape: str, size: int, rng: np.random.Generator) -> Image.Image:
  """One shape of the given colour at a random position and scale on a light background."""
  image = Image.new('RGB', (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
  radius = rng.uniform(0.2, 0.35) * size
  cx, cy = rng.uniform(radius, size - radius, 2)
  box = (cx - radius, cy - radius, cx + radius, cy + radius)
  draw = ImageDraw.Draw(image)
  (draw.ellipse if shape == 'circle' else draw.rectangle)(box, fill=COLOURS[colour])
  return image


def zero_shot(model, preprocess, tokenizer, images: list[Image.Image], labels: list[str]
              ) -> np.ndarray:
  """Class probabilities [images, labels] from prompts 'a photo of a {label}.'."""
  pixels = jnp.asarray(np.stack([preprocess(im) for im in images]))
  tokens = jnp.asarray(tokenizer([f'a photo of a {label}.' for label in labels]))
  image_features = model.encode_image(pixels, normalize=True)
  text_features = model.encode_text(tokens, normalize=True)
  logits = jnp.exp(model.logit_scale[...]) * image_features @ text_features.T
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='tiny', help='preset for a random-init model')
  parser.add_argument('--checkpoint', help='clip_jax checkpoint or workdir to load instead')
  parser.add_argument('--images', type=int, default=12)
  args = parser.parse_args(argv)
  if args.checkpoint:
    model, preprocess, tokenizer = clip_jax.load(args.checkpoint)
  else:
    model = clip_jax.create_model(args.model)
    preprocess = make_preprocess(model.cfg.preprocess, model.cfg.vision.image_size)
    tokenizer = clip_jax.get_tokenizer(args.model)
  labels = [f'{c} {s}' for c, s in itertools.product(COLOURS, SHAPES)]
  rng = np.random.default_rng(0)
  truth = [labels[i % len(labels)] for i in range(args.images)]
  images = [draw_shape(*label.split(), size=96, rng=rng) for label in truth]
  probs = zero_shot(model, preprocess, tokenizer, images, labels)
  print(f'{"image":>5}  {"true label":<14} {"predicted":<14} p(predicted)')
  for i, (label, p) in enumerate(zip(truth, probs)):
    print(f'{i:>5}  {label:<14} {labels[p.argmax()]:<14} {p.max():.3f}')
  accuracy = np.mean([labels[p.argmax()] == t for p, t in zip(probs, truth)])
  print(f'zero-shot top-1: {accuracy:.1%} over {len(labels)} classes '
        f'(chance {1 / len(labels):.1%}; {"trained" if args.checkpoint else "random init"})')


if __name__ == '__main__':
  main()
