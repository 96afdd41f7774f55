"""Named architectures, spelled as OpenCLIP spells them, plus tiny ones for tests and the demo.

Each preset is a `CLIPConfig`; `get_config(name, **overrides)` returns it with
`CLIPConfig.replace` overrides (e.g. `vision.layers=2` for reduced-depth tests).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from clip_jax.models.config import (
  INCEPTION_MEAN,
  INCEPTION_STD,
  CLIPConfig,
  ConvNeXtConfig,
  DecoderConfig,
  EvaConfig,
  PreprocessConfig,
  ResNetConfig,
  TextConfig,
  VisionConfig,
)


def _openclip_vit(embed_dim: int, image_size: int, patch: int, width: int, layers: int,
                  head_width: int, mlp_ratio: float, text_width: int, text_heads: int,
                  text_layers: int, quick_gelu: bool = False, ls_init: float | None = None
                  ) -> CLIPConfig:
  """OpenCLIP's native ViT + causal CLIP text tower (the `ViT-*` JSON configs)."""
  act = 'quick_gelu' if quick_gelu else 'gelu'
  vision = VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                        heads=width // head_width, mlp_dim=int(width * mlp_ratio), act=act,
                        ls_init=ls_init)
  text = TextConfig(width=text_width, heads=text_heads, layers=text_layers,
                    mlp_dim=text_width * 4, act=act)
  return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


# name: (embed, image, patch, width, layers, head_width, mlp_ratio, t_width, t_heads, t_layers)
_VitArgs = tuple[int, int, int, int, int, int, float, int, int, int]
_OPENCLIP_VITS: dict[str, _VitArgs] = {
    'ViT-S-32': (384, 224, 32, 384, 12, 64, 4.0, 384, 6, 12),
    'ViT-S-32-alt': (256, 224, 32, 384, 12, 64, 4.0, 256, 4, 10),
    'ViT-S-16': (384, 224, 16, 384, 12, 64, 4.0, 384, 6, 12),
    'ViT-S-16-alt': (256, 224, 16, 384, 12, 64, 4.0, 256, 4, 10),
    'ViT-M-32': (512, 224, 32, 512, 12, 64, 4.0, 512, 8, 12),
    'ViT-M-32-alt': (384, 224, 32, 512, 12, 64, 4.0, 384, 6, 12),
    'ViT-M-16': (512, 224, 16, 512, 12, 64, 4.0, 512, 8, 12),
    'ViT-B-32': (512, 224, 32, 768, 12, 64, 4.0, 512, 8, 12),
    'ViT-B-32-256': (512, 256, 32, 768, 12, 64, 4.0, 512, 8, 12),
    'ViT-B-32-plus-256': (640, 256, 32, 896, 12, 64, 4.0, 640, 10, 12),
    'ViT-B-16': (512, 224, 16, 768, 12, 64, 4.0, 512, 8, 12),
    'ViT-B-16-plus': (640, 224, 16, 896, 12, 64, 4.0, 640, 10, 12),
    'ViT-B-16-plus-240': (640, 240, 16, 896, 12, 64, 4.0, 640, 10, 12),
    'ViT-L-14': (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    'ViT-L-14-280': (768, 280, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    'ViT-L-14-336': (768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    'ViT-L-16': (768, 224, 16, 1024, 24, 64, 4.0, 768, 12, 12),
    'ViT-L-16-320': (768, 320, 16, 1024, 24, 64, 4.0, 768, 12, 12),
    'ViT-H-14': (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 16, 24),
    'ViT-H-14-378': (1024, 378, 14, 1280, 32, 80, 4.0, 1024, 16, 24),
    'ViT-H-16': (1024, 224, 16, 1280, 32, 80, 4.0, 1024, 16, 24),
    'ViT-g-14': (1024, 224, 14, 1408, 40, 88, 4.3637, 1024, 16, 24),
    'ViT-bigG-14': (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 20, 32),
    'ViT-e-14': (1280, 224, 14, 1792, 56, 112, 8.5715, 1280, 20, 36),
}
_QUICKGELU = ('ViT-B-32', 'ViT-B-16', 'ViT-L-14', 'ViT-L-14-336', 'ViT-H-14', 'ViT-H-14-378',
              'ViT-bigG-14')
_LAYER_SCALE = {'ViT-M-16-alt': ('ViT-M-16', 384, 6, 1e-4)}


# timm builds these SigLIP trunks with tanh-approximated GELU; the others use exact GELU.
_TIMM_TANH_GELU = ('vit_base_patch32_siglip_256', 'vit_large_patch16_siglip_512',
                   'vit_giantopt_patch16_siglip_256', 'vit_giantopt_patch16_siglip_384',
                   'vit_so400m_patch16_siglip_256', 'vit_so400m_patch16_siglip_384',
                   'vit_so400m_patch16_siglip_512')


def _siglip(timm_name: str, image_size: int, patch: int, width: int, layers: int, heads: int,
            mlp_dim: int, vocab: int, context: int, hf_tokenizer: str, *,
            text_act: str = 'gelu', text_proj: bool = True,
            text_dims: tuple[int, int, int, int] | None = None) -> CLIPConfig:
  """SigLIP: timm trunk (no class token, MAP head, no projection) + bidirectional text.
  The text tower has the trunk's (width, layers, heads, mlp_dim) unless `text_dims` says
  otherwise (giant-opt: a SO400M text tower projected up to the 1536-wide image embedding)."""
  text_width, text_layers, text_heads, text_mlp = text_dims or (width, layers, heads, mlp_dim)
  vision = VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                        heads=heads, mlp_dim=mlp_dim, class_token=False, pool='map', ln_pre=False,
                        patch_bias=True, proj=False, norm_eps=1e-6, timm_model_name=timm_name,
                        act='gelu_tanh' if timm_name in _TIMM_TANH_GELU else 'gelu')
  text = TextConfig(context_length=context, vocab_size=vocab, width=text_width, heads=text_heads,
                    layers=text_layers, mlp_dim=text_mlp, causal=False, pool='last', proj=text_proj,
                    proj_bias=text_proj, act=text_act, norm_eps=1e-6, tokenizer='',
                    hf_tokenizer_name=hf_tokenizer)
  return CLIPConfig(embed_dim=width, vision=vision, text=text, init_logit_scale=2.302585092994046,
                    init_logit_bias=-10.0, custom_text=True,
                    preprocess=PreprocessConfig(mean=INCEPTION_MEAN, std=INCEPTION_STD,
                                                resize_mode='squash'))


_B, _L, _SO = (768, 12, 12, 3072), (1024, 24, 16, 4096), (1152, 27, 16, 4304)
_GOPT = (1536, 40, 16, 6144)


def _siglip_presets() -> dict[str, CLIPConfig]:
  out = {}
  v1, v2 = 'timm/ViT-B-16-SigLIP', 'timm/ViT-B-16-SigLIP2'
  for size in (224, 256, 384, 512):
    suffix = '' if size == 224 else f'-{size}'
    out[f'ViT-B-16-SigLIP{suffix}'] = _siglip(
        f'vit_base_patch16_siglip_{size}', size, 16, *_B, 32000, 64, v1)
    out[f'ViT-B-16-SigLIP2{suffix}'] = _siglip(
        f'vit_base_patch16_siglip_{size}', size, 16, *_B, 256000, 64,
        v2 + suffix, text_act='gelu_tanh')
  out['ViT-B-16-SigLIP-i18n-256'] = _siglip('vit_base_patch16_siglip_256', 256, 16, *_B, 250000,
                                            64, 'timm/ViT-B-16-SigLIP-i18n-256')
  out['ViT-B-32-SigLIP2-256'] = _siglip('vit_base_patch32_siglip_256', 256, 32, *_B, 256000, 64,
                                        'timm/ViT-B-32-SigLIP2-256', text_act='gelu_tanh')
  for size in (256, 384):
    out[f'ViT-L-16-SigLIP-{size}'] = _siglip(f'vit_large_patch16_siglip_{size}', size, 16, *_L,
                                             32000, 64, v1)
  for size in (256, 384, 512):
    out[f'ViT-L-16-SigLIP2-{size}'] = _siglip(f'vit_large_patch16_siglip_{size}', size, 16, *_L,
                                              256000, 64, f'timm/ViT-L-16-SigLIP2-{size}',
                                              text_act='gelu_tanh')
  out['ViT-SO400M-14-SigLIP'] = _siglip('vit_so400m_patch14_siglip_224', 224, 14, *_SO, 32000,
                                        16, v1)
  for size in (378, 384):
    out[f'ViT-SO400M-14-SigLIP-{size}'] = _siglip(f'vit_so400m_patch14_siglip_{size}', size, 14,
                                                  *_SO, 32000, 64, v1)
  out['ViT-SO400M-16-SigLIP-i18n-256'] = _siglip(
      'vit_so400m_patch16_siglip_256', 256, 16, *_SO, 250000, 64, 'timm/ViT-B-16-SigLIP-i18n-256',
      text_proj=False)
  for name, size, patch in (('ViT-SO400M-14-SigLIP2', 224, 14),
                            ('ViT-SO400M-14-SigLIP2-378', 378, 14),
                            ('ViT-SO400M-16-SigLIP2-256', 256, 16),
                            ('ViT-SO400M-16-SigLIP2-384', 384, 16),
                            ('ViT-SO400M-16-SigLIP2-512', 512, 16)):
    out[name] = _siglip(f'vit_so400m_patch{patch}_siglip_{size}', size, patch, *_SO, 256000, 64,
                        f'timm/{name}', text_act='gelu_tanh')
  for size in (256, 384):
    name = f'ViT-gopt-16-SigLIP2-{size}'
    out[name] = _siglip(f'vit_giantopt_patch16_siglip_{size}', size, 16, *_GOPT, 256000, 64,
                        f'timm/{name}', text_act='gelu_tanh', text_dims=_SO)
  return out


def _naflex(timm_name: str, siglip2: str) -> CLIPConfig:
  """timm's NaFlex SigLIP trunk `timm_name` (bilinear position-grid resize, tanh GELU, MAP
  head, 16x16 position grid: `image_size` 256 at patch 16) with the text tower, logit scale
  and bias of the SigLIP 2 preset `siglip2` (the pairing SigLIP 2's NaFlex models were
  released with: the same text tower as the fixed-resolution ones)."""
  base = _siglip_presets()[siglip2]
  assert isinstance(base.vision, VisionConfig)
  return base.replace(vision=dataclasses.replace(base.vision, naflex=True, act='gelu_tanh',
                                                 timm_model_name=timm_name))


def _tiny_naflex() -> CLIPConfig:
  """`tiny-demo` with a NaFlex SigLIP-style image tower (no class token, MAP head, patch
  bias, no projection: embed_dim is its width, 128; 4x4 position grid of 16 px patches):
  the CPU demo's and the parity tests' NaFlex. timm names no trunk this small, so it does
  not export (naflexvit_base_patch16_siglip does)."""
  base = _tiny_demo()
  assert isinstance(base.vision, VisionConfig)
  vision = dataclasses.replace(base.vision, naflex=True, class_token=False, pool='map',
                               ln_pre=False, patch_bias=True, proj=False, norm_eps=1e-6,
                               act='gelu_tanh')
  return base.replace(embed_dim=vision.width, vision=vision)


def _coca(embed_dim: int, image_size: int, patch: int, width: int, layers: int,
          text_width: int, text_heads: int, vocab: int = 49408, pool_heads: int | None = 8,
          decoder_heads: int | None = None) -> CLIPConfig:
  """OpenCLIP's CoCa (`coca_*` JSON configs): a ViT whose attentional pooler (`pool_heads`;
  None: class-token pooling, the decoder reading the patch tokens) feeds a 12-layer caption
  decoder as wide as the text tower; text context 76 plus the appended class token."""
  pooled = pool_heads is not None
  vision = VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                        heads=width // 64, mlp_dim=width * 4,
                        attn_pool_queries=256 if pooled else 0, attn_pool_heads=pool_heads or 8)
  text = TextConfig(context_length=76, vocab_size=vocab, width=text_width, heads=text_heads,
                    layers=12, mlp_dim=text_width * 4, embed_cls=True)
  decoder = DecoderConfig(width=text_width, heads=decoder_heads or text_heads, layers=12,
                          mlp_dim=text_width * 4, context_length=76, vocab_size=vocab)
  return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, decoder=decoder,
                    custom_text=True)


def _tiny_coca() -> CLIPConfig:
  """A 2-layer CoCa for tests and the CPU demo (16 pooler queries, context 32)."""
  return CLIPConfig(
      embed_dim=64,
      vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=2, heads=4, mlp_dim=512,
                          attn_pool_queries=17, attn_pool_heads=4),
      text=TextConfig(context_length=32, width=64, heads=4, layers=2, mlp_dim=256, embed_cls=True),
      decoder=DecoderConfig(width=64, heads=4, layers=2, mlp_dim=256, context_length=32),
      custom_text=True)


def _tiny(act: str = 'gelu') -> CLIPConfig:
  """A 2-layer model for tests and the CPU demo; exportable to OpenCLIP like any ViT."""
  return CLIPConfig(
      embed_dim=64,
      vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256,
                          act=act),
      text=TextConfig(context_length=32, width=64, heads=4, layers=2, mlp_dim=256, act=act))


def _tiny_demo() -> CLIPConfig:
  """The CPU demo's model (configs/demo.py): `tiny`'s text tower, a wider image tower on 16
  patches of 16 px (64 px images) pooled by their mean. Measured on the demo data: as
  accurate per training step as `tiny` at 64 px (patch 8, 64 tokens), at ~1.4x its samples/s
  on 2 CPU cores."""
  return CLIPConfig(
      embed_dim=64,
      vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=2, heads=4, mlp_dim=512,
                          pool='gap'),
      text=TextConfig(context_length=32, width=64, heads=4, layers=2, mlp_dim=256))


# timm's convnext_* trunks: depths, dims and LayerNorm eps (`convnext_xxlarge`: 1e-5).
_TIMM_CONVNEXTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {
    'convnext_atto': ((2, 2, 6, 2), (40, 80, 160, 320), 1e-6),  # conv_mlp layout
    'convnext_tiny': ((3, 3, 9, 3), (96, 192, 384, 768), 1e-6),
    'convnext_small': ((3, 3, 27, 3), (96, 192, 384, 768), 1e-6),
    'convnext_base': ((3, 3, 27, 3), (128, 256, 512, 1024), 1e-6),
    'convnext_large': ((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    'convnext_xlarge': ((3, 3, 27, 3), (256, 512, 1024, 2048), 1e-6),
    'convnext_xxlarge': ((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
}
# timm models that store the block MLP as 1x1 convolutions (same computation).
_TIMM_CONV_MLP = ('convnext_atto',)


def convnext_tower(timm_name: str, image_size: int, head_proj: str = 'linear',
                   drop_path: float = 0.1) -> ConvNeXtConfig:
  """timm's `timm_name` trunk with OpenCLIP's head, as OpenCLIP's JSON configs build it."""
  depths, dims, eps = _TIMM_CONVNEXTS[timm_name]
  return ConvNeXtConfig(image_size=image_size, depths=depths, dims=dims, norm_eps=eps,
                        drop_path=drop_path, head_proj=head_proj, timm_model_name=timm_name,
                        conv_mlp=timm_name in _TIMM_CONV_MLP)


def timm_convnexts() -> list[str]:
  """The timm ConvNeXt trunks clip_jax builds (OpenCLIP's `timm_model_name`)."""
  return list(_TIMM_CONVNEXTS)


# OpenCLIP name: (timm trunk, image size, head, embed_dim, text width, heads, layers)
_OPENCLIP_CONVNEXTS: dict[str, tuple[str, int, str, int, int, int, int]] = {
    'convnext_tiny': ('convnext_tiny', 224, 'linear', 1024, 512, 8, 12),
    'convnext_small': ('convnext_small', 224, 'linear', 512, 512, 8, 12),
    'convnext_base': ('convnext_base', 224, 'linear', 512, 512, 8, 12),
    'convnext_base_w': ('convnext_base', 256, 'linear', 640, 640, 10, 12),
    'convnext_base_w_320': ('convnext_base', 320, 'linear', 640, 640, 10, 12),
    'convnext_large': ('convnext_large', 224, 'linear', 768, 768, 12, 12),
    'convnext_large_d': ('convnext_large', 256, 'mlp', 768, 768, 12, 16),
    'convnext_large_d_320': ('convnext_large', 320, 'mlp', 768, 768, 12, 16),
    'convnext_xlarge': ('convnext_xlarge', 256, 'linear', 1024, 1024, 16, 20),
    'convnext_xxlarge': ('convnext_xxlarge', 256, 'linear', 1024, 1024, 16, 24),
    'convnext_xxlarge_320': ('convnext_xxlarge', 320, 'linear', 1024, 1024, 16, 24),
}


def _openclip_convnext(timm_name: str, image_size: int, head: str, embed_dim: int,
                       text_width: int, text_heads: int, text_layers: int) -> CLIPConfig:
  """OpenCLIP's `convnext_*` JSON configs: timm trunk (`timm_pool: ''`, drop path 0.1) and
  the causal CLIP text tower; OpenAI preprocessing."""
  text = TextConfig(width=text_width, heads=text_heads, layers=text_layers,
                    mlp_dim=text_width * 4)
  return CLIPConfig(embed_dim=embed_dim, vision=convnext_tower(timm_name, image_size, head),
                    text=text)


def _tiny_convnext() -> CLIPConfig:
  """timm's `convnext_atto` trunk (3.4M parameters) with `tiny-demo`'s text tower: the CPU
  demo's ConvNeXt and the parity tests' small one; exports to OpenCLIP. At 32 px (feature
  maps 8, 4, 2, 1) its training step costs ~2x tiny-demo's on 2 CPU cores; at 64 px ~4x."""
  return CLIPConfig(
      embed_dim=64, vision=convnext_tower('convnext_atto', 32, drop_path=0.0),
      text=TextConfig(context_length=32, width=64, heads=4, layers=2, mlp_dim=256))


# OpenCLIP name: (embed_dim, image size, stage depths, stem width, text width, text heads)
_OPENCLIP_RESNETS: dict[str, tuple[int, int, tuple[int, ...], int, int, int]] = {
    'RN50': (1024, 224, (3, 4, 6, 3), 64, 512, 8),
    'RN101': (512, 224, (3, 4, 23, 3), 64, 512, 8),
    'RN50x4': (640, 288, (4, 6, 10, 6), 80, 640, 10),
    'RN50x16': (768, 384, (6, 8, 18, 8), 96, 768, 12),
    'RN50x64': (1024, 448, (3, 15, 36, 10), 128, 1024, 16),
}


def _openclip_resnet(embed_dim: int, image_size: int, depths: tuple[int, ...], width: int,
                     text_width: int, text_heads: int, quick_gelu: bool = False) -> CLIPConfig:
  """OpenCLIP's `RN*` JSON configs: ModifiedResNet (attention-pool heads: 32 x width / 64,
  OpenCLIP's head_width 64) and the 12-layer causal CLIP text tower; OpenAI preprocessing.
  `quick_gelu` (the `-quickgelu` names) changes the text tower only: the ResNet uses ReLU."""
  vision = ResNetConfig(image_size=image_size, depths=depths, width=width, heads=width // 2)
  text = TextConfig(width=text_width, heads=text_heads, layers=12, mlp_dim=text_width * 4,
                    act='quick_gelu' if quick_gelu else 'gelu')
  return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


def _tiny_resnet() -> CLIPConfig:
  """A ModifiedResNet of one block per stage, stem width 16 (attention pool 512 wide, 8
  heads) at 32 px (final grid 1x1), with `tiny-demo`'s text tower: the CPU demo's ResNet and
  the parity tests' small one; exports to OpenCLIP."""
  return CLIPConfig(
      embed_dim=64, vision=ResNetConfig(image_size=32, depths=(1, 1, 1, 1), width=16, heads=8),
      text=TextConfig(context_length=32, width=64, heads=4, layers=2, mlp_dim=256))


# --- timm Eva trunks: PE-Core and EVA-01/02 ---------------------------------------------------

# PE-Core (timm `vit_pe_core_*`): (image, patch, width, layers, heads, mlp_dim, class token,
# rope offset). Pre-norm (`norm_pre`), no patch bias, fused qkv with bias, GELU MLP, rope on
# an xy grid, MAP head (8 heads, 4x MLP), LayerNorm eps 1e-5; `ref_feat_shape` is the grid.
_TIMM_PE_CORES: dict[str, tuple[int, int, int, int, int, int, bool, float]] = {
    'vit_pe_core_tiny_patch16_384': (384, 16, 192, 12, 3, 768, True, 1.0),
    'vit_pe_core_small_patch16_384': (384, 16, 384, 12, 6, 1536, True, 1.0),
    'vit_pe_core_base_patch16_224': (224, 16, 768, 12, 12, 3072, True, 1.0),
    'vit_pe_core_large_patch14_336': (336, 14, 1024, 24, 16, 4096, True, 1.0),
    'vit_pe_core_gigantic_patch14_448': (448, 14, 1536, 50, 16, 8960, False, 0.0),
}
# EVA (timm `eva02_*_clip_*`, `eva_giant_*`): (image, patch, width, layers, heads, mlp_dim).
# Class token, patch bias, q/v biases only, token pooling, LayerNorm eps 1e-6. EVA-02 B/L:
# rope on an ij grid scaled to 16 (`ref_feat_shape`), attention-output norm, SwiGLU with a
# hidden norm; EVA-02 E: post-norm blocks, GELU MLP, no rope; EVA-01 g: a pre-norm GELU ViT.
_TIMM_EVA02S: dict[str, tuple[int, int, int, int, int, int]] = {
    'eva02_base_patch16_clip_224': (224, 16, 768, 12, 12, 2048),
    'eva02_large_patch14_clip_224': (224, 14, 1024, 24, 16, 2730),
    'eva02_large_patch14_clip_336': (336, 14, 1024, 24, 16, 2730),
}
_TIMM_EVA_PLAIN: dict[str, tuple[int, int, int, int, int, int, bool]] = {  # + post_norm
    'eva02_enormous_patch14_clip_224': (224, 14, 1792, 64, 16, 15360, True),
    'eva_giant_patch14_224': (224, 14, 1408, 40, 16, 6144, False),
}


def eva_tower(timm_name: str) -> EvaConfig:
  """timm's `timm_name` Eva trunk as OpenCLIP builds it (`timm_proj: null`: timm's head is
  the projection, with bias)."""
  if timm_name in _TIMM_PE_CORES:
    image, patch, width, layers, heads, mlp, cls, offset = _TIMM_PE_CORES[timm_name]
    return EvaConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=heads,
                     mlp_dim=mlp, class_token=cls, pool='map', ln_pre=True, patch_bias=False,
                     norm_eps=1e-5, rope=True, rope_offset=offset, rope_xy=True,
                     rope_ref_grid=image // patch, timm_model_name=timm_name)
  eva: dict[str, Any] = dict(class_token=True, pool='tok', ln_pre=False, patch_bias=True,
                             norm_eps=1e-6, qkv_bias='qv', timm_model_name=timm_name)
  if timm_name in _TIMM_EVA02S:
    image, patch, width, layers, heads, mlp = _TIMM_EVA02S[timm_name]
    return EvaConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=heads,
                     mlp_dim=mlp, act='silu', gated_mlp=True, mlp_norm=True, attn_norm=True,
                     rope=True, rope_ref_grid=16, qkv_fused=False, **eva)
  image, patch, width, layers, heads, mlp, post_norm = _TIMM_EVA_PLAIN[timm_name]
  return EvaConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=heads,
                   mlp_dim=mlp, rope=False, post_norm=post_norm, **eva)


def timm_evas() -> list[str]:
  """The timm Eva trunks clip_jax builds (OpenCLIP's `timm_model_name`)."""
  return [*_TIMM_PE_CORES, *_TIMM_EVA02S, *_TIMM_EVA_PLAIN]


# OpenCLIP name: (timm trunk, embed_dim, text context, width, heads, layers). Both families
# use OpenCLIP's causal CLIP text tower under `text.` (`custom_text`), pooled at the EOT token.
_OPENCLIP_EVAS: dict[str, tuple[str, int, int, int, int, int]] = {
    'PE-Core-T-16-384': ('vit_pe_core_tiny_patch16_384', 512, 32, 512, 8, 12),
    'PE-Core-S-16-384': ('vit_pe_core_small_patch16_384', 512, 32, 512, 8, 12),
    'PE-Core-B-16': ('vit_pe_core_base_patch16_224', 1024, 32, 1024, 16, 24),
    'PE-Core-L-14-336': ('vit_pe_core_large_patch14_336', 1024, 32, 1024, 16, 24),
    'PE-Core-bigG-14-448': ('vit_pe_core_gigantic_patch14_448', 1280, 72, 1280, 20, 24),
    'EVA02-B-16': ('eva02_base_patch16_clip_224', 512, 77, 512, 8, 12),
    'EVA02-L-14': ('eva02_large_patch14_clip_224', 768, 77, 768, 12, 12),
    'EVA02-L-14-336': ('eva02_large_patch14_clip_336', 768, 77, 768, 12, 12),
    'EVA02-E-14': ('eva02_enormous_patch14_clip_224', 1024, 77, 1024, 16, 24),
    'EVA02-E-14-plus': ('eva02_enormous_patch14_clip_224', 1024, 77, 1280, 20, 32),
    'EVA01-g-14': ('eva_giant_patch14_224', 1024, 77, 768, 12, 12),
    'EVA01-g-14-plus': ('eva_giant_patch14_224', 1024, 77, 1024, 16, 24),
}
# PE-Core's released weights (OpenCLIP's pretrained cfg, tag 'meta'): SigLIP-style inputs,
# squashed and bilinear. EVA's: OpenAI's mean and std, shortest side, bicubic (the default).
_PE_PREPROCESS = PreprocessConfig(mean=INCEPTION_MEAN, std=INCEPTION_STD, resize_mode='squash',
                                  interpolation='bilinear')


def _openclip_eva(timm_name: str, embed_dim: int, context: int, text_width: int,
                  text_heads: int, text_layers: int) -> CLIPConfig:
  text = TextConfig(context_length=context, width=text_width, heads=text_heads,
                    layers=text_layers, mlp_dim=text_width * 4)
  pe = timm_name in _TIMM_PE_CORES
  return CLIPConfig(embed_dim=embed_dim, vision=eva_tower(timm_name), text=text, custom_text=True,
                    preprocess=_PE_PREPROCESS if pe else PreprocessConfig())


def _tiny_pe_core() -> CLIPConfig:
  """A 2-layer PE-Core (every PE option: pre-norm, rope on an xy grid offset by 1, MAP head
  with 8 heads, head with bias) at 64 px with `tiny-demo`'s text tower: the CPU demo's and the
  parity tests' small Eva. clip_jax's own shape: timm names no trunk this small, and
  OpenCLIP builds timm towers by name only, so it does not export (PE-Core-T-16-384 does)."""
  vision = EvaConfig(image_size=64, patch_size=16, width=128, layers=2, heads=4, mlp_dim=512,
                     pool='map', ln_pre=True, patch_bias=False, norm_eps=1e-5, rope_offset=1.0,
                     rope_xy=True, timm_model_name=None)
  return CLIPConfig(embed_dim=64, vision=vision, custom_text=True, preprocess=_PE_PREPROCESS,
                    text=TextConfig(context_length=32, width=64, heads=4, layers=2, mlp_dim=256))


def _tiny_eva02() -> CLIPConfig:
  """A 2-layer EVA-02 (SwiGLU MLP with its sub-LayerNorm, normed attention output, rope on
  the 4x4 grid, class token, q/v biases) at 64 px with `tiny-demo`'s text tower: the CPU
  demo's EVA-02. Like `tiny-pe-core` it is clip_jax's own shape and does not export
  (EVA02-B-16 does)."""
  vision = EvaConfig(image_size=64, patch_size=16, width=128, layers=2, heads=4, mlp_dim=341,
                     act='silu', gated_mlp=True, mlp_norm=True, attn_norm=True, rope=True,
                     rope_ref_grid=4, qkv_fused=False, class_token=True, pool='tok',
                     ln_pre=False, patch_bias=True, norm_eps=1e-6, qkv_bias='qv',
                     timm_model_name=None)
  return CLIPConfig(embed_dim=64, vision=vision, custom_text=True,
                    text=TextConfig(context_length=32, width=64, heads=4, layers=2, mlp_dim=256))


def _build_presets() -> dict[str, CLIPConfig]:
  presets = {name: _openclip_vit(*args) for name, args in _OPENCLIP_VITS.items()}
  for name in _QUICKGELU:
    presets[f'{name}-quickgelu'] = _openclip_vit(*_OPENCLIP_VITS[name], quick_gelu=True)
  for name, (base, embed, t_heads, ls) in _LAYER_SCALE.items():
    _, image, patch, width, layers, head_width, mlp_ratio, _, _, t_layers = _OPENCLIP_VITS[base]
    presets[name] = _openclip_vit(embed, image, patch, width, layers, head_width, mlp_ratio,
                                  embed, t_heads, t_layers, ls_init=ls)
  presets.update(_siglip_presets())
  presets['tiny'] = _tiny()
  presets['tiny-quickgelu'] = _tiny('quick_gelu')
  presets['tiny-demo'] = _tiny_demo()
  presets['coca_ViT-B-32'] = _coca(512, 224, 32, 768, 12, 512, 8)
  presets['coca_ViT-L-14'] = _coca(768, 224, 14, 1024, 24, 768, 12)
  presets['coca_base'] = _coca(512, 288, 18, 768, 12, 768, 12, vocab=64000, pool_heads=None)
  presets['tiny-coca'] = _tiny_coca()
  presets.update({name: _openclip_convnext(*args) for name, args in _OPENCLIP_CONVNEXTS.items()})
  presets['tiny-convnext'] = _tiny_convnext()
  for name, args in _OPENCLIP_RESNETS.items():
    presets[name] = _openclip_resnet(*args)
    presets[f'{name}-quickgelu'] = _openclip_resnet(*args, quick_gelu=True)
  presets['tiny-resnet'] = _tiny_resnet()
  presets.update({name: _openclip_eva(*args) for name, args in _OPENCLIP_EVAS.items()})
  presets['tiny-pe-core'] = _tiny_pe_core()
  presets['tiny-eva02'] = _tiny_eva02()
  presets['naflexvit_base_patch16_siglip'] = _naflex('naflexvit_base_patch16_siglip',
                                                     'ViT-B-16-SigLIP2-256')
  presets['naflexvit_so400m_patch16_siglip'] = _naflex('naflexvit_so400m_patch16_siglip',
                                                       'ViT-SO400M-16-SigLIP2-256')
  presets['tiny-naflex'] = _tiny_naflex()
  return presets


PRESETS: dict[str, CLIPConfig] = _build_presets()


def list_models() -> list[str]:
  return sorted(PRESETS)


# OpenCLIP 3.3 model names of families clip_jax does not build yet: (pattern, family).
UNBUILT_FAMILIES = (
    (r'^MobileCLIP', 'MobileCLIP'),
    (r'^ViTamin-', 'ViTamin'),
    (r'-CLIPA', 'CLIPA'),
    (r'-worldwide', 'MetaCLIP 2 worldwide'),
    (r'roberta|mt5|nllb', 'Hugging Face text tower'),
    (r'^swin_', 'timm Swin'),
    (r'^vit_(medium|relpos)', 'timm ViT variants'),
)


def unbuilt_family(name: str) -> str | None:
  """The family of an OpenCLIP model name clip_jax does not build yet (None otherwise)."""
  return next((family for pattern, family in UNBUILT_FAMILIES if re.search(pattern, name)), None)


def get_config(name: str, **overrides: Any) -> CLIPConfig:
  """The preset `name` with overrides; unknown names list the closest matches, and an
  OpenCLIP name of a family not built yet says which family."""
  if name not in PRESETS:
    family = unbuilt_family(name)
    if family:
      close = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.0)
      raise ValueError(f'{name!r} is an OpenCLIP {family} model, a family clip_jax does not '
                       f'build yet. Nearest presets that build: {", ".join(close)}. See '
                       'clip_jax.list_models().')
    close = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.5)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    raise ValueError(f'Unknown model preset {name!r}.{hint} See clip_jax.list_models().')
  return PRESETS[name].replace(**overrides).validate()
