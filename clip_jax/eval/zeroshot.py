"""Zero-shot classification: class names x prompt templates -> a text classifier.

Each class's prompts are encoded, L2-normalised, averaged and re-normalised (OpenAI's
recipe); images are classified by cosine similarity, top-1 and top-5. Datasets: an image
folder (one subfolder per class), tar shards whose `.json` carries the class index, or a
TFDS dataset through `tfds.data_source` (array_record, prepared locally).
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image

from clip_jax.data.tar_samples import IMAGE_EXTENSIONS, read_samples
from clip_jax.data.transforms import decode_image, eval_pixels
from clip_jax.models.config import PreprocessConfig

ASSETS = epath.resource_path('clip_jax.eval') / 'assets'
TEMPLATE_SETS = ('openai', 'simple', 'generic')
Example = tuple[np.ndarray, int]


def read_lines(path: str | epath.Path, what: str) -> list[str]:
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{what} file {path} does not exist.')
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_templates(name_or_path: str) -> list[str]:
  """'openai' (80), 'simple' (7), 'generic' (5), or a file with one template per line."""
  if name_or_path in TEMPLATE_SETS:
    templates = read_lines(ASSETS / f'templates_{name_or_path}.txt', 'Templates')
  else:
    templates = read_lines(name_or_path, 'Templates')
  check_templates(templates, name_or_path)
  return templates


def imagenet_classnames() -> list[str]:
  return read_lines(ASSETS / 'imagenet_classnames.txt', 'Class names')


def check_templates(templates: Sequence[str], source: str = 'templates') -> None:
  bad = [t for t in templates if '{}' not in t]
  if bad or not templates:
    raise ValueError(f'Every prompt template in {source} must contain {{}} for the class name; '
                     f'these do not: {bad or "(no templates)"}')


def build_classifier(encode_text: Callable[[np.ndarray], np.ndarray], tokenizer,
                     classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """[num_classes, embed_dim] unit vectors; `encode_text` returns normalised features."""
  check_templates(templates)
  prompts = [t.format(name) for name in classnames for t in templates]
  features = np.asarray(encode_text(tokenizer(prompts))).reshape(
      len(classnames), len(templates), -1)
  mean = features.mean(1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  top5 = np.argsort(-logits, axis=1)[:, :5]
  return {'top1': float((top5[:, 0] == labels).mean()),
          'top5': float((top5 == labels[:, None]).any(1).mean())}


def run(encoder, tokenizer, classnames: Sequence[str], templates: Sequence[str],
        examples: Iterator[Example], total: int | None = None) -> dict[str, float]:
  """Top-1/top-5 of (image, label) examples, with an `eval.encoder.Encoder`."""
  classifier = build_classifier(encoder.texts, tokenizer, classnames, templates)
  features, labels = encoder.image_stream(examples, total, desc='zero-shot')
  result = accuracy(features @ classifier.T, np.asarray(labels))
  return {**result, 'num_images': len(labels), 'num_classes': len(classnames)}


def folder_dataset(folder: str, classnames: Sequence[str] | None = None,
                   classnames_source: str = '--classnames'
                   ) -> tuple[list[str], list[tuple[epath.Path, int]]]:
  """(class names, [(image path, label)]) from one subfolder per class, sorted by name.

  Without `classnames`, folder names (with `_` as space) are the class names.
  """
  root = epath.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f'--image_folder {root} is not a directory.')
  classes = sorted(p for p in root.iterdir() if p.is_dir())
  items = [(path, label) for label, cls in enumerate(classes) for path in sorted(cls.iterdir())
           if path.suffix.lower().lstrip('.') in IMAGE_EXTENSIONS]
  if not items:
    raise ValueError(f'--image_folder {root} holds no images in class subfolders '
                     f'({", ".join(IMAGE_EXTENSIONS)}).')
  if classnames is None:
    return [c.name.replace('_', ' ') for c in classes], items
  if len(classnames) != len(classes):
    raise ValueError(f'{classnames_source} has {len(classnames)} names but {root} has '
                     f'{len(classes)} class folders.')
  return list(classnames), items


def folder_images(items, size: int, preprocess: PreprocessConfig) -> Iterator[Example]:
  for path, label in items:
    with path.open('rb') as f:
      image = decode_image(f.read(), size)
    yield eval_pixels(image, size, preprocess), label


def shard_images(spec: str, size: int, preprocess: PreprocessConfig,
                 label_key: str = 'label') -> Iterator[Example]:
  """Labelled images of tar shards (their `.json` holds `label_key`), in shard order."""
  for sample in read_samples(spec):
    label = json.loads(sample.meta).get(label_key) if sample.meta else None
    if label is not None:
      yield eval_pixels(decode_image(sample.image, size), size, preprocess), int(label)


def tfds_dataset(name: str, split: str, data_dir: str | None, size: int,
                 preprocess: PreprocessConfig) -> tuple[list[str], int, Iterator[Example]]:
  """(class names, length, examples) of a locally prepared TFDS dataset (array_record)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  names = [n.replace('_', ' ') for n in source.dataset_info.features['label'].names]

  def examples():
    for record in source:
      image = Image.fromarray(np.asarray(record['image'])).convert('RGB')
      yield eval_pixels(image, size, preprocess), int(record['label'])

  return names, len(source), examples()
