"""The two-tower model with a learnable logit scale (and SigLIP's logit bias), and CoCa's
caption decoder when the config has one."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clip_jax.models import generate as generation
from clip_jax.models.config import CLIPConfig, ConvNeXtConfig, EvaConfig, ResNetConfig, VisionConfig
from clip_jax.models.convnext import ConvNeXt
from clip_jax.models.decoder import TextDecoder
from clip_jax.models.eva import EvaVisionTransformer
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer, kept_patch_indices

MAX_LOGIT_SCALE = 4.605170185988092  # log(100): the clamp OpenCLIP and SigLIP apply

# The image tower each vision config type builds: (config, embed_dim, **execution options).
ImageTower = VisionTransformer | ConvNeXt | ModifiedResNet  # EvaVisionTransformer is a ViT
IMAGE_TOWERS: dict[type, type[ImageTower]] = {
    VisionConfig: VisionTransformer, ConvNeXtConfig: ConvNeXt, ResNetConfig: ModifiedResNet,
    EvaConfig: EvaVisionTransformer}  # Eva: timm's EVA-01/02 and PE-Core trunks


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Matches torch.nn.functional.normalize: x / max(||x||, eps), computed in float32."""
  x32 = x.astype(jnp.float32)
  return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)


class CLIP(nnx.Module):
  """`encode_image` takes NHWC float images as `preprocess` makes them; `encode_text` ids."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    kw: dict[str, Any] = dict(scan=cfg.scan_layers, remat=cfg.remat, attention=cfg.attention,
                              dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                              rngs=rngs)
    self.visual: ImageTower = IMAGE_TOWERS[type(cfg.vision)](
        cfg.vision, cfg.embed_dim, **kw)  # type: ignore[arg-type]
    self.text = TextTransformer(cfg.text, cfg.embed_dim, **kw)
    self.logit_scale = nnx.Param(jnp.asarray(cfg.init_logit_scale, jnp.float32), axes=())
    self.logit_bias = (nnx.Param(jnp.asarray(cfg.init_logit_bias, jnp.float32), axes=())
                       if cfg.init_logit_bias is not None else None)
    self.decoder = TextDecoder(cfg.decoder, **kw) if cfg.decoder is not None else None

  def encode_image(self, images: jax.Array, normalize: bool = False,
                   dropout_keys: jax.Array | None = None) -> jax.Array:
    """`dropout_keys`: one random key per image, for training with `vision.patch_dropout`."""
    x = self.visual(images, dropout_keys)
    return l2_normalize(x) if normalize else x

  def encode_text(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
    x = self.text(tokens)
    return l2_normalize(x) if normalize else x

  def __call__(self, images: jax.Array, tokens: jax.Array, dropout_keys: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Normalised image and text features, the log logit scale and the bias (or None)."""
    bias = self.logit_bias[...] if self.logit_bias is not None else None
    return (self.encode_image(images, normalize=True, dropout_keys=dropout_keys),
            self.encode_text(tokens, normalize=True), self.logit_scale[...], bias)

  def caption_logits(self, images: jax.Array, tokens: jax.Array,
                     dropout_keys: jax.Array | None = None,
                     decoder_tokens: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """`__call__`'s four outputs and the decoder's teacher-forced logits [B, T - 1, vocab]:
    position t predicts token t + 1 of `tokens` (CoCa, OpenCLIP's `forward`) or of
    `decoder_tokens` (LocCa: the decoder's own sequence)."""
    if self.decoder is None:
      raise ValueError('This model has no caption decoder (config.model.decoder is None).')
    img, image_tokens = self.visual.encode(images, dropout_keys)
    txt, text_tokens = self.text.encode(tokens)
    bias = self.logit_bias[...] if self.logit_bias is not None else None
    if self.decoder.cfg.embed_tokens:
      if decoder_tokens is None:
        raise ValueError('A LocCa decoder (decoder.embed_tokens) needs decoder_tokens.')
      logits = self.decoder(image_tokens, decoder_tokens[:, :-1],
                            self._kept_patches(dropout_keys))
    else:
      logits = self.decoder(image_tokens, text_tokens[:, :-1])
    return l2_normalize(img), l2_normalize(txt), self.logit_scale[...], bias, logits

  def _kept_patches(self, dropout_keys: jax.Array | None) -> jax.Array | None:
    """The grid indices of the patch tokens `visual.encode` keeps under patch dropout (None:
    all), which a LocCa decoder places by."""
    v = self.cfg.vision
    if dropout_keys is None or not isinstance(v, VisionConfig) or not v.patch_dropout:
      return None
    return kept_patch_indices(dropout_keys, v.grid ** 2, v.kept_patches)

  def generate(self, images: jax.Array, text: jax.Array | None = None, *,
               key: jax.Array | None = None, **settings: Any) -> jax.Array:
    """Caption token ids [B, seq_len] for `images`, as OpenCLIP's `CoCa.generate` (its
    keyword arguments and defaults: beam search, seq_len 30), with a key-value cache:
    `clip_jax.models.generate.generate`."""
    return generation.generate(self, images, text, key=key, **settings)
