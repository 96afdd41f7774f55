"""Generates the embedded demo dataset: drawn shapes with captions that describe them.

  python -m clip_jax.data.make_demo --output DIR [--train_samples 20000] [--eval_samples 1000]

Each image holds one or two groups of shapes; a group has a colour, a shape, a size, a
count and a place, and the caption names all of it ("two small red stars at the top and
a large blue circle on the right, on a striped background"). Because images mix groups,
a model must bind each colour to its shape (composition) to score well on the zero-shot
task: classify a single-group image among all colour x shape classes
(`classnames.txt`; eval samples carry their class in `json['label']`).

Layout: DIR/train/NNNNN.tar, DIR/eval/NNNNN.tar (webdataset, like img2dataset writes),
DIR/classnames.txt. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math

import numpy as np
from etils import epath
from PIL import Image, ImageDraw
from tqdm import tqdm

from clip_jax.data.shard_writer import ShardWriter

COLOURS = {'red': (215, 38, 38), 'green': (34, 160, 60), 'blue': (40, 70, 210),
           'yellow': (235, 200, 30), 'purple': (130, 50, 170), 'orange': (240, 130, 20),
           'white': (250, 250, 250), 'black': (20, 20, 20)}
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross')
SIZES = {'small': 0.09, 'large': 0.19}
# Place -> (centre x, centre y, direction in which a group of 2-3 shapes lines up).
PLACES = {'on the left': (0.25, 0.5, 'vertical'), 'on the right': (0.75, 0.5, 'vertical'),
          'at the top': (0.5, 0.25, 'horizontal'), 'at the bottom': (0.5, 0.75, 'horizontal'),
          'in the middle': (0.5, 0.5, 'horizontal')}
PLACE_PAIRS = (('on the left', 'on the right'), ('at the top', 'at the bottom'))
COUNTS = {1: 'a', 2: 'two', 3: 'three'}
BACKGROUNDS = ('plain', 'striped', 'dotted')
PLURALS = {'cross': 'crosses'}
CLASSNAMES = [f'{c} {s}' for c, s in itertools.product(COLOURS, SHAPES)]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == 'triangle':
    return [(cx + r * math.cos(a), cy + r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
  if shape == 'star':
    return [(cx + (r if i % 2 == 0 else r / 2.5) * math.cos(-math.pi / 2 + i * math.pi / 5),
             cy + (r if i % 2 == 0 else r / 2.5) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)]
  w = r / 3  # cross
  return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
          (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
          (cx - r, cy - w), (cx - w, cy - w)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: tuple[int, int, int]) -> None:
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == 'circle':
    draw.ellipse(box, fill=fill)
  elif shape == 'square':
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _background(size: int, kind: str, rng: np.random.Generator) -> Image.Image:
  tone = tuple(int(v) for v in rng.integers(110, 180, 3))
  image = Image.new('RGB', (size, size), tone)
  draw = ImageDraw.Draw(image)
  darker = tuple(max(0, v - 40) for v in tone)
  if kind == 'striped':
    for x in range(0, size, 8):
      draw.rectangle((x, 0, x + 3, size), fill=darker)
  elif kind == 'dotted':
    for x, y in itertools.product(range(4, size, 10), repeat=2):
      draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=darker)
  return image


def _group_phrase(count: int, size: str, colour: str, shape: str, place: str) -> str:
  noun = shape if count == 1 else PLURALS.get(shape, shape + 's')
  return f'{COUNTS[count]} {size} {colour} {noun} {place}'


def draw_group(draw: ImageDraw.ImageDraw, image_size: int, count: int, size_name: str,
               colour: str, shape: str, place: str, rng: np.random.Generator) -> None:
  """`count` equal shapes lined up (without overlap) around the place's centre."""
  radius = SIZES[size_name] * image_size / count ** 0.5
  cx, cy, direction = PLACES[place]
  for k in range(count):
    offset = (k - (count - 1) / 2) * 2.3 * radius
    jitter = rng.normal(0, image_size * 0.01, 2)
    x = cx * image_size + (offset if direction == 'horizontal' else 0) + jitter[0]
    y = cy * image_size + (offset if direction == 'vertical' else 0) + jitter[1]
    draw_shape(draw, shape, x, y, radius, COLOURS[colour])


def draw_sample(rng: np.random.Generator, size: int, groups: int) -> tuple[Image.Image, str, int]:
  """(image, caption, class index of the first group) for 1 or 2 groups of distinct classes.

  Two groups sit on opposite sides (left/right or top/bottom) so they never overlap.
  """
  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  image = _background(size, background, rng)
  draw = ImageDraw.Draw(image)
  classes = rng.choice(len(CLASSNAMES), size=groups, replace=False)
  if groups == 1:
    places = [list(PLACES)[rng.integers(len(PLACES))]]
  else:
    places = list(PLACE_PAIRS[rng.integers(len(PLACE_PAIRS))])
    rng.shuffle(places)
  phrases = []
  for cls, place in zip(classes, places):
    colour, shape = CLASSNAMES[cls].split()
    size_name = list(SIZES)[rng.integers(len(SIZES))]
    count = int(rng.integers(1, 4))
    draw_group(draw, size, count, size_name, colour, shape, place, rng)
    phrases.append(_group_phrase(count, size_name, colour, shape, place))
  caption = ' and '.join(phrases)
  if background != 'plain':
    caption += f', on a {background} background'
  return image, caption, int(classes[0])


def _jpeg(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def make_demo(output: str, train_samples: int = 20000, eval_samples: int = 1000,
              samples_per_shard: int = 2000, image_size: int = 64, seed: int = 0) -> dict:
  """Writes the train split (1-2 groups per image) and the eval split (1 group)."""
  out = epath.Path(output)
  rng = np.random.default_rng(seed)
  stats = {}
  for split, n, max_groups in (('train', train_samples, 2), ('eval', eval_samples, 1)):
    writer = ShardWriter(out / split, samples_per_shard)
    for _ in tqdm(range(n), desc=f'make_demo {split}', unit='img'):
      image, caption, label = draw_sample(rng, image_size, int(rng.integers(1, max_groups + 1)))
      writer.write(_jpeg(image), 'jpg', caption, {'label': label})
    stats[split] = writer.close({'classes': len(CLASSNAMES)})
  (out / 'classnames.txt').write_text('\n'.join(CLASSNAMES) + '\n')
  return stats


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output', required=True)
  parser.add_argument('--train_samples', type=int, default=20000)
  parser.add_argument('--eval_samples', type=int, default=1000)
  parser.add_argument('--samples_per_shard', type=int, default=2000)
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  stats = make_demo(args.output, args.train_samples, args.eval_samples, args.samples_per_shard,
                    args.image_size, args.seed)
  print(f'Wrote {stats["train"]["count"]} train and {stats["eval"]["count"]} eval samples '
        f'({len(CLASSNAMES)} classes) to {args.output}')


if __name__ == '__main__':
  main()
