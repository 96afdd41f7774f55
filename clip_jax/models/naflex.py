"""NaFlex inputs: each image at its own aspect ratio, as a padded sequence of patches.

SigLIP 2's NaFlex (timm `naflexvit_*`) resizes an image, keeping its aspect ratio, to the
largest patch grid that fits a sequence length, cuts it into patches (row-major) and pads
the sequence: `NaFlexPatches` carries the flattened patches, each patch's (row, column) and
whether it is real. The image tower adds its learned position grid resized to each image's
own grid (bilinear, antialiased where the grid shrinks, as timm's `F.interpolate(...,
antialias=True)`), and every attention (the blocks and the MAP head) ignores the padding.

The resize is written as two per-token rows of interpolation weights (one per axis) and one
[tokens, g*g] x [g*g, width] matmul, so one compiled step serves every mix of grids in a
batch: the grids are data, not shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clip_jax.models.config import kept_count


class NaFlexPatches(NamedTuple):
  """A batch of images as padded patch sequences (a pytree: it shards and jits as arrays)."""
  patches: jax.Array  # [B, N, P*P*3] normalised pixels, (row, column, channel) within a patch
  coords: jax.Array   # [B, N, 2] int32: (row, column) of each patch in its image's grid
  valid: jax.Array    # [B, N] bool: False where the sequence is padding


def square_patches(images: jax.Array, patch: int) -> NaFlexPatches:
  """[B, H, W, 3] images (whole patches) as NaFlex sequences with every patch real: a NaFlex
  tower given plain images (evaluation, `clip_jax.load`) sees them at their own grid."""
  b, h, w, c = images.shape
  rows, cols = h // patch, w // patch
  patches = images[:, :rows * patch, :cols * patch].reshape(b, rows, patch, cols, patch, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows * cols, patch * patch * c)
  grid = jnp.stack(jnp.divmod(jnp.arange(rows * cols), cols), axis=-1).astype(jnp.int32)
  return NaFlexPatches(patches, jnp.broadcast_to(grid, (b, rows * cols, 2)),
                       jnp.ones((b, rows * cols), bool))


def grid_sizes(coords: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, 2] each image's (rows, columns) of patches, from its real patches' coordinates."""
  real = jnp.where(valid[..., None], coords, 0)
  return real.max(axis=1) + 1


def interpolation_weights(positions: jax.Array, sizes: jax.Array, source: int) -> jax.Array:
  """[B, N, source] the rows of the linear resize from `source` cells to each image's
  `sizes` ([B]) cells, at output `positions` ([B, N]).

  Cell centres align (align_corners=False); the triangle kernel is widened by source/size
  where the image's grid is smaller (antialiasing) and each row is renormalised, which is
  torch's antialiased bilinear interpolation and `jax.image.resize(..., 'linear')`.
  """
  scale = sizes.astype(jnp.float32)[:, None] / source            # [B, 1] output / input
  centre = (positions.astype(jnp.float32) + 0.5) / scale - 0.5   # [B, N] in source cells
  distance = jnp.abs(jnp.arange(source, dtype=jnp.float32) - centre[..., None])
  weights = jnp.maximum(0.0, 1.0 - distance * jnp.minimum(scale, 1.0)[..., None])
  # A padding slot's coordinates may lie off its image's grid: no weight there, and 0, not
  # NaN, after normalising (a NaN would reach the table's gradient through the matmul).
  return weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)


def resized_position_embedding(table: jax.Array, coords: jax.Array, valid: jax.Array
                               ) -> jax.Array:
  """[B, N, width]: the learned [g*g, width] position grid resized to each image's patch
  grid, read at each patch's (row, column); float32."""
  g = round(table.shape[0] ** 0.5)
  sizes = grid_sizes(coords, valid)
  rows = interpolation_weights(coords[..., 0], sizes[:, 0], g)
  cols = interpolation_weights(coords[..., 1], sizes[:, 1], g)
  weights = (rows[..., :, None] * cols[..., None, :]).reshape(*coords.shape[:2], g * g)
  return jnp.einsum('bnk,kd->bnd', weights, table.astype(jnp.float32))


def kept_valid_patches(keys: jax.Array, valid: jax.Array, rate: float
                       ) -> tuple[jax.Array, jax.Array]:
  """Patch dropout over real patches only: ([B, keep] indices, [B, keep] still-valid).

  Every sequence keeps `keep` = int(N * (1 - rate)) slots (a static shape: the blocks run
  on fewer tokens); an image with V real patches keeps max(1, int(V * (1 - rate))) of them,
  drawn by its own key, and the rest of its slots are padding. Real patches rank first, so
  padding is dropped before any real patch is.
  """
  n = valid.shape[1]
  keep = kept_count(n, rate)
  noise = jax.vmap(lambda key: jax.random.uniform(key, (n,)))(keys)
  kept = jax.lax.top_k(jnp.where(valid, noise, -1.0), keep)[1]
  counts = valid.sum(axis=1, keepdims=True)
  quota = jnp.maximum(1, jnp.floor(counts * (1 - rate)).astype(jnp.int32))
  return kept, jnp.arange(keep)[None, :] < jnp.minimum(quota, counts)
