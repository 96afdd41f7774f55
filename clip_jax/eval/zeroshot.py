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
Labelled shards need a class name for their largest label (`labelled_shards`, checked
before any model is loaded). Images that do not decode and `.json` files that are not
objects are skipped and counted (`eval/skips.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image

from clip_jax import distributed
from clip_jax.data.tar_samples import IMAGE_EXTENSIONS, RawSample
from clip_jax.eval import skips
from clip_jax.eval.inputs import ImageInput, Row

ASSETS = epath.resource_path('clip_jax.eval') / 'assets'
TEMPLATE_SETS = ('openai', 'simple', 'generic')
Example = tuple[Row, int]


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


def class_counts(logits: np.ndarray, labels: Sequence[int]) -> np.ndarray:
  """[3, classes] per-class counts of (images, top-1 hits, top-5 hits): sums that add up
  across batches and processes, and give the mean per-class recall too."""
  truth = np.asarray(labels, np.int64)
  classes = logits.shape[1]
  if len(truth) and truth.max() >= classes:
    raise ValueError(f'label {truth.max()} has no class name: there are {classes} names, one '
                     'per label in label order.')
  top5 = np.argsort(-logits, axis=1)[:, :5]
  hits = [np.ones(len(truth), bool), top5[:, 0] == truth, (top5 == truth[:, None]).any(1)]
  return np.stack([np.bincount(truth, h, classes) for h in hits]).astype(np.int64)


def scores(counts: np.ndarray) -> dict[str, float]:
  """Top-1, top-5 and the mean per-class recall from `class_counts`.

  The mean per-class recall is each present class's top-1 averaged: unlike top-1, an
  unbalanced dataset's big classes do not dominate (sklearn's balanced accuracy,
  CLIP_benchmark's)."""
  images, top1, top5 = counts
  total = int(images.sum())
  if not total:
    raise ValueError('No images to evaluate (every sample was skipped).')
  present = images > 0
  return {'top1': float(top1.sum() / total), 'top5': float(top5.sum() / total),
          'mean_per_class_recall': float(np.mean(top1[present] / images[present])),
          'num_images': total, 'num_classes': len(images)}


def accuracy(logits: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
  return scores(class_counts(logits, labels))


def run(encoder, tokenizer, classnames: Sequence[str], templates: Sequence[str],
        examples: Iterable[Example], most: int | None = None,
        skipped: skips.Skipped | None = None) -> dict:
  """Top-1/top-5 of this process's (image, label) examples, with an `eval.encoder.Encoder`.

  Streamed: each batch's images are decoded, encoded and reduced to per-class counts, which
  are summed over processes (each passes its own share: `part` of the example readers);
  `most` is the largest share (see `Encoder.local_image_batches`). The CLI and the trainer's
  periodic evaluation both score through here. `skipped`: the readers' skip counts, summed
  into the result.
  """
  classifier = build_classifier(encoder.texts, tokenizer, classnames, templates)
  counts = np.zeros((3, len(classnames)), np.int64)
  for features, labels in encoder.local_image_batches(examples, most, desc='zero-shot'):
    counts += class_counts(features @ classifier.T, labels)
  summed = distributed.sum_over_processes(counts.ravel()).reshape(counts.shape)
  return {**scores(summed), 'skipped': (skipped or skips.Skipped()).summed()}


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


def folder_images(items: Sequence[tuple[epath.Path, int]], inputs: ImageInput,
                  skipped: skips.Skipped, part: tuple[int, int] = (0, 1)) -> Iterator[Example]:
  """(image row, label) of `folder_dataset`'s items; `part=(i, n)`: every n-th from the i-th.

  A file that does not read or decode is skipped, counted as `bad_image` and named."""
  index, count = part
  for path, label in items[index::count]:
    try:
      data = path.read_bytes()
    except OSError as e:
      skipped.add('bad_image', str(path), e)
      continue
    image = skips.decoded(data, inputs.decode_size, str(path), skipped)
    if image is not None:
      yield inputs(image), label


def shard_images(spec: str, inputs: ImageInput, label_key: str = 'label',
                 part: tuple[int, int] = (0, 1), skipped: skips.Skipped | None = None
                 ) -> Iterator[Example]:
  """Labelled image rows of tar shards (their `.json` holds `label_key`), in shard order.

  `part=(i, n)` decodes only every n-th labelled image from the i-th (one process's share).
  Bad samples are counted into `skipped`: images that do not decode by the process that
  decodes them, the rest (shard problems, a `.json` that is no object, a bad label) by
  part 0 alone, as every process reads every `.json`.
  """
  index, count = part
  skipped = skipped if skipped is not None else skips.Skipped()
  for number, (sample, label) in enumerate(_labelled(spec, label_key,
                                                     skipped if index == 0 else None)):
    if number % count == index:
      where = f'{sample.shard}:{sample.key}'
      image = skips.decoded(sample.image, inputs.decode_size, where, skipped)
      if image is not None:
        yield inputs(image), label


@dataclasses.dataclass(frozen=True)
class Labels:
  """What a pass over labelled shards found, before any image is decoded or model loaded."""
  count: int  # labelled samples
  largest: int = -1  # the largest label, -1 for none
  largest_in: str = ''  # SHARD:KEY of its first sample


def scan_labels(spec: str, label_key: str = 'label') -> Labels:
  """The labelled sample count and largest label of the shards (reads the tars' files)."""
  count, largest, where = 0, -1, ''
  for sample, label in _labelled(spec, label_key, None):
    count += 1
    if label > largest:
      largest, where = label, f'{sample.shard}:{sample.key}'
  return Labels(count, largest, where)


def labelled_shards(spec: str, spec_source: str, classnames: Sequence[str],
                    names_source: str) -> Labels:
  """`scan_labels` of shards named by `spec_source` (a flag or key), checked before any model
  is loaded or compiled: some labelled sample, and a class name for the largest label (the
  images of a label without a name could never be classified right, and the accuracy would
  look like a poor result)."""
  try:
    labels = scan_labels(spec)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{spec_source}: {e}') from e
  if not labels.count:
    raise ValueError(f'{spec_source}={spec!r} holds no labelled sample (a .json with "label").')
  if labels.largest >= len(classnames):
    raise ValueError(f'{names_source} has {len(classnames)} class names but label '
                     f'{labels.largest} (in {labels.largest_in}) needs at least '
                     f'{labels.largest + 1}: one name per label, in label order.')
  return labels


def _labelled(spec: str, label_key: str, skipped: skips.Skipped | None
              ) -> Iterator[tuple[RawSample, int]]:
  """(sample, label) of the samples whose `.json` has `label_key`; others with a `.json` that
  is not an object or a label that is not a class index are counted (`skipped`)."""
  for sample in skips.samples(spec, skipped):
    where = f'{sample.shard}:{sample.key}'
    meta = skips.json_object(sample.meta, where, skipped) if sample.meta else None
    label = meta.get(label_key) if meta else None
    if label is None:
      continue
    if isinstance(label, bool) or not (isinstance(label, int) or str(label).isdigit()) \
        or int(label) < 0:
      if skipped is not None:
        skipped.add('bad_caption', where, f'{label_key} {label!r} is not a class index')
      continue
    yield sample, int(label)


def tfds_dataset(name: str, split: str, data_dir: str | None, inputs: ImageInput,
                 part: tuple[int, int] = (0, 1)) -> tuple[list[str], int, Iterator[Example]]:
  """(class names, length, examples) of a locally prepared TFDS dataset (array_record);
  `part=(i, n)`: the examples are every n-th from the i-th."""
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  names = [n.replace('_', ' ') for n in source.dataset_info.features['label'].names]

  def examples():
    for number in range(part[0], len(source), part[1]):
      record = source[number]
      image = Image.fromarray(np.asarray(record['image'])).convert('RGB')
      yield inputs(image), int(record['label'])

  return names, len(source), examples()
