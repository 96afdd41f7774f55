"""Generates the embedded demo dataset: drawn shapes with captions that describe them.

  python -m clip_jax.data.make_demo --output DIR [--train_samples 20000] [--eval_samples 1000]

Each image holds one or two groups of shapes; a group has a colour, a shape, a size, a
count and a place. Captions name them at varying detail: half of them only the classes
("red star and blue circle"); the others the count, colour and shape of each group and,
each with probability 0.3, the size, the place and the background ("two small red stars
at the top and a large blue circle on the right, on a striped background"). Captions thus
often differ in colour and shape alone, so contrastive training has to learn both, and
since 20% of the train images mix two groups, to bind each colour to its shape. The
zero-shot task: classify a held-out single-group image among all 40 colour x shape
classes (`classnames.txt`; eval samples carry their class in `json['label']`). Every
sample's json also lists its groups under `objects` (box, phrase, class), the boxes and
phrases LocCa's referring and grounded tasks train on (docs/data.md, 'LocCa data').

Layout: DIR/train/NNNNN.tar, DIR/eval/NNNNN.tar (webdataset, like img2dataset writes),
DIR/classnames.txt. Byte-identical for a given --seed; the two splits draw from separate
random streams.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import pathlib
import shutil
import uuid
from typing import NamedTuple

import numpy as np
from etils import epath
from PIL import Image, ImageDraw
from tqdm import tqdm

from clip_jax.cli import positive_int, user_errors
from clip_jax.data.shard_writer import ShardWriter

COLOURS = {'red': (215, 38, 38), 'green': (34, 160, 60), 'blue': (40, 70, 210),
           'yellow': (235, 200, 30), 'purple': (130, 50, 170), 'orange': (240, 130, 20),
           'white': (250, 250, 250), 'black': (20, 20, 20)}
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross')
# Radius of a lone shape, relative to the image side (a group of n shapes: / sqrt(n)); on a
# wide or tall canvas, to the side of the square of the same area, at most MAX_RADIUS of its
# shorter side.
SIZES = {'small': 0.16, 'large': 0.25}
MAX_RADIUS = 0.4
SPACING = 2.3  # centre distance of neighbouring shapes in a group, in radii
STAR_INNER = 0.5  # inner radius of a star's points, relative to the outer one
BARE = 0.5  # probability that a caption names only colour and shape ('red star')
DETAIL = 0.3  # otherwise, probability that it names the size, the place, the background
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
    radii = [r if i % 2 == 0 else r * STAR_INNER for i in range(10)]
    return [(cx + radii[i] * math.cos(-math.pi / 2 + i * math.pi / 5),
             cy + radii[i] * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
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


def _background(width: int, height: int, kind: str, rng: np.random.Generator) -> Image.Image:
  tone = tuple(int(v) for v in rng.integers(110, 180, 3))
  image = Image.new('RGB', (width, height), tone)
  draw = ImageDraw.Draw(image)
  darker = tuple(max(0, v - 40) for v in tone)
  if kind == 'striped':
    for x in range(0, width, 8):
      draw.rectangle((x, 0, x + 3, height), fill=darker)
  elif kind == 'dotted':
    for x, y in itertools.product(range(4, width, 10), range(4, height, 10)):
      draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=darker)
  return image


def _group_phrase(count: int, size: str, colour: str, shape: str, place: str) -> str:
  """'two small red stars at the top'; an empty size or place is left out."""
  noun = shape if count == 1 else PLURALS.get(shape, shape + 's')
  return ' '.join(w for w in (COUNTS[count], size, colour, noun, place) if w)


def shape_bounds(shape: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
  """(x0, y0, x1, y1) in pixels of the shape `draw_shape` draws: its box or its polygon's."""
  if shape in ('circle', 'square'):
    return cx - r, cy - r, cx + r, cy + r
  xs, ys = zip(*_polygon(shape, cx, cy, r))
  return min(xs), min(ys), max(xs), max(ys)


def draw_group(draw: ImageDraw.ImageDraw, canvas: tuple[int, int], count: int, size_name: str,
               colour: str, shape: str, place: str, rng: np.random.Generator
               ) -> tuple[float, float, float, float]:
  """`count` equal shapes lined up (without overlap) around the place's centre on a
  (width, height) canvas; returns the box (x0, y0, x1, y1, pixels) that covers them all,
  from the drawn geometry. Shapes have the same size in pixels on every canvas of the same
  area (see SIZES); on a wide or tall one they line up along its long side."""
  width, height = canvas
  side = min(width, height)
  radius = min(SIZES[size_name] * (width * height) ** 0.5, MAX_RADIUS * side) / count ** 0.5
  cx, cy, direction = PLACES[place]
  if width != height:
    direction = 'horizontal' if width > height else 'vertical'
  bounds = []
  for k in range(count):
    offset = (k - (count - 1) / 2) * SPACING * radius
    jitter = rng.normal(0, side * 0.01, 2)
    x = cx * width + (offset if direction == 'horizontal' else 0) + jitter[0]
    y = cy * height + (offset if direction == 'vertical' else 0) + jitter[1]
    draw_shape(draw, shape, x, y, radius, COLOURS[colour])
    bounds.append(shape_bounds(shape, x, y, radius))
  x0s, y0s, x1s, y1s = zip(*bounds)
  return min(x0s), min(y0s), max(x1s), max(y1s)


def _object(bounds: tuple[float, ...], canvas: tuple[int, int], count: int, colour: str,
            shape: str) -> dict:
  """A group as the json `objects` entry LocCa trains on (docs/data.md, 'LocCa data'): its
  box normalised to [0, 1] (clipped to the image), 'two red stars', 'red star'."""
  box = [round(min(max(float(v) / canvas[i % 2], 0.0), 1.0), 4) for i, v in enumerate(bounds)]
  return {'box': box, 'phrase': _group_phrase(count, '', colour, shape, ''),
          'class': f'{colour} {shape}'}


class Scene(NamedTuple):
  image: Image.Image
  caption: str
  label: int          # class index of the first group
  objects: list[dict]  # one `_object` per group


def draw_scene(rng: np.random.Generator, size: int, groups: int,
               canvas: tuple[int, int] | None = None) -> Scene:
  """A sample of 1 or 2 groups of distinct classes, with each group's box and phrase, on a
  size x size image or a (width, height) `canvas`.

  Two groups sit on opposite sides (left/right or top/bottom) so they never overlap.
  """
  canvas = canvas or (size, size)
  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  image = _background(*canvas, background, rng)
  draw = ImageDraw.Draw(image)
  classes = rng.choice(len(CLASSNAMES), size=groups, replace=False)
  names, pairs = _places(*canvas)
  if groups == 1:
    places = [names[rng.integers(len(names))]]
  else:
    places = list(pairs[rng.integers(len(pairs))])
    rng.shuffle(places)
  drawn, objects = [], []
  for cls, place in zip(classes, places):
    colour, shape = CLASSNAMES[cls].split()
    size_name = list(SIZES)[rng.integers(len(SIZES))]
    count = int(rng.integers(1, 4))
    bounds = draw_group(draw, canvas, count, size_name, colour, shape, place, rng)
    drawn.append((count, size_name, colour, shape, place))
    objects.append(_object(bounds, canvas, count, colour, shape))
  # With probability BARE the caption is just the class names ('red star and blue circle'),
  # whatever the counts; otherwise count, colour and shape are always named and size, place
  # and background each with probability DETAIL. Either way captions often differ in
  # colour and shape alone, which is what the zero-shot task asks for.
  bare, say_size, say_place, say_background = rng.random(4) < (BARE, DETAIL, DETAIL, DETAIL)
  if bare:
    caption = ' and '.join(f'{colour} {shape}' for _, _, colour, shape, _ in drawn)
  else:
    caption = ' and '.join(_group_phrase(count, size_name if say_size else '', colour, shape,
                                         place if say_place else '')
                           for count, size_name, colour, shape, place in drawn)
    if background != 'plain' and say_background:
      caption += f', on a {background} background'
  return Scene(image, caption, int(classes[0]), objects)


def _places(width: int, height: int) -> tuple[list[str], tuple[tuple[str, str], ...]]:
  """The places (and pairs of places) a group may take: all on a square canvas, those along
  the long side of a wide or tall one (there is no room above a group on a 4:1 strip)."""
  if width == height:
    return list(PLACES), PLACE_PAIRS
  pair = PLACE_PAIRS[0] if width > height else PLACE_PAIRS[1]
  return [*pair, 'in the middle'], (pair,)


def draw_sample(rng: np.random.Generator, size: int, groups: int) -> tuple[Image.Image, str, int]:
  """(image, caption, class index of the first group): `draw_scene` without the boxes."""
  return draw_scene(rng, size, groups)[:3]


def _jpeg(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def canvas_of(image_size: int, aspect: float) -> tuple[int, int]:
  """(width, height) of a canvas with `aspect` = width / height and image_size² pixels."""
  return max(1, round(image_size * aspect ** 0.5)), max(1, round(image_size / aspect ** 0.5))


def make_demo(output: str, train_samples: int = 20000, eval_samples: int = 1000,
              samples_per_shard: int = 2000, image_size: int = 64, seed: int = 0,
              single_fraction: float = 0.8, aspects: tuple[float, ...] = (1.0,)) -> dict:
  """Writes the train split (1-2 groups per image) and the eval split (1 group).

  `single_fraction` of the train images hold one group, the rest two. The splits draw
  from independent random streams (spawned from `seed`), so eval images are held out.
  `aspects`: canvas width / height ratios drawn per image (NaFlex's demo: wide and tall
  canvases of image_size² pixels); with the default square canvas nothing extra is drawn,
  so the square dataset stays byte for byte what it was.
  """
  out = epath.Path(output)
  train_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
  stats = {}
  for split, n, rng, single in (('train', train_samples, train_rng, single_fraction),
                                ('eval', eval_samples, eval_rng, 1.0)):
    writer = ShardWriter(out / split, samples_per_shard)
    for _ in tqdm(range(n), desc=f'make_demo {split}', unit='img'):
      groups = 1 if rng.random() < single else 2
      aspect = aspects[rng.integers(len(aspects))] if len(aspects) > 1 else aspects[0]
      scene = draw_scene(rng, image_size, groups, canvas_of(image_size, aspect))
      writer.write(_jpeg(scene.image), 'jpg', scene.caption,
                   {'label': scene.label, 'objects': scene.objects})
    stats[split] = writer.close({'classes': len(CLASSNAMES)})
  (out / 'classnames.txt').write_text('\n'.join(CLASSNAMES) + '\n')
  return stats


def ensure_demo(data_dir: str, **make_demo_args) -> None:
  """Generates the demo dataset into `data_dir` unless it is already there.

  Safe when several processes (a multi-process launch) call it at once: each one that finds
  no `classnames.txt` (written last) generates into a temporary sibling directory and
  renames it into place in one step; when another process's rename won, its own copy is
  discarded. Nobody sees a half-written dataset. `make_demo_args` go to `make_demo`.
  """
  out = pathlib.Path(data_dir).expanduser()
  if (out / 'classnames.txt').exists():
    return
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f'.{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    make_demo(str(tmp), **make_demo_args)
    try:
      os.rename(tmp, out)  # atomic; also replaces an empty directory at `out`
    except OSError as e:  # `out` exists and is not empty: another process finished first
      if not (out / 'classnames.txt').exists():
        raise RuntimeError(f'{out} exists but holds no complete demo dataset (no '
                           'classnames.txt); delete it and run again.') from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@user_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output', required=True)
  parser.add_argument('--train_samples', type=int, default=20000)
  parser.add_argument('--eval_samples', type=int, default=1000)
  parser.add_argument('--samples_per_shard', type=positive_int, default=2000)
  parser.add_argument('--image_size', type=positive_int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--single_fraction', type=float, default=0.8,
                      help='fraction of train images with one group (the others have two)')
  args = parser.parse_args(argv)
  stats = make_demo(args.output, args.train_samples, args.eval_samples, args.samples_per_shard,
                    args.image_size, args.seed, args.single_fraction)
  print(f'Wrote {stats["train"]["count"]} train and {stats["eval"]["count"]} eval samples '
        f'({len(CLASSNAMES)} classes) to {args.output}')


if __name__ == '__main__':
  main()
