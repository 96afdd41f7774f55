"""Zero-shot classification: class names x prompt templates -> a text classifier.

Each class's prompts are encoded, L2-normalised, averaged and re-normalised (OpenAI's
recipe); images are classified by cosine similarity: top-1, top-5 and the mean per-class
recall. Datasets: an image folder (one subfolder per class), tar shards whose `.json`
carries the class index, or a TFDS dataset through `tfds.data_source` (array_record,
prepared locally).

An image folder's class i is its i-th subfolder in sorted order. A class-names file for it
may list the folder names in any order (matched by name, `_` matching a space), give
`FOLDER<TAB>NAME` lines (the prompt name of each folder), or list other names, which are
then taken by sorted position (and the first pairs are logged so a mismatch shows).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image

from clip_jax.data.tar_samples import IMAGE_EXTENSIONS, read_samples
from clip_jax.data.transforms import decode_image, eval_pixels
from clip_jax.models.config import PreprocessConfig

ASSETS = epath.resource_path('clip_jax.eval') / 'assets'
TEMPLATE_SETS = ('openai', 'simple', 'generic')
Example = tuple[np.ndarray, int]


def read_numbered_lines(path: str | epath.Path, what: str) -> list[tuple[int, str]]:
  """(1-based line number, stripped text) of the file's non-blank lines."""
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{what} file {path} does not exist.')
  return [(number, line.strip()) for number, line in enumerate(path.read_text().splitlines(), 1)
          if line.strip()]


def read_lines(path: str | epath.Path, what: str) -> list[str]:
  return [text for _, text in read_numbered_lines(path, what)]


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
  top1, top5 = correct_counts(logits, labels)
  return {'top1': top1 / len(labels), 'top5': top5 / len(labels),
          'mean_per_class_recall': mean_per_class_recall(logits.argmax(1), labels)}


def mean_per_class_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 of each class present in `labels`, averaged: unlike top-1, an unbalanced
  dataset's big classes do not dominate (sklearn's balanced accuracy, CLIP_benchmark's)."""
  labels = np.asarray(labels)
  return float(np.mean([(predictions[labels == c] == c).mean() for c in np.unique(labels)]))


def correct_counts(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
  """(top-1 hits, top-5 hits): sums that add up across batches and processes."""
  top5 = np.argsort(-logits, axis=1)[:, :5]
  labels = np.asarray(labels)
  return int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(1).sum())


def run(encoder, tokenizer, classnames: Sequence[str], templates: Sequence[str],
        examples: Iterator[Example], total: int | None = None) -> dict[str, float]:
  """Top-1/top-5 of (image, label) examples, with an `eval.encoder.Encoder`."""
  classifier = build_classifier(encoder.texts, tokenizer, classnames, templates)
  features, labels = encoder.image_stream(examples, total, desc='zero-shot')
  result = accuracy(features @ classifier.T, np.asarray(labels))
  return {**result, 'num_images': len(labels), 'num_classes': len(classnames)}


def folder_dataset(folder: str) -> tuple[list[str], list[tuple[epath.Path, int]]]:
  """(class folder names, [(image path, label)]): label i is the i-th folder in sorted order."""
  root = epath.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f'--image_folder {root} is not a directory.')
  classes = sorted(p for p in root.iterdir() if p.is_dir())
  items = [(path, label) for label, cls in enumerate(classes) for path in sorted(cls.iterdir())
           if path.suffix.lower().lstrip('.') in IMAGE_EXTENSIONS]
  if not items:
    raise ValueError(f'--image_folder {root} holds no images in class subfolders '
                     f'({", ".join(IMAGE_EXTENSIONS)}).')
  return [c.name for c in classes], items


def _same_name(text: str) -> str:
  return text.replace('_', ' ')


def folder_classnames(folders: Sequence[str], lines: Sequence[tuple[int, str]] | None,
                      source: str, root: str, show: int = 5) -> list[str]:
  """The prompt name of each class folder (sorted `folders`) from a class-names file.

  `lines` are (line number, text) of the file named by `source` (e.g. '--classnames
  names.txt'), or None: then the folder names, `_` as space. `FOLDER<TAB>NAME` lines map
  folders to names in any order; names that are the folder names in another order are
  matched by name; any other list is taken by sorted position and its first `show` pairs
  are logged.
  """
  if lines is None:
    return [_same_name(f) for f in folders]
  if any('\t' in text for _, text in lines):
    return _tab_classnames(folders, lines, source, root)
  by_name = {_same_name(text): text for _, text in lines}
  if len(by_name) == len(lines) and set(by_name) == {_same_name(f) for f in folders}:
    return [by_name[_same_name(f)] for f in folders]
  if len(lines) != len(folders):
    raise ValueError(f'{source} has {len(lines)} names but {root} has {len(folders)} class '
                     'folders.')
  pairs = ', '.join(f'{f} -> {text!r}' for f, (_, text) in zip(folders[:show], lines))
  logging.warning('%s does not list the folder names of %s, so the i-th name is taken for the '
                  'i-th folder in sorted order: %s%s', source, root, pairs,
                  ', ...' if len(folders) > show else '')
  folder_of = {_same_name(f): f for f in folders}
  crossed = [f'line {number} {text!r} is the name of folder {folder_of[_same_name(text)]!r} '
             f'but names folder {folder!r}' for folder, (number, text) in zip(folders, lines)
             if _same_name(text) in folder_of and _same_name(text) != _same_name(folder)]
  if crossed:
    logging.warning('%s: %s. List every folder name once (any order) to match by name, or '
                    'write FOLDER<TAB>NAME lines.', source, '; '.join(crossed[:show]))
  return [text for _, text in lines]


def _tab_classnames(folders: Sequence[str], lines: Sequence[tuple[int, str]], source: str,
                    root: str) -> list[str]:
  names: dict[str, str] = {}
  named_on: dict[str, int] = {}
  for number, text in lines:
    folder, _, name = text.partition('\t')
    folder, name = folder.strip(), name.strip()
    if not folder or not name:
      raise ValueError(f'{source} line {number}: expected FOLDER<TAB>NAME (the file has TAB '
                       f'lines), got {text!r}.')
    if folder not in folders:
      raise ValueError(f'{source} line {number}: {folder!r} is not a class folder of {root}.')
    if folder in names:
      raise ValueError(f'{source} line {number}: folder {folder!r} is already named on line '
                       f'{named_on[folder]}.')
    names[folder], named_on[folder] = name, number
  missing = [f for f in folders if f not in names]
  if missing:
    raise ValueError(f'{source} names no class for folder(s) '
                     f'{", ".join(map(repr, missing[:10]))} of {root}'
                     f'{f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""}.')
  return [names[f] for f in folders]


def label_classnames(lines: Sequence[tuple[int, str]], source: str) -> list[str]:
  """Class names in label order (tar shards): one plain name per line, no TAB form."""
  for number, text in lines:
    if '\t' in text:
      raise ValueError(f'{source} line {number}: FOLDER<TAB>NAME lines are for --image_folder; '
                       'labelled shards need one class name per line, in label order.')
  return [text for _, text in lines]


def folder_images(items, size: int, preprocess: PreprocessConfig) -> Iterator[Example]:
  for path, label in items:
    with path.open('rb') as f:
      image = decode_image(f.read(), size)
    yield eval_pixels(image, size, preprocess), label


def shard_images(spec: str, size: int, preprocess: PreprocessConfig,
                 label_key: str = 'label', part: tuple[int, int] = (0, 1)) -> Iterator[Example]:
  """Labelled images of tar shards (their `.json` holds `label_key`), in shard order.

  `part=(i, n)` decodes only every n-th labelled image from the i-th (one process's share).
  """
  index, count = part
  for number, (sample, label) in enumerate(_labelled(spec, label_key)):
    if number % count == index:
      yield eval_pixels(decode_image(sample.image, size), size, preprocess), label


def count_labelled(spec: str, label_key: str = 'label') -> int:
  """How many labelled samples the shards hold (reads the tars, decodes no image)."""
  return sum(1 for _ in _labelled(spec, label_key))


def _labelled(spec: str, label_key: str):
  for sample in read_samples(spec):
    label = json.loads(sample.meta).get(label_key) if sample.meta else None
    if label is not None:
      yield sample, int(label)


def tfds_dataset(name: str, split: str, data_dir: str | None, size: int,
                 preprocess: PreprocessConfig) -> tuple[list[str], int, Iterator[Example]]:
  """(class names, length, examples) of a locally prepared TFDS dataset (array_record)."""
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  names = [n.replace('_', ' ') for n in source.dataset_info.features['label'].names]

  def examples():
    for record in source:
      image = Image.fromarray(np.asarray(record['image'])).convert('RGB')
      yield eval_pixels(image, size, preprocess), int(record['label'])

  return names, len(source), examples()
