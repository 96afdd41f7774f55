"""Eval-time image preprocessing, kept with the model config (OpenCLIP's image_transform).

`shortest`: resize the shorter side to the target, then center-crop; `squash`: resize both
sides to the target (SigLIP). Output: float32 HWC, normalised with the model's mean/std.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from clip_jax.models.config import PreprocessConfig

_RESAMPLE = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}


def resize_and_crop(image: Image.Image, size: int, resize_mode: str, interpolation: str
                    ) -> Image.Image:
  image = image.convert('RGB')
  resample = _RESAMPLE[interpolation]
  if resize_mode == 'squash':
    return image.resize((size, size), resample)
  if resize_mode != 'shortest':
    raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
  w, h = image.size
  # The long side is truncated, as torchvision's Resize does, so pixels match OpenCLIP.
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  image = image.resize((new_w, new_h), resample)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
  """uint8 HWC -> float32 HWC scaled to [0, 1] then standardised per channel."""
  x = pixels.astype(np.float32) / 255.0
  return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def make_preprocess(cfg: PreprocessConfig, size: int) -> Callable[[Image.Image], np.ndarray]:
  """A PIL image -> float32 [size, size, 3] function, as `clip_jax.load` returns it."""

  def preprocess(image: Image.Image) -> np.ndarray:
    image = resize_and_crop(image, size, cfg.resize_mode, cfg.interpolation)
    return normalize(np.asarray(image), cfg)

  return preprocess
