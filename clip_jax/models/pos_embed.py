"""Position embeddings resized for another image grid or text context, as OpenCLIP does.

A run may start (`init_from`) from a checkpoint trained at another image size, patch grid
or text context: CLIPA/FLIP train at low resolution and finish at full size. Only the
position tables depend on those sizes; they are resized with OpenCLIP's own rules
(`open_clip.model.resize_pos_embed` and `resize_text_pos_embed`, applied when it loads a
checkpoint into a model of another size), so a checkpoint adapts the same way on both sides.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np

from clip_jax.models.config import CLIPConfig, VisionConfig

Params = dict[str, Any]


def resize_image_pos_embed(pos: np.ndarray, grid: int, prefix: int) -> np.ndarray:
  """[prefix + g*g, d] -> [prefix + grid*grid, d]: the class token's row kept, the grid resized.

  OpenCLIP interpolates bicubic with antialias=True, align_corners=False; torch's
  antialiased bicubic is Keys' kernel with a=-0.5, widened when shrinking and renormalised
  at the borders: what `jax.image.resize(..., 'cubic', antialias=True)` computes.
  """
  old = math.isqrt(pos.shape[0] - prefix)
  if old * old != pos.shape[0] - prefix:
    raise ValueError(f'{pos.shape[0] - prefix} image position embeddings do not form a square '
                     'grid.')
  width = pos.shape[-1]
  image = np.asarray(pos[prefix:], np.float32).reshape(old, old, width)
  resized = jax.image.resize(image, (grid, grid, width), 'cubic', antialias=True)
  return np.concatenate([pos[:prefix], np.asarray(resized).reshape(grid * grid, width)
                         .astype(pos.dtype)])


def resize_text_pos_embed(pos: np.ndarray, context: int) -> np.ndarray:
  """[n, d] -> [context, d] by linear interpolation along positions (align_corners=False,
  no antialias), as OpenCLIP's `resize_text_pos_embed`."""
  resized = jax.image.resize(np.asarray(pos, np.float32), (context, pos.shape[-1]), 'linear',
                             antialias=False)
  return np.asarray(resized).astype(pos.dtype)


def fit_pos_embeds(params: Params, cfg: CLIPConfig) -> Params:
  """`params` with the image and text position tables resized to `cfg` where their token
  counts differ (same width); everything else, and any other mismatch, left as it is."""
  v, t = cfg.vision, cfg.text
  resizers = {
      'text': ((t.positions, t.width), lambda pos: resize_text_pos_embed(pos, t.positions)),
  }
  if isinstance(v, VisionConfig):  # a ConvNeXt has no position table: any size fits it
    resizers['visual'] = ((v.grid ** 2 + int(v.class_token), v.width),
                          lambda pos: resize_image_pos_embed(pos, v.grid, int(v.class_token)))
  params = dict(params)
  for tower, ((tokens, width), resize) in resizers.items():
    pos = params.get(tower, {}).get('pos_embed')
    if pos is None or np.ndim(pos) != 2 or np.shape(pos) == (tokens, width) or (
        np.shape(pos)[1] != width):
      continue
    logging.info('Resizing %s/pos_embed from %d to %d positions', tower, np.shape(pos)[0], tokens)
    params[tower] = {**params[tower], 'pos_embed': resize(np.asarray(pos))}
  return params
