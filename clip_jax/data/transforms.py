"""Eval-time image preprocessing, kept with the model config (OpenCLIP's image_transform).

`shortest`: resize the shorter side to the target, then center-crop; `squash`: resize both
sides to the target (SigLIP). Output: float32 HWC, normalised with the model's mean/std.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from clip_jax.models.config import CLIPConfig, PreprocessConfig

# The default cap on an image's pixels (width x height from its header): PIL's own
# decompression-bomb threshold, so the two agree. It admits real photos up to ~89
# megapixels (50 MP camera frames, 8K video frames, most panoramas), and an RGB image at
# the cap already takes 256 MiB decoded; a 13000x13000 PNG of 164 KB took 1.3 GB.
MAX_IMAGE_PIXELS = 89_478_485

_BOMB_WARNING_IS_ERROR = ('error', None, Image.DecompressionBombWarning, None, 0)


class ImageTooLarge(ValueError):
  """An image has more pixels than the cap (or than PIL's bomb limit): never decoded."""


_RESAMPLE = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR,
             'nearest': Image.Resampling.NEAREST}


# A crop rectangle (left, top, right, bottom) in pixels of the source image: the part of it
# an augmentation shows, resized to the output square. Boxes follow images through it
# (`clip_jax.data.locca.crop_box`).
Window = tuple[float, float, float, float]


def _shortest_size(width: int, height: int, size: int) -> tuple[int, int]:
  """The size after resizing the shorter side to `size`. The long side is truncated, as
  torchvision's Resize does, so pixels match OpenCLIP."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def resize_and_crop(image: Image.Image, size: int, resize_mode: str, interpolation: str
                    ) -> Image.Image:
  image = image.convert('RGB')
  resample = _RESAMPLE[interpolation]
  if resize_mode == 'squash':
    return image.resize((size, size), resample)
  if resize_mode != 'shortest':
    raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
  new_w, new_h = _shortest_size(*image.size, size)
  image = image.resize((new_w, new_h), resample)
  left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
  return image.crop((left, top, left + size, top + size))


def resize_and_crop_window(width: int, height: int, size: int, resize_mode: str) -> Window:
  """The source rectangle `resize_and_crop` shows: all of it ('squash'), or the centre
  crop of the resized image mapped back to source pixels ('shortest')."""
  if resize_mode == 'squash':
    return 0.0, 0.0, float(width), float(height)
  new_w, new_h = _shortest_size(width, height, size)
  left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
  sx, sy = width / new_w, height / new_h
  return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def normalize(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
  """uint8 HWC -> float32 HWC scaled to [0, 1] then standardised per channel."""
  x = pixels.astype(np.float32) / 255.0
  return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def eval_pixels(image: Image.Image, size: int, cfg: PreprocessConfig) -> np.ndarray:
  """The model's eval resizing, as uint8 [size, size, 3] (normalised later, on device)."""
  return np.asarray(resize_and_crop(image, size, cfg.resize_mode, cfg.interpolation), np.uint8)


def _refuse_bomb_warnings() -> None:
  """Makes PIL's DecompressionBombWarning an error, as PIL's docs advise: over its
  Image.MAX_IMAGE_PIXELS PIL only warns and decodes anyway, also for sizes no header shows
  (GIF frames, TIFF tiles). Process-wide, since `warnings.catch_warnings` is not
  thread-safe (`embed` decodes in threads); set again whenever it is gone, since a
  `catch_warnings` block around the import (pytest's collection, for one) discards it. A
  filter the user put in front of it still wins."""
  if _BOMB_WARNING_IS_ERROR not in warnings.filters:
    warnings.simplefilter('error', Image.DecompressionBombWarning)


def decode_image(data: bytes, min_size: int | None, max_pixels: int = MAX_IMAGE_PIXELS
                 ) -> Image.Image:
  """Decodes image bytes to RGB; JPEGs decode at reduced scale when still >= min_size.

  PIL's `draft` lets libjpeg skip DCT work (1/2, 1/4, 1/8 scale), the pipeline's floor.
  Its downscaling is not a bicubic resize, so `min_size=None` decodes at full scale: the
  pixels PIL/torchvision evaluators (clip_benchmark) see. Raises on corrupt or truncated
  data, and `ImageTooLarge` before decoding when the header's width x height is over
  `max_pixels`: a few KB of compressed PNG can hold gigabytes of pixels.
  """
  _refuse_bomb_warnings()
  try:
    image = Image.open(io.BytesIO(data))  # reads the header only
    width, height = image.size
    if width * height > max_pixels:
      raise ImageTooLarge(f'{width}x{height} image: {width * height} pixels, over the cap of '
                          f'{max_pixels} (data.max_image_pixels)')
    if image.format == 'JPEG' and min_size is not None:
      image.draft('RGB', (min_size, min_size))
    image.load()
  except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
    raise ImageTooLarge(str(e)) from None
  return image.convert('RGB')


def decode_or_skip(data: bytes, min_size: int | None, max_pixels: int = MAX_IMAGE_PIXELS
                   ) -> Image.Image | str:
  """`decode_image`, or the skip kind a reader counts a failure under (`skip_kind`)."""
  try:
    return decode_image(data, min_size, max_pixels)
  except Exception as e:  # PIL raises many types for corrupt data
    return skip_kind(e)


def skip_kind(error: Exception) -> str:
  """What a failed `decode_image` is counted as: 'oversized_image' (`ImageTooLarge`) or
  'bad_image' (anything else PIL raises on corrupt, truncated or unknown data)."""
  return 'oversized_image' if isinstance(error, ImageTooLarge) else 'bad_image'


def random_crop_window(width: int, height: int, rng: np.random.Generator,
                       scale: tuple[float, float] = (0.9, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Window:
  """torchvision's RandomResizedCrop rectangle: a random area share and aspect, placed at
  random; after 10 tries that do not fit, the central square."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
    if 0 < cw <= width and 0 < ch <= height:
      left, top = rng.integers(0, width - cw + 1), rng.integers(0, height - ch + 1)
      return left, top, left + cw, top + ch
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def resize_window(image: Image.Image, size: int, window: Window) -> Image.Image:
  """The window of `image`, resized (bicubic) to size x size."""
  return image.resize((size, size), Image.Resampling.BICUBIC, box=window)


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
  """torchvision's RandomResizedCrop: a random area/aspect crop resized to size x size."""
  return resize_window(image, size, random_crop_window(*image.size, rng, scale, ratio))


def normalize_on_device(images, cfg: PreprocessConfig):
  """uint8 NHWC batch (as the pipeline ships it) -> normalised float32, inside jit."""
  import jax.numpy as jnp
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)


def images_of(batch: dict, cfg: CLIPConfig):
  """The image tower's input, inside jit: the batch's uint8 images normalised, or for NaFlex
  batches (`patches`, `coords`, `valid`) the patches normalised alike (channels last in a
  patch). Training and every evaluator feed batches with these keys."""
  from clip_jax.models.naflex import NaFlexPatches
  if 'patches' not in batch:
    return normalize_on_device(batch['image'], cfg.preprocess).astype(cfg.dtype)
  patches = batch['patches']
  pixels = normalize_on_device(patches.reshape(*patches.shape[:-1], -1, 3), cfg.preprocess)
  return NaFlexPatches(pixels.reshape(patches.shape).astype(cfg.dtype), batch['coords'],
                       batch['valid'])
