"""NaFlex preprocessing on the host: each image at its own aspect ratio, as patches.

An image is resized, keeping its aspect ratio, to the largest grid of whole patches that
fits the sequence length (SigLIP 2's rule as timm's `get_image_size_for_seq` applies it:
both sides scaled by one factor, each rounded up to whole patches, at least one patch),
cut into patches in row-major order ((row, column, channel) within a patch, uint8) and
padded to the sequence length: the arrays of `models.naflex.NaFlexPatches`, normalised on
device as the square path's pixels are.
"""

from __future__ import annotations

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
    k = _largest(lambda k, grid=grid: k * grid(k)[1 if grid is by_rows else 0] <= seq_len,
                 seq_len)
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
