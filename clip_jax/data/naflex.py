"""NaFlex preprocessing on the host: each image at its own aspect ratio, as patches, in
batches whose sequence length varies and whose size follows it (a token budget).

An image is resized, keeping its aspect ratio, to the largest grid of whole patches that
fits the sequence length (SigLIP 2's rule as timm's `get_image_size_for_seq` applies it:
both sides scaled by one factor, each rounded up to whole patches, at least one patch),
cut into patches in row-major order ((row, column, channel) within a patch, uint8) and
padded to the sequence length: the arrays of `models.naflex.NaFlexPatches`, normalised on
device as the square path's pixels are.

`NaFlexBatches` draws each batch's sequence length from the seed and the batch's global
index, and takes as many examples as the token budget allows at that length (rounded down
to the batch's divisor): every step does about the same work, one compiled step per
length. Its state is its parent's plus its batch count, so a restored pipeline gives the
same lengths and batches, worker processes included.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from clip_jax.data.transforms import _RESAMPLE


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _largest(fits, limit: int) -> int:
  """The largest k in [0, limit] with fits(k); fits is monotone and fits(0) holds."""
  low, high = 0, limit
  while low < high:
    mid = (low + high + 1) // 2
    low, high = (mid, high) if fits(mid) else (low, mid - 1)
  return low


def grid_for_sequence(height: int, width: int, patch: int, seq_len: int) -> tuple[int, int]:
  """(rows, columns) of patches for an image of height x width px at `seq_len` tokens.

  At scale r the grid is (ceil(r h / p), ceil(r w / p)), each at least 1; the largest r
  whose grid fits seq_len is a step of one side: r = k p / h (exactly k rows) or k p / w
  (k columns). Each side's largest fitting k is found by bisection in integers (timm
  bisects on r in floats), and the larger of the two grids is the answer. (`patch` only
  checks: the grid depends on the aspect ratio alone.)
  """
  if min(height, width, patch, seq_len) < 1:
    raise ValueError(f'grid_for_sequence needs positive sizes, got {height}x{width} px, '
                     f'patch {patch}, seq_len {seq_len}')
  by_rows = lambda k: (k, max(1, _ceil_div(width * k, height)))
  by_cols = lambda k: (max(1, _ceil_div(height * k, width)), k)
  grids = []
  for grid in (by_rows, by_cols):
    k = _largest(lambda k, grid=grid: math.prod(grid(k)) <= seq_len, seq_len)
    if k:
      grids.append(grid(k))
  return max(grids)


def resize_to_sequence(image: Image.Image, patch: int, seq_len: int,
                       interpolation: str = 'bicubic') -> Image.Image:
  """`image` resized (aspect ratio kept, up or down) to its grid at `seq_len`, RGB."""
  rows, cols = grid_for_sequence(image.height, image.width, patch, seq_len)
  return image.convert('RGB').resize((cols * patch, rows * patch), _RESAMPLE[interpolation])


def patchify(pixels: np.ndarray, patch: int, seq_len: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """[rows*p, cols*p, 3] pixels -> (patches [seq_len, p*p*3], coords [seq_len, 2] int32
  (row, column), valid [seq_len] bool): row-major patches, then zero padding."""
  rows, cols = pixels.shape[0] // patch, pixels.shape[1] // patch
  if (rows * patch, cols * patch) != pixels.shape[:2] or rows * cols > seq_len:
    raise ValueError(f'patchify: {pixels.shape[0]}x{pixels.shape[1]} px is not a grid of '
                     f'whole {patch} px patches of at most {seq_len}')
  n = rows * cols
  patches = np.zeros((seq_len, patch * patch * pixels.shape[2]), pixels.dtype)
  patches[:n] = (pixels.reshape(rows, patch, cols, patch, -1).transpose(0, 2, 1, 3, 4)
                 .reshape(n, -1))
  coords = np.zeros((seq_len, 2), np.int32)
  coords[:n] = np.stack(np.divmod(np.arange(n), cols), axis=1)
  valid = np.arange(seq_len) < n
  return patches, coords, valid


def naflex_patches(image: Image.Image, patch: int, seq_len: int, interpolation: str = 'bicubic'
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """An image -> its uint8 NaFlex arrays at `seq_len` (resize_to_sequence, then patchify)."""
  pixels = np.asarray(resize_to_sequence(image, patch, seq_len, interpolation), np.uint8)
  return patchify(pixels, patch, seq_len)


@dataclasses.dataclass(frozen=True)
class NaFlexBatching:
  """How NaFlex batches are made. `seq_lens`: the lengths a batch may have (drawn
  uniformly per batch); `max_tokens_per_batch`: the global token budget (a batch at length
  L holds the largest multiple of `batch_multiple` examples with examples x L within it);
  `batch_multiple`: what the global batch must divide by (the mesh's batch shards and the
  processes)."""
  patch_size: int
  seq_lens: tuple[int, ...]
  max_tokens_per_batch: int
  batch_multiple: int = 1
  seed: int = 0

  def __post_init__(self):
    if not self.seq_lens or min(self.seq_lens) < 1:
      raise ValueError(f'data.naflex.seq_lens must be positive lengths, got {self.seq_lens}')
    for seq_len in self.seq_lens:
      if self.global_batch(seq_len) < 1:
        raise ValueError(
            f'data.naflex.max_tokens_per_batch={self.max_tokens_per_batch} holds no batch at '
            f'seq_len {seq_len}: at least {seq_len * self.batch_multiple} tokens (a multiple '
            f'of {self.batch_multiple} examples) are needed')

  def global_batch(self, seq_len: int) -> int:
    """Examples in a global batch at `seq_len`."""
    per_multiple = self.max_tokens_per_batch // seq_len // self.batch_multiple
    return per_multiple * self.batch_multiple

  def seq_len(self, batch_index: int) -> int:
    """The sequence length of global batch `batch_index` (seeded; the same on every
    process and worker)."""
    rng = np.random.default_rng([self.seed, 104729, batch_index])
    return int(self.seq_lens[rng.integers(len(self.seq_lens))])


# (index, count) of the data worker process this is (`pipeline.init_worker` sets it in each
# `mp_prefetch` worker; in-process: the only one). grain hands batches out round-robin, so
# worker w's j-th batch is global batch j * count + w.
_WORKER = [0, 1]


def set_worker(index: int, count: int) -> None:
  _WORKER[:] = [index, count]


def to_naflex_example(example: dict[str, Any], patch: int, seq_len: int) -> dict[str, Any]:
  """An example whose `image` is at any aspect ratio -> its NaFlex arrays at `seq_len`."""
  out = {k: v for k, v in example.items() if k != 'image'}
  out['patches'], out['coords'], out['valid'] = naflex_patches(
      Image.fromarray(example['image']), patch, seq_len)
  return out


class _NaFlexBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, batching: NaFlexBatching,
               process_count: int):
    super().__init__(parent)
    self._batching, self._process_count = batching, process_count
    self._batches = 0  # this worker's batches so far

  def __next__(self) -> dict[str, np.ndarray]:
    index, count = _WORKER
    seq_len = self._batching.seq_len(self._batches * count + index)
    size = self._batching.global_batch(seq_len) // self._process_count
    examples = [to_naflex_example(next(self._parent), self._batching.patch_size, seq_len)
                for _ in range(size)]
    self._batches += 1
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  def get_state(self):
    return {'parent': self._parent.get_state(), 'batches': self._batches}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._batches = state['batches']


class NaFlexBatches(grain.IterDataset):
  """Per-process NaFlex batches from examples with an `image` (uint8, any aspect ratio)."""

  def __init__(self, parent: grain.IterDataset, batching: NaFlexBatching, process_count: int):
    super().__init__(parent)
    if batching.batch_multiple % process_count:
      raise ValueError(f'NaFlex batches divide by {batching.batch_multiple}, not by the '
                       f'{process_count} processes')
    self._batching, self._process_count = batching, process_count

  def __iter__(self):
    return _NaFlexBatchIterator(self._parent.__iter__(), self._batching, self._process_count)

