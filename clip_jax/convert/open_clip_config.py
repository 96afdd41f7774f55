"""Writes OpenCLIP's `open_clip_config.json` (model_cfg + preprocess_cfg) for a CLIPConfig.

OpenCLIP can only express some architectures; anything it cannot build exactly raises
`UnsupportedForOpenCLIP` naming the field, never a silently different model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clip_jax.models.config import (
  CLIPConfig,
  ConvNeXtConfig,
  DecoderConfig,
  EvaConfig,
  ResNetConfig,
  TextConfig,
  VisionConfig,
)


class UnsupportedForOpenCLIP(ValueError):
  pass


def _mlp_ratio(mlp_dim: int, width: int) -> float:
  """A ratio for which OpenCLIP's int(width * ratio) gives back exactly mlp_dim."""
  for ratio in (round(mlp_dim / width, 4), mlp_dim / width, (mlp_dim + 0.5) / width):
    if int(width * ratio) == mlp_dim:
      return ratio
  raise UnsupportedForOpenCLIP(f'mlp_dim {mlp_dim} cannot be written as a ratio of {width}')


def _act_kwargs(act: str) -> dict[str, Any]:
  return {'act_kwargs': {'approximate': 'tanh'}} if act == 'gelu_tanh' else {}


def _norm_kwargs(eps: float) -> dict[str, Any]:
  return {'norm_kwargs': {'eps': eps}} if eps != 1e-5 else {}


def _quick_gelu(cfg: CLIPConfig) -> bool:
  """OpenCLIP's quick_gelu flag is global to both native towers (timm ignores it)."""
  v = cfg.vision
  acts = {cfg.text.act} | ({v.act} if isinstance(v, VisionConfig) and not v.timm_model_name
                           else set())
  if 'quick_gelu' in acts and len(acts) > 1:
    raise UnsupportedForOpenCLIP(f'OpenCLIP needs quick_gelu in both towers or neither; got {acts}')
  return acts == {'quick_gelu'}


def _native_vision(v: VisionConfig) -> dict[str, Any]:
  if not v.class_token or v.pool == 'map' or v.patch_bias:
    raise UnsupportedForOpenCLIP(
        'OpenCLIP\'s native ViT needs vision.class_token=True, vision.pool in (tok, gap) and '
        'vision.patch_bias=False; a MAP/no-class-token tower needs vision.timm_model_name.')
  if not v.proj:
    raise UnsupportedForOpenCLIP('OpenCLIP\'s native ViT always has a projection (vision.proj).')
  out = dict(image_size=v.image_size, layers=v.layers, width=v.width, head_width=v.head_dim,
             mlp_ratio=_mlp_ratio(v.mlp_dim, v.width), patch_size=v.patch_size,
             pool_type={'tok': 'tok', 'gap': 'avg'}[v.pool], no_ln_pre=not v.ln_pre,
             **_act_kwargs(v.act), **_norm_kwargs(v.norm_eps))
  if v.ls_init is not None:
    out['ls_init_value'] = v.ls_init
  if v.attn_pool_queries:
    out.update(attentional_pool=True, attn_pooler_queries=v.attn_pool_queries,
               attn_pooler_heads=v.attn_pool_heads)
  return {**out, **_patch_dropout(v)}


def _patch_dropout(v: VisionConfig) -> dict[str, Any]:
  """OpenCLIP drops patches in training mode only, as clip_jax does with keys only."""
  return {'patch_dropout': v.patch_dropout} if v.patch_dropout else {}


def _timm_vision(cfg: CLIPConfig) -> dict[str, Any]:
  from clip_jax.models.presets import PRESETS
  assert isinstance(cfg.vision, VisionConfig)
  # Training and execution options only: timm takes them apart.
  v = dataclasses.replace(cfg.vision, patch_dropout=0.0, scan_unroll=1)
  reference = next((p.vision for p in PRESETS.values() if p.vision == v), None)
  if reference is None:
    known = [p.vision for p in PRESETS.values() if p.vision.timm_model_name == v.timm_model_name]
    diff = ([f'{f.name}={getattr(v, f.name)} (timm: {getattr(known[0], f.name)})'
             for f in dataclasses.fields(v) if getattr(v, f.name) != getattr(known[0], f.name)]
            if known else [f'unknown timm model {v.timm_model_name!r}'])
    raise UnsupportedForOpenCLIP(
        f'The vision tower differs from timm\'s {v.timm_model_name}: {", ".join(diff)}. '
        'OpenCLIP builds timm towers by name only.')
  if v.width != cfg.embed_dim:
    raise UnsupportedForOpenCLIP('A timm MAP tower without projection needs width == embed_dim.')
  return dict(image_size=v.image_size, timm_model_name=v.timm_model_name,
              timm_model_pretrained=False, timm_pool='map', timm_proj='none',
              **_patch_dropout(cfg.vision))


def _convnext_vision(v: ConvNeXtConfig) -> dict[str, Any]:
  """OpenCLIP's TimmModel over timm's trunk, which it builds by `timm_model_name` alone:
  the rest of the tower must be that trunk's architecture."""
  from clip_jax.models.presets import convnext_tower, timm_convnexts
  if v.timm_model_name not in timm_convnexts():
    raise UnsupportedForOpenCLIP(
        f'vision.timm_model_name={v.timm_model_name!r} is not a timm ConvNeXt clip_jax knows '
        f'({", ".join(timm_convnexts())}); OpenCLIP builds timm towers by name only.')
  reference = convnext_tower(v.timm_model_name, v.image_size, v.head_proj, v.drop_path)
  # Not architecture: the execution option, and LayerScale's initial value (timm's gammas
  # exist whenever ls_init is set; their trained values are in the weights).
  reference = dataclasses.replace(
      reference, proj_bias=v.proj_bias, scan_unroll=v.scan_unroll,
      ls_init=reference.ls_init if v.ls_init is None else v.ls_init)
  diff = [f'vision.{f.name}={getattr(v, f.name)} (timm: {getattr(reference, f.name)})'
          for f in dataclasses.fields(v) if getattr(v, f.name) != getattr(reference, f.name)]
  if diff:
    raise UnsupportedForOpenCLIP(
        f'The vision tower differs from timm\'s {v.timm_model_name}: {", ".join(diff)}. '
        'OpenCLIP builds timm towers by name only.')
  out = dict(timm_model_name=v.timm_model_name, timm_model_pretrained=False, timm_pool='',
             timm_proj=v.head_proj, timm_drop=0.0, timm_drop_path=v.drop_path,
             image_size=v.image_size)
  if v.proj_bias:
    out['timm_proj_bias'] = True
  return out


def _resnet_vision(v: ResNetConfig) -> dict[str, Any]:
  """OpenCLIP's ModifiedResNet: `layers` as a list, the attention pool's heads as
  32 x width // head_width (default 64). `sync_bn` is a training option, not exported."""
  head_width = v.features // v.heads
  out: dict[str, Any] = dict(image_size=v.image_size, layers=list(v.depths), width=v.width,
                             patch_size=None)
  if head_width != 64:
    out['head_width'] = head_width
  return out


def _eva_vision(v: EvaConfig) -> dict[str, Any]:
  """OpenCLIP's TimmModel over timm's Eva trunk, built by `timm_model_name` alone with timm's
  classifier as the projection (`timm_proj: null`): the tower must be that trunk's."""
  from clip_jax.models.presets import eva_tower, timm_evas
  if v.timm_model_name not in timm_evas():
    raise UnsupportedForOpenCLIP(
        f'vision.timm_model_name={v.timm_model_name!r} is not a timm Eva trunk clip_jax knows '
        f'({", ".join(timm_evas())}); OpenCLIP builds timm towers by name only.')
  # Training and execution options only: timm takes them apart (patch dropout: below).
  reference = dataclasses.replace(eva_tower(v.timm_model_name), patch_dropout=v.patch_dropout,
                                  scan_unroll=v.scan_unroll)
  diff = [f'vision.{f.name}={getattr(v, f.name)} (timm: {getattr(reference, f.name)})'
          for f in dataclasses.fields(v) if getattr(v, f.name) != getattr(reference, f.name)]
  if diff:
    raise UnsupportedForOpenCLIP(
        f'The vision tower differs from timm\'s {v.timm_model_name}: {", ".join(diff)}. '
        'OpenCLIP builds timm towers by name only.')
  return dict(image_size=v.image_size, timm_model_name=v.timm_model_name,
              timm_model_pretrained=False, timm_pool='map' if v.pool == 'map' else 'token',
              timm_proj=None, **_patch_dropout(v))


def _text(t: TextConfig) -> dict[str, Any]:
  if t.pool == 'mean':
    raise UnsupportedForOpenCLIP("OpenCLIP's text tower has no 'mean' pooling (text.pool).")
  out = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
             heads=t.heads, layers=t.layers, mlp_ratio=_mlp_ratio(t.mlp_dim, t.width),
             no_causal_mask=not t.causal, pool_type=t.pool, proj_bias=t.proj_bias,
             proj_type='linear' if t.proj else 'none', pad_id=t.pad_id,
             **_act_kwargs(t.act), **_norm_kwargs(t.norm_eps))
  if t.ls_init is not None:
    out['ls_init_value'] = t.ls_init
  if t.embed_cls:
    out['embed_cls'] = True
  if t.hf_tokenizer_name:
    out.update(hf_tokenizer_name=t.hf_tokenizer_name, tokenizer_kwargs={'clean': 'canonicalize'})
  return out


def _multimodal(d: DecoderConfig, act: str, pool_heads: int, pool_queries: int) -> dict[str, Any]:
  """CoCa's `multimodal_cfg`. OpenCLIP builds the decoder's activation from the global
  `quick_gelu` flag and its LayerNorm with the default eps, so those must match."""
  if d.act != act or d.norm_eps != 1e-5:
    raise UnsupportedForOpenCLIP('OpenCLIP\'s CoCa decoder takes the text tower\'s activation '
                                 'and LayerNorm eps 1e-5 (decoder.act, decoder.norm_eps).')
  return dict(width=d.width, heads=d.heads, layers=d.layers, context_length=d.context_length,
              vocab_size=d.vocab_size, mlp_ratio=_mlp_ratio(d.mlp_dim, d.width),
              attn_pooler_heads=pool_heads, n_queries=pool_queries or 256)


def model_cfg(cfg: CLIPConfig) -> dict[str, Any]:
  v = cfg.vision
  if isinstance(v, ConvNeXtConfig):
    vision = _convnext_vision(v)
  elif isinstance(v, ResNetConfig):
    vision = _resnet_vision(v)
  elif isinstance(v, EvaConfig):
    vision = _eva_vision(v)
  else:
    vision = _timm_vision(cfg) if v.timm_model_name else _native_vision(v)
  text = _text(cfg.text)
  coca = cfg.decoder is not None and not cfg.decoder.embed_tokens  # LocCa's is not exported
  if coca:  # both towers return their tokens
    vision['output_tokens'] = text['output_tokens'] = True
  out = dict(embed_dim=cfg.embed_dim, quick_gelu=_quick_gelu(cfg), vision_cfg=vision,
             text_cfg=text, init_logit_scale=cfg.init_logit_scale)
  if coca and cfg.decoder is not None and isinstance(v, VisionConfig):
    out['multimodal_cfg'] = _multimodal(cfg.decoder, cfg.text.act, v.attn_pool_heads,
                                        v.attn_pool_queries)
  if cfg.custom_text:
    out['custom_text'] = True
  if cfg.init_logit_bias is not None:
    out['init_logit_bias'] = cfg.init_logit_bias
  return out


def preprocess_cfg(cfg: CLIPConfig) -> dict[str, Any]:
  p = cfg.preprocess
  return dict(size=cfg.vision.image_size, mode='RGB', mean=list(p.mean), std=list(p.std),
              interpolation=p.interpolation, resize_mode=p.resize_mode, fill_color=0)


def open_clip_config(cfg: CLIPConfig) -> dict[str, Any]:
  return {'model_cfg': model_cfg(cfg), 'preprocess_cfg': preprocess_cfg(cfg)}
