"""Zero-shot classification: class names x prompt templates -> a text classifier.

Each class's prompts are encoded, L2-normalised, averaged and re-normalised (OpenAI's
recipe); images are classified by cosine similarity. Labelled images come from tar shards
whose `.json` carries the class index (`label_key`), as `make_demo` writes them.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Sequence

import numpy as np

from clip_jax.data.specs import parse_spec
from clip_jax.data.tar_samples import RawSample, read_shard
from clip_jax.data.transforms import decode_image, resize_and_crop
from clip_jax.models.config import PreprocessConfig

SIMPLE_TEMPLATES = ('a photo of a {}.', 'a picture of a {}.', '{}')


def check_templates(templates: Sequence[str]) -> None:
  bad = [t for t in templates if '{}' not in t]
  if bad:
    raise ValueError(f'Prompt templates must contain {{}} for the class name: {bad}')


def build_classifier(encode_text: Callable[[np.ndarray], np.ndarray], tokenizer,
                     classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """[num_classes, embed_dim] unit vectors; `encode_text` returns normalised features."""
  check_templates(templates)
  weights = []
  for name in classnames:
    features = np.asarray(encode_text(tokenizer([t.format(name) for t in templates])))
    mean = features.mean(0)
    weights.append(mean / np.linalg.norm(mean))
  return np.stack(weights)


def labelled_images(spec: str, image_size: int, preprocess: PreprocessConfig,
                    label_key: str = 'label') -> Iterator[tuple[np.ndarray, int]]:
  """(uint8 HWC image with eval resizing, label) for every labelled sample of the shards."""
  for source in parse_spec(spec):
    for shard in source.shards:
      for record in read_shard(shard):
        if not isinstance(record, RawSample) or not record.meta:
          continue
        label = json.loads(record.meta).get(label_key)
        if label is None:
          continue
        image = resize_and_crop(decode_image(record.image, image_size), image_size,
                                preprocess.resize_mode, preprocess.interpolation)
        yield np.asarray(image, np.uint8), int(label)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  top5 = np.argsort(-logits, axis=1)[:, :5]
  return {'top1': float((top5[:, 0] == labels).mean()),
          'top5': float((top5 == labels[:, None]).any(1).mean())}
