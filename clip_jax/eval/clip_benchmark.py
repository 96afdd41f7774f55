"""Datasets in CLIP_benchmark's webdataset layout (the clip-benchmark/wds_* sets on HF).

  ROOT/classnames.txt                            one class name per line, in label order
  ROOT/zeroshot_classification_templates.txt     one prompt per line, `{c}` for the class
  ROOT/dataset_type.txt                          `retrieval`; absent or `classification`
  ROOT/SPLIT/nshards.txt                         the shard count n
  ROOT/SPLIT/{0..n-1}.tar                        KEY.webp|png|jpg|jpeg + KEY.cls | KEY.txt

As clip_benchmark reads it (`datasets/builder.py: build_wds_dataset`): a sample's image is
its first of webp, png, jpg, jpeg; its label the integer in `.cls`; its captions the lines
of `.txt` (`str.splitlines`). Metrics carry clip_benchmark's names and definitions: acc1,
acc5, mean_per_class_recall (sklearn's balanced accuracy), and image_retrieval_recall@k
(per caption: its image is among the k nearest) and text_retrieval_recall@k (per image: one
of its captions is). A sample clip_benchmark could not read (no image, no label, an image
that does not decode) is skipped here, counted by kind (`eval/skips.py`) and named.
Unlike clip_benchmark, blank lines of classnames.txt and the templates are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from etils import epath

from clip_jax.data.tar_samples import Skip, count_groups, read_groups
from clip_jax.eval import retrieval, skips, zeroshot
from clip_jax.eval.inputs import ImageInput, Row

IMAGE_ORDER = ('webp', 'png', 'jpg', 'jpeg')  # clip_benchmark's to_tuple order
KINDS = ('classification', 'retrieval')


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What `open_dataset` checked before any model is loaded."""
  root: str
  kind: str  # 'classification' or 'retrieval'
  shards: tuple[str, ...]
  classnames: tuple[str, ...] = ()
  templates: tuple[str, ...] = ()  # `{}` in place of `{c}`, as zeroshot formats them


def open_dataset(root: str, split: str = 'test') -> Dataset:
  """The dataset's type, shards, class names and templates; missing files name their path."""
  path = epath.Path(root)
  kind_file = path / 'dataset_type.txt'
  kind = kind_file.read_text().strip().lower() if kind_file.exists() else 'classification'
  if kind not in KINDS:
    raise ValueError(f'{kind_file} says {kind!r}; supported: {", ".join(KINDS)}.')
  nshards_file = path / split / 'nshards.txt'
  if not nshards_file.exists():
    raise FileNotFoundError(f'CLIP_benchmark dataset {root}: {nshards_file} does not exist '
                            f'(split {split!r}).')
  shards = tuple(str(path / split / f'{i}.tar') for i in range(int(nshards_file.read_text())))
  missing = [s for s in shards if not epath.Path(s).exists()]
  if missing:
    raise FileNotFoundError(f'{nshards_file} counts {len(shards)} shards but these do not '
                            f'exist: {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
  if kind == 'retrieval':
    return Dataset(root, kind, shards)
  classnames = zeroshot.read_lines(path / 'classnames.txt', 'CLIP_benchmark class names')
  templates = [t.replace('{c}', '{}') for t in zeroshot.read_lines(
      path / 'zeroshot_classification_templates.txt', 'CLIP_benchmark templates')]
  zeroshot.check_templates(templates, str(path / 'zeroshot_classification_templates.txt'))
  return Dataset(root, kind, shards, tuple(classnames), tuple(templates))


def count(dataset: Dataset) -> int:
  """How many samples the shards hold (tar headers only: no image is read twice)."""
  return sum(count_groups(shard) for shard in dataset.shards)


def examples(dataset: Dataset, inputs: ImageInput, skipped: skips.Skipped,
             part: tuple[int, int] = (0, 1)) -> Iterator[tuple[Row, int | list[str]]]:
  """(image row, label or captions) of every sample, in shard order; `part=(i, n)`: every
  n-th readable sample from the i-th (one process's share).

  Bad samples are skipped and counted into `skipped`: images that do not decode by the
  process that decodes them, the rest (no image, no label or caption, shard problems) by
  part 0 alone, as every process reads every sample's files.
  """
  index, count = part
  readable = (sample for shard in dataset.shards for group in read_groups(shard)
              if (sample := _sample(dataset.kind, shard, group,
                                    skipped if index == 0 else None)) is not None)
  for number, (image, target, where) in enumerate(readable):
    if number % count == index:
      # Full-scale JPEG decoding, as clip_benchmark's PIL: a reduced-scale one (the other
      # evaluators' draft) moved recalls by up to 0.9 point (docs/evaluation.md).
      decoded = skips.decoded(image, None, where, skipped)
      if decoded is not None:
        yield inputs(decoded), target


def _sample(kind: str, shard: str, group: tuple[str, dict[str, bytes]] | Skip,
            skipped: skips.Skipped | None) -> tuple[bytes, int | list[str], str] | None:
  """(image bytes, target, SHARD:KEY) of a key group; None (counted) for a bad sample."""
  if isinstance(group, Skip):
    problem = group.reason, group.where, ''
  else:
    key, files = group
    where = f'{shard}:{key}'
    image = next((files[ext] for ext in IMAGE_ORDER if ext in files), None)
    target = _target(kind, files)
    if isinstance(target, tuple):
      problem = target[0], where, target[1]
    elif image is None:
      problem = 'missing_image', where, f'no {", ".join(IMAGE_ORDER)}'
    else:
      return image, target, where
  if skipped is not None:
    skipped.add(*problem)
  return None


def _target(kind: str, files: dict[str, bytes]) -> int | list[str] | tuple[str, str]:
  """The label (`.cls`) or captions (`.txt` lines), or (skip kind, why) when they are bad."""
  if kind == 'retrieval':
    try:
      captions = files.get('txt', b'').decode('utf-8').splitlines()
    except UnicodeDecodeError as e:
      return 'bad_caption', f'.txt: {e}'
    return captions or ('missing_caption', 'no caption (.txt, one per line)')
  if 'cls' not in files:
    return 'missing_caption', 'no label (.cls)'
  try:
    return int(files['cls'])
  except ValueError:
    return 'bad_caption', f'.cls {files["cls"][:20]!r} is not an integer label'


def classification_metrics(result: dict) -> dict:
  """zeroshot.run's result under clip_benchmark's names (acc5 is None below 5 classes)."""
  return {'acc1': result['top1'], 'acc5': result['top5'] if result['num_classes'] >= 5 else None,
          'mean_per_class_recall': result['mean_per_class_recall'],
          'num_images': result['num_images'], 'num_classes': result['num_classes'],
          'skipped': result.get('skipped', {})}


def retrieval_metrics(result: dict) -> dict:
  """retrieval.recall_at_k's result under clip_benchmark's names: its image retrieval is
  our text->image (per caption, its image among the top k), text retrieval image->text."""
  renamed = {'num_images': result['num_images'], 'num_texts': result['num_texts'],
             'skipped': result['skipped']}
  for k in retrieval.KS:
    renamed[f'image_retrieval_recall@{k}'] = result[f'text_to_image_R@{k}']
    renamed[f'text_retrieval_recall@{k}'] = result[f'image_to_text_R@{k}']
  return renamed
