"""What every evaluator feeds the image tower: a decoded image as one row of a batch.

A square model's row is its eval resize-and-crop, `{'image': uint8 [size, size, 3]}`. A
NaFlex model evaluated at a sequence length (`--seq_len`) sees each image at its own aspect
ratio instead: resized to the largest patch grid that fits the length, patchified on the
host and padded, `{'patches', 'coords', 'valid'}`. The keys are a training batch's, so one
device function (`transforms.images_of`) normalises both, and one compile serves every
image shape. A NaFlex model without a length sees square images as its full grid.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import jax
import numpy as np
from PIL import Image

from clip_jax.data.naflex import naflex_patches
from clip_jax.data.transforms import eval_pixels, normalize
from clip_jax.models.config import CLIPConfig, PreprocessConfig, is_naflex
from clip_jax.models.naflex import NaFlexPatches

Row = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """Makes rows (`__call__`) and stacks them into batches (`batch`) for one model."""
  size: int
  preprocess: PreprocessConfig
  patch: int = 0
  seq_len: int | None = None  # NaFlex rows of this many patch slots; None: square images

  @classmethod
  def of(cls, cfg: CLIPConfig, seq_len: int | None = None, flag: str = '--seq_len'
         ) -> ImageInput:
    """The model's rows; `seq_len` (NaFlex models only, named by `flag` in errors)."""
    if seq_len is None:
      return cls(cfg.vision.image_size, cfg.preprocess)
    if not is_naflex(cfg.vision):
      raise ValueError(f'{flag}={seq_len}: the model is not a NaFlex model '
                       '(model.vision.naflex); it takes square images only.')
    if seq_len < 1:
      raise ValueError(f'{flag}={seq_len}: a sequence length is a positive patch count.')
    return cls(cfg.vision.image_size, cfg.preprocess, cfg.vision.patch_size, seq_len)

  @property
  def decode_size(self) -> int | None:
    """The size a JPEG may be decoded at (reduced scale) and still give the same row: NaFlex
    rows may upscale one side, so they decode at full scale."""
    return None if self.seq_len else self.size

  def __call__(self, image: Image.Image) -> Row:
    if not self.seq_len:
      return {'image': eval_pixels(image, self.size, self.preprocess)}
    patches, coords, valid = naflex_patches(image, self.patch, self.seq_len,
                                            self.preprocess.interpolation)
    return {'patches': patches, 'coords': coords, 'valid': valid}

  def normalized(self, image: Image.Image) -> np.ndarray | NaFlexPatches:
    """`image` as the image tower takes it, on the host (`clip_jax.load`'s `preprocess`):
    float32 [size, size, 3] normalised, or one image's NaFlexPatches with normalised float32
    patches. Batch them with `jax.tree.map(lambda *x: np.stack(x), *rows)`."""
    row = self(image)
    if not self.seq_len:
      return normalize(row['image'], self.preprocess)
    patches = row['patches']
    pixels = normalize(patches.reshape(self.seq_len, -1, 3), self.preprocess)
    arrays = pixels.reshape(patches.shape), row['coords'], row['valid']
    return NaFlexPatches(*cast(tuple[jax.Array, ...], arrays))  # host arrays: jit takes them

  def zeros(self, rows: int) -> Row:
    """`rows` padding rows (what fills a batch to its fixed size)."""
    if not self.seq_len:
      return {'image': np.zeros((rows, self.size, self.size, 3), np.uint8)}
    return {'patches': np.zeros((rows, self.seq_len, self.patch * self.patch * 3), np.uint8),
            'coords': np.zeros((rows, self.seq_len, 2), np.int32),
            'valid': np.zeros((rows, self.seq_len), bool)}

  def batch(self, rows: list[Row], size: int | None = None) -> Row:
    """`rows` stacked, then zero rows up to `size` (default: none)."""
    batch = self.zeros(len(rows) if size is None else size)
    for key, values in batch.items():
      if rows:
        values[:len(rows)] = [row[key] for row in rows]
    return batch
