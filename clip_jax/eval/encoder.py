"""Batched feature extraction sharded over all devices, for every evaluator.

Inputs are padded to a fixed batch (one compile), split over the mesh's batch axes, and
the padding rows are dropped from the outputs, so every example counts exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from clip_jax import sharding
from clip_jax.data.transforms import normalize_on_device
from clip_jax.models.functional import FunctionalModel


class Encoder:
  """Normalised image and text features of a FunctionalModel's params on a mesh."""

  def __init__(self, model: FunctionalModel, params: Any, mesh, batch_size: int = 256):
    dp = sharding.data_parallel_size(mesh)
    self.batch_size = -(-batch_size // dp) * dp  # a multiple of the data-parallel size
    self.params = params
    self._in = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    preprocess = model.cfg.preprocess
    self._image = jax.jit(lambda p, x: model.bind(p).encode_image(
        normalize_on_device(x, preprocess).astype(model.cfg.dtype), normalize=True),
                          out_shardings=replicated)
    self._text = jax.jit(lambda p, t: model.bind(p).encode_text(t, normalize=True),
                         out_shardings=replicated)

  def _run(self, fn, x: np.ndarray) -> np.ndarray:
    n = len(x)
    padded = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(fn(self.params, jax.device_put(padded, self._in)))[:n]

  def _batched(self, fn, data: np.ndarray) -> np.ndarray:
    return np.concatenate([self._run(fn, data[i:i + self.batch_size])
                           for i in range(0, len(data), self.batch_size)])

  def texts(self, tokens: np.ndarray) -> np.ndarray:
    return self._batched(self._text, np.asarray(tokens))

  def images(self, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images (already resized) -> [N, D] features."""
    return self._batched(self._image, np.asarray(images))

  def image_stream(self, examples: Iterable[tuple[np.ndarray, Any]], total: int | None = None,
                   desc: str = 'images') -> tuple[np.ndarray, list]:
    """Features of (image, target) pairs from an iterator, batch by batch, with progress."""
    features, targets = [], []
    batches = None if total is None else -(-total // self.batch_size)
    for images, batch_targets in tqdm(_chunks(examples, self.batch_size), desc=desc, unit='batch',
                                      total=batches):
      features.append(self._run(self._image, np.stack(images)))
      targets.extend(batch_targets)
    if not features:
      raise ValueError('No images to evaluate.')
    return np.concatenate(features), targets


def _chunks(examples, size) -> Iterator[tuple[list, list]]:
  images, targets = [], []
  for image, target in examples:
    images.append(image)
    targets.append(target)
    if len(images) == size:
      yield images, targets
      images, targets = [], []
  if images:
    yield images, targets
