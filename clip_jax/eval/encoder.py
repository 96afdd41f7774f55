"""Batched feature extraction sharded over all devices, for every evaluator.

Inputs are padded to a fixed batch (one compile), split over the mesh's batch axes, and
the padding rows are dropped from the outputs, so every example counts exactly once.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from clip_jax import sharding
from clip_jax.data.transforms import images_of
from clip_jax.eval.inputs import ImageInput, Row
from clip_jax.models.functional import FunctionalModel


class Encoder:
  """Normalised image and text features of a FunctionalModel's params on a mesh; images
  arrive as `inputs`' rows (default: the model's square eval images)."""

  def __init__(self, model: FunctionalModel, params: Any, mesh, batch_size: int = 256,
               inputs: ImageInput | None = None):
    dp = sharding.data_parallel_size(mesh)
    self.batch_size = -(-batch_size // dp) * dp  # a multiple of the data-parallel size
    self.params = params
    self.inputs = inputs or ImageInput.of(model.cfg)
    self._mesh = mesh
    self._in = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    self._image = jax.jit(lambda p, batch: model.bind(p).encode_image(
        images_of(batch, model.cfg), normalize=True), out_shardings=self._in)
    text = lambda p, t: model.bind(p).encode_text(t, normalize=True)
    self._text = jax.jit(text, out_shardings=replicated)
    self._local_text = jax.jit(text, out_shardings=self._in)

  def _run(self, fn, x: np.ndarray) -> np.ndarray:
    """`fn` on rows `x` (the same on every process) padded to a batch; replicated output."""
    n = len(x)
    padded = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(fn(self.params, jax.device_put(padded, self._in)))[:n]

  def texts(self, tokens: np.ndarray) -> np.ndarray:
    """[N, D] features of token rows (every process passes the same rows)."""
    tokens = np.asarray(tokens)
    return np.concatenate([self._run(self._text, tokens[i:i + self.batch_size])
                           for i in range(0, len(tokens), self.batch_size)])

  def _local(self, fn, batch: Any, rows: int) -> np.ndarray:
    """`fn` on this process's `batch` (a pytree of `batch_size / process_count` rows, the
    first `rows` real, the rest zero padding).

    A collective: every process calls it at the same step, with its own rows (possibly
    none), and gets back the features of those rows only.
    """
    arrays = jax.tree.map(lambda x: jax.make_array_from_process_local_data(self._in, x), batch)
    features = fn(self.params, arrays)
    local = multihost_utils.global_array_to_host_local_array(features, self._mesh, self._in.spec)
    return np.asarray(local)[:rows]

  def local_images(self, rows: list[Row]) -> np.ndarray:
    """[n, D] features of this process's image rows (`self.inputs`'s; a collective, see
    `_local`)."""
    return self._local(self._image, self.inputs.batch(rows, self._local_rows), len(rows))

  def local_texts(self, tokens: np.ndarray) -> np.ndarray:
    """[n, D] features of this process's token rows (a collective, see `_local`)."""
    batch = np.zeros((self._local_rows, *tokens.shape[1:]), tokens.dtype)
    batch[:len(tokens)] = tokens
    return self._local(self._local_text, batch, len(tokens))

  @property
  def _local_rows(self) -> int:
    return self.batch_size // jax.process_count()

  def local_image_batches(self, examples: Iterable[tuple[Row, Any]],
                          most: int | None = None, desc: str = 'images'
                          ) -> Iterator[tuple[np.ndarray, list]]:
    """(features, targets) of this process's (image row, target) pairs, batch by batch.

    Each process feeds its own examples (`batch_size / process_count` rows per batch, zero
    padded) and gets back the features of those rows only, so no process decodes or holds
    more than a batch of images. `most` is the largest example count of any process: every
    process runs the same number of batches, as the collective program requires (padded
    with empty ones). `None`: as many batches as the examples fill, for one process or
    processes that all pass the same examples.
    """
    local = self.batch_size // jax.process_count()
    examples = iter(examples)
    chunks: Iterable[tuple[list, list]] = _chunks(examples, local)
    steps = None if most is None else -(-most // local)
    if steps is not None:
      chunks = itertools.islice(itertools.chain(chunks, itertools.repeat(([], []))), steps)
    for images, targets in tqdm(chunks, total=steps, desc=desc, unit='batch',
                                disable=jax.process_index() != 0):
      yield self.local_images(images), targets
    # A last batch filled exactly leaves the reader before the records after its last
    # example (a sample with no caption, a truncated shard's end): read them, so that the
    # reader counts their skips. They hold no example (`most` counts every one).
    collections.deque(examples, maxlen=0)

  def image_stream(self, examples: Iterable[tuple[Row, Any]], total: int | None = None,
                   desc: str = 'images') -> tuple[np.ndarray, list]:
    """Features of (image row, target) pairs from an iterator, batch by batch, with progress.

    Every process passes the same examples and gets all their features; only the features
    (not the images) of all examples are held. `total`: the example count, when known.
    """
    batches = list(self.local_image_batches(examples, total, desc))
    if not any(targets for _, targets in batches):
      raise ValueError('No images to evaluate.')
    return (np.concatenate([f for f, _ in batches]),
            [t for _, targets in batches for t in targets])


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
