"""timm's `Eva` trunks (EVA-01, EVA-02, PE-Core) as clip_jax ViTs.

An Eva tower is `VisionTransformer` with the block options of `layers.BlockVariant` (no k
bias, attention-output and MLP-hidden norms, SwiGLU, post-norm), PE-Core's MAP head (8
heads, 4x MLP), timm's classifier head as the projection (with bias) and a 2-D rotary
position embedding: `rope_table`, computed from the config (no parameters), applied to q
and k of the patch tokens in every block (`layers.apply_rope`).
"""

from __future__ import annotations

import functools

import numpy as np

from clip_jax.models.config import EvaConfig
from clip_jax.models.layers import BlockVariant
from clip_jax.models.vit import VisionTransformer


@functools.cache
def rope_table(cfg: EvaConfig) -> np.ndarray:
  """[grid^2, 2 * head_dim] float32: sin then cos of each patch's rotation angles, as timm's
  `RotaryEmbeddingCat(in_pixels=False)` computes them (float32, the same order of operations).

  head_dim / 4 frequencies temperature^(-j / (head_dim / 4)) times each of the patch's two
  coordinates (row, column; column first with `rope_xy`), each coordinate being its grid
  index + `rope_offset`, scaled by `rope_ref_grid / grid` when set; every angle is repeated
  for the two members of its pair. Patches in row-major order, as the tokens.
  """
  bands = cfg.head_dim // 4
  exponents = np.arange(bands, dtype=np.int64).astype(np.float32) / np.float32(bands)
  frequencies = (np.float32(1.0) / np.float32(cfg.rope_temperature) ** exponents
                 ).astype(np.float32)
  g = cfg.grid
  coords = np.arange(g, dtype=np.int64).astype(np.float32) + np.float32(cfg.rope_offset)
  if cfg.rope_ref_grid is not None:
    coords = coords / np.float32(g) * np.float32(cfg.rope_ref_grid)
  rows, cols = np.meshgrid(coords, coords, indexing='ij')  # [g, g] each, row-major patches
  grid = np.stack([cols, rows] if cfg.rope_xy else [rows, cols], axis=-1)  # [g, g, 2]
  angles = (grid[..., None] * frequencies).reshape(g * g, 2 * bands)  # axis-major
  angles = np.repeat(angles, 2, axis=-1)  # each angle for both members of its pair
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


class EvaVisionTransformer(VisionTransformer):
  """`VisionTransformer` built with an `EvaConfig`'s block variant, MAP head, projection
  bias and rotary table."""

  def __init__(self, cfg: EvaConfig, embed_dim: int, **kwargs):
    variant = BlockVariant(k_bias=cfg.qkv_bias == 'qkv', attn_norm=cfg.attn_norm,
                           gated_mlp=cfg.gated_mlp, mlp_norm=cfg.mlp_norm,
                           post_norm=cfg.post_norm)
    super().__init__(cfg, embed_dim, variant=variant, map_shape=(cfg.map_heads, cfg.map_mlp_dim),
                     proj_bias=cfg.proj_bias, **kwargs)

  def rope(self) -> np.ndarray | None:
    cfg = self.cfg
    assert isinstance(cfg, EvaConfig)  # made from one
    return rope_table(cfg) if cfg.rope else None
