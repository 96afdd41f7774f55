"""OpenCLIP state_dict <-> clip_jax params, both directions, driven by one rule table.

Each `Rule` names an OpenCLIP key (with `{i}` for per-layer keys, stacked on our leading
layer axis), our parameter path, and how the array is laid out on each side. The same
table drives import, export and the missing/extra/mis-shaped key checks, so the two
directions cannot drift apart. Arrays are numpy; torch is not needed here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from clip_jax.models.config import (
  CLIPConfig,
  ConvNeXtConfig,
  DecoderConfig,
  EvaConfig,
  ResNetConfig,
  TextConfig,
  VisionConfig,
)

Params = dict[str, Any]  # nested dict of arrays, as nnx.to_pure_dict returns


class CheckpointMismatchError(ValueError):
  """A state_dict does not fit the model: lists every missing, extra and mis-shaped key."""


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_key: str   # '{i}' marks a per-layer key
  ours: str        # '/'-joined path in the params tree
  layout: str = 'same'  # same | linear | linear2 | conv | conv1x1 | flat | batch1 | count
  #                       | token
  first: int = 0   # the torch index of our stacked layer 0 ('{i}' keys)
  # linear:  torch [out, in]        <-> ours [in, *out]   (e.g. qkv [D, 3, H, hd])
  # linear2: torch [out, in]        <-> ours [*in(2), out] (e.g. attn out [H, hd, D])
  # conv:    torch OIHW             <-> ours HWIO
  # conv1x1: torch [out, in, 1, 1]  <-> ours [in, out] (timm's conv_mlp ConvNeXt MLPs)
  # flat:    torch 1-D              <-> ours N-D (packed biases)
  # batch1:  torch [1, *shape]      <-> ours shape (timm pos_embed, latent)
  # count:   torch int64 scalar     <-> ours int32 (BatchNorm's num_batches_tracked)
  # token:   torch [1, 1, d]        <-> ours [d] (timm cls_token)
  # grid:    torch [1, g, g, d]     <-> ours [g*g, d] (timm NaFlex pos_embed)
  # `part` (axis, index): the key is one slice of a packed parameter of ours, at `index`
  # along its (per-layer) `axis`: timm's separate q_proj/k_proj/v_proj, q_bias/v_bias.
  part: tuple[int, int] | None = None


def to_ours(layout: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if layout == 'count':
    if w.shape != tuple(shape):
      raise ValueError(f'shape {w.shape} is not {shape}')
    return np.asarray(w, np.int64).astype(np.int32)
  if layout == 'conv1x1':
    if w.ndim != 4 or w.shape[2:] != (1, 1):
      raise ValueError(f'shape {w.shape} is not a 1x1 conv')
    w = w[:, :, 0, 0].T
  if layout in ('linear', 'linear2'):
    w = w.T
  elif layout == 'conv':
    w = w.transpose(2, 3, 1, 0)
  if w.size != math.prod(shape):
    raise ValueError(f'size {w.size} cannot hold {shape}')
  return np.array(w.reshape(shape), order="C")


def to_torch(layout: str, a: np.ndarray) -> np.ndarray:
  if layout == 'count':
    return np.asarray(a, np.int64)
  if layout == 'linear':
    return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)
  if layout == 'linear2':
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
  if layout == 'conv':
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
  if layout == 'conv1x1':
    return np.ascontiguousarray(a.T[:, :, None, None])
  if layout == 'flat':
    return a.reshape(-1)
  if layout == 'batch1':
    return a[None]
  if layout == 'token':
    return a[None, None]
  if layout == 'grid':
    return a.reshape(1, math.isqrt(a.shape[0]), math.isqrt(a.shape[0]), a.shape[1])
  return a


def torch_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The OpenCLIP shape of one (per-layer) parameter of ours, without touching data."""
  if layout == 'linear':
    return (math.prod(shape[1:]), shape[0])
  if layout == 'linear2':
    return (shape[-1], math.prod(shape[:-1]))
  if layout == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  if layout == 'conv1x1':
    return (shape[1], shape[0], 1, 1)
  if layout == 'flat':
    return (math.prod(shape),)
  if layout == 'batch1':
    return (1, *shape)
  if layout == 'token':
    return (1, 1, *shape)
  if layout == 'grid':
    return (1, math.isqrt(shape[0]), math.isqrt(shape[0]), shape[1])
  return tuple(shape)


def _ln(torch_prefix: str, ours: str) -> list[Rule]:
  return [Rule(f'{torch_prefix}.weight', f'{ours}/scale'),
          Rule(f'{torch_prefix}.bias', f'{ours}/bias')]


def _linear(torch_prefix: str, ours: str, layout: str = 'linear', bias: bool = True) -> list[Rule]:
  rules = [Rule(f'{torch_prefix}.weight', f'{ours}/kernel', layout)]
  return rules + ([Rule(f'{torch_prefix}.bias', f'{ours}/bias', 'flat')] if bias else [])


def _openclip_block(t: str, o: str, ls: bool) -> list[Rule]:
  rules = (_ln(f'{t}.ln_1', f'{o}/ln_1') + [
      Rule(f'{t}.attn.in_proj_weight', f'{o}/attn/qkv/kernel', 'linear'),
      Rule(f'{t}.attn.in_proj_bias', f'{o}/attn/qkv/bias', 'flat')]
           + _linear(f'{t}.attn.out_proj', f'{o}/attn/out', 'linear2')
           + _ln(f'{t}.ln_2', f'{o}/ln_2') + _linear(f'{t}.mlp.c_fc', f'{o}/mlp/fc1')
           + _linear(f'{t}.mlp.c_proj', f'{o}/mlp/fc2'))
  if ls:
    rules += [Rule(f'{t}.ls_1.gamma', f'{o}/ls_1/gamma'),
              Rule(f'{t}.ls_2.gamma', f'{o}/ls_2/gamma')]
  return rules


def _timm_block(t: str, o: str) -> list[Rule]:
  return (_ln(f'{t}.norm1', f'{o}/ln_1') + _linear(f'{t}.attn.qkv', f'{o}/attn/qkv')
          + _linear(f'{t}.attn.proj', f'{o}/attn/out', 'linear2') + _ln(f'{t}.norm2', f'{o}/ln_2')
          + _linear(f'{t}.mlp.fc1', f'{o}/mlp/fc1') + _linear(f'{t}.mlp.fc2', f'{o}/mlp/fc2'))


def _openclip_vision_rules(v: VisionConfig) -> list[Rule]:
  rules = [Rule('visual.conv1.weight', 'visual/patch_embed/kernel', 'conv'),
           Rule('visual.class_embedding', 'visual/cls_token'),
           Rule('visual.positional_embedding', 'visual/pos_embed')]
  if v.ln_pre:
    rules += _ln('visual.ln_pre', 'visual/ln_pre')
  rules += _openclip_block('visual.transformer.resblocks.{i}', 'visual/transformer/blocks',
                           v.ls_init is not None)
  if v.attn_pool_queries:
    rules += _attentional_pooler_rules('visual.attn_pool', 'visual/attn_pool')
  rules += _ln('visual.ln_post', 'visual/ln_post')
  return rules + ([Rule('visual.proj', 'visual/proj')] if v.proj else [])


def _attentional_pooler_rules(t: str, o: str) -> list[Rule]:
  """CoCa's pooler: torch's MultiheadAttention with kdim != embed_dim keeps q, k, v weights
  apart and their biases packed."""
  return ([Rule(f'{t}.query', f'{o}/query')]
          + [Rule(f'{t}.attn.{x}_proj_weight', f'{o}/{x}/kernel', 'linear') for x in 'qkv']
          + [Rule(f'{t}.attn.in_proj_bias', f'{o}/in_bias', 'flat')]
          + _linear(f'{t}.attn.out_proj', f'{o}/out', 'linear2')
          + _ln(f'{t}.ln_q', f'{o}/ln_q') + _ln(f'{t}.ln_k', f'{o}/ln_k'))


def _timm_vision_rules(v: VisionConfig) -> list[Rule]:
  """timm's SigLIP trunk; NaFlex (`naflexvit_*`) embeds flattened (row, column, channel)
  patches with a Linear (`embeds.proj`: our patch kernel read as [P*P*3, width]) and keeps
  its position table as a [1, g, g, width] grid."""
  t = 'visual.trunk'
  if v.naflex:
    embed = [Rule(f'{t}.embeds.proj.weight', 'visual/patch_embed/kernel', 'linear2'),
             Rule(f'{t}.embeds.proj.bias', 'visual/patch_embed/bias'),
             Rule(f'{t}.embeds.pos_embed', 'visual/pos_embed', 'grid')]
  else:
    embed = [Rule(f'{t}.patch_embed.proj.weight', 'visual/patch_embed/kernel', 'conv'),
             Rule(f'{t}.patch_embed.proj.bias', 'visual/patch_embed/bias'),
             Rule(f'{t}.pos_embed', 'visual/pos_embed', 'batch1')]
  return (embed
          + _timm_block(f'{t}.blocks.{{i}}', 'visual/transformer/blocks')
          + _ln(f'{t}.norm', 'visual/ln_post')
          + _map_head_rules(f'{t}.attn_pool', 'visual/map_head'))


def _map_head_rules(t: str, o: str) -> list[Rule]:
  """timm's `AttentionPoolLatent` (SigLIP's, PE-Core's)."""
  return ([Rule(f'{t}.latent', f'{o}/latent', 'batch1')]
          + _linear(f'{t}.q', f'{o}/q') + _linear(f'{t}.kv', f'{o}/kv')
          + _linear(f'{t}.proj', f'{o}/out', 'linear2') + _ln(f'{t}.norm', f'{o}/norm')
          + _linear(f'{t}.mlp.fc1', f'{o}/mlp/fc1') + _linear(f'{t}.mlp.fc2', f'{o}/mlp/fc2'))


def _convnext_vision_rules(v: ConvNeXtConfig) -> list[Rule]:
  """timm's ConvNeXt trunk (`visual.trunk.*`) and OpenCLIP's head (`visual.head.*`);
  `stages.S.blocks.{i}` stack on our per-stage block axis."""
  t = 'visual.trunk'
  mlp = 'conv1x1' if v.conv_mlp else 'linear'
  rules = ([Rule(f'{t}.stem.0.weight', 'visual/stem/kernel', 'conv'),
            Rule(f'{t}.stem.0.bias', 'visual/stem/bias')] + _ln(f'{t}.stem.1', 'visual/stem_norm'))
  for stage in range(len(v.depths)):
    o, ts = f'visual/stage{stage}', f'{t}.stages.{stage}'
    if stage:
      rules += (_ln(f'{ts}.downsample.0', f'{o}/down_norm')
                + [Rule(f'{ts}.downsample.1.weight', f'{o}/down/kernel', 'conv'),
                   Rule(f'{ts}.downsample.1.bias', f'{o}/down/bias')])
    b, ob = f'{ts}.blocks.{{i}}', f'{o}/blocks'
    rules += ([Rule(f'{b}.conv_dw.weight', f'{ob}/conv_dw/kernel', 'conv'),
               Rule(f'{b}.conv_dw.bias', f'{ob}/conv_dw/bias')]
              + _ln(f'{b}.norm', f'{ob}/norm')
              + _linear(f'{b}.mlp.fc1', f'{ob}/mlp/fc1', mlp)
              + _linear(f'{b}.mlp.fc2', f'{ob}/mlp/fc2', mlp))
    if v.ls_init is not None:
      rules.append(Rule(f'{b}.gamma', f'{ob}/gamma'))
  rules += _ln(f'{t}.head.norm', 'visual/head_norm')
  if v.head_proj == 'linear':
    return rules + _linear('visual.head.proj', 'visual/proj', bias=v.proj_bias)
  return (rules + _linear('visual.head.mlp.fc1', 'visual/head_mlp/fc1')
          + _linear('visual.head.mlp.fc2', 'visual/head_mlp/fc2', bias=v.proj_bias))


def _bn(torch_prefix: str, ours: str, first: int = 0) -> list[Rule]:
  """torch's BatchNorm2d: weight and bias (params), running statistics (ours: BatchStats)."""
  names = (('weight', 'scale', 'same'), ('bias', 'bias', 'same'), ('running_mean', 'mean', 'same'),
           ('running_var', 'var', 'same'), ('num_batches_tracked', 'count', 'count'))
  return [Rule(f'{torch_prefix}.{t}', f'{ours}/{o}', layout, first) for t, o, layout in names]


def _conv_bn(conv: str, bn: str, ours: str, first: int = 0) -> list[Rule]:
  return [Rule(f'{conv}.weight', f'{ours}/conv/kernel', 'conv', first)] + _bn(bn, f'{ours}/bn',
                                                                             first)


def _bottleneck(t: str, o: str, first: int = 0, downsample: bool = False) -> list[Rule]:
  rules = [r for k in (1, 2, 3) for r in _conv_bn(f'{t}.conv{k}', f'{t}.bn{k}', f'{o}/conv{k}',
                                                  first)]
  if downsample:
    rules += _conv_bn(f'{t}.downsample.0', f'{t}.downsample.1', f'{o}/downsample', first)
  return rules


def _resnet_vision_rules(v: ResNetConfig) -> list[Rule]:
  """OpenCLIP's ModifiedResNet (`visual.conv1`... `visual.layerS.N.*`, `visual.attnpool.*`).
  Block 0 of a stage is our `first` (with its downsample branch); blocks 1... stack on our
  `blocks` axis (torch index = ours + 1)."""
  rules = [r for k in (1, 2, 3)
           for r in _conv_bn(f'visual.conv{k}', f'visual.bn{k}', f'visual/stem/conv{k}')]
  for stage, depth in enumerate(v.depths, start=1):
    t, o = f'visual.layer{stage}', f'visual/layer{stage}'
    rules += _bottleneck(f'{t}.0', f'{o}/first', downsample=True)
    if depth > 1:
      rules += _bottleneck(f'{t}.{{i}}', f'{o}/blocks', first=1)
  a = 'visual.attnpool'
  rules.append(Rule(f'{a}.positional_embedding', 'visual/attnpool/pos_embed'))
  for x in 'qkv':
    rules += _linear(f'{a}.{x}_proj', f'visual/attnpool/{x}')
  return rules + _linear(f'{a}.c_proj', 'visual/attnpool/c_proj', 'linear2')


def _eva_vision_rules(v: EvaConfig) -> list[Rule]:
  """timm's Eva trunk (`visual.trunk.*`, its classifier `head` as our projection). q, k, v:
  fused `attn.qkv` (with a bias, PE-Core; or `q_bias`/`v_bias`, EVA-01, EVA-02 E) or
  separate `q_proj`/`k_proj`/`v_proj` (`qkv_fused=False`, EVA-02 B/L), all packed in ours."""
  t, b, o = 'visual.trunk', 'visual.trunk.blocks.{i}', 'visual/transformer/blocks'
  rules = [Rule(f'{t}.patch_embed.proj.weight', 'visual/patch_embed/kernel', 'conv')]
  if v.patch_bias:
    rules.append(Rule(f'{t}.patch_embed.proj.bias', 'visual/patch_embed/bias'))
  if v.class_token:
    rules.append(Rule(f'{t}.cls_token', 'visual/cls_token', 'token'))
  rules.append(Rule(f'{t}.pos_embed', 'visual/pos_embed', 'batch1'))
  if v.ln_pre:
    rules += _ln(f'{t}.norm_pre', 'visual/ln_pre')
  rules += _ln(f'{b}.norm1', f'{o}/ln_1') + _ln(f'{b}.norm2', f'{o}/ln_2')
  if v.qkv_fused:
    rules.append(Rule(f'{b}.attn.qkv.weight', f'{o}/attn/qkv/kernel', 'linear'))
  else:
    rules += [Rule(f'{b}.attn.{x}_proj.weight', f'{o}/attn/qkv/kernel', 'linear', part=(1, i))
              for i, x in enumerate('qkv')]
  if v.qkv_bias == 'qkv':
    rules.append(Rule(f'{b}.attn.qkv.bias', f'{o}/attn/qkv/bias', 'flat'))
  else:
    q, v_ = ('q_proj.bias', 'v_proj.bias') if not v.qkv_fused else ('q_bias', 'v_bias')
    rules += [Rule(f'{b}.attn.{q}', f'{o}/attn/qv_bias', 'flat', part=(0, 0)),
              Rule(f'{b}.attn.{v_}', f'{o}/attn/qv_bias', 'flat', part=(0, 1))]
  if v.attn_norm:
    rules += [Rule(f'{b}.attn.norm.weight', f'{o}/attn/norm/scale', 'flat'),
              Rule(f'{b}.attn.norm.bias', f'{o}/attn/norm/bias', 'flat')]
  rules += _linear(f'{b}.attn.proj', f'{o}/attn/out', 'linear2')
  if v.gated_mlp:
    rules += _linear(f'{b}.mlp.fc1_g', f'{o}/mlp/gate') + _linear(f'{b}.mlp.fc1_x', f'{o}/mlp/fc1')
  else:
    rules += _linear(f'{b}.mlp.fc1', f'{o}/mlp/fc1')
  if v.mlp_norm:
    rules += _ln(f'{b}.mlp.norm', f'{o}/mlp/norm')
  rules += _linear(f'{b}.mlp.fc2', f'{o}/mlp/fc2')
  if v.ls_init is not None:
    rules += [Rule(f'{b}.gamma_1', f'{o}/ls_1/gamma'), Rule(f'{b}.gamma_2', f'{o}/ls_2/gamma')]
  rules += _ln(f'{t}.norm', 'visual/ln_post')
  if v.pool == 'map':
    rules += _map_head_rules(f'{t}.attn_pool', 'visual/map_head')
  return (rules + [Rule(f'{t}.head.weight', 'visual/proj', 'linear')]
          + ([Rule(f'{t}.head.bias', 'visual/proj_bias')] if v.proj_bias else []))


def _text_rules(t: TextConfig, prefix: str) -> list[Rule]:
  rules = [Rule(f'{prefix}token_embedding.weight', 'text/token_embed'),
           Rule(f'{prefix}positional_embedding', 'text/pos_embed')]
  if t.embed_cls:
    rules += [Rule(f'{prefix}cls_emb', 'text/cls_token')]
  rules += _openclip_block(f'{prefix}transformer.resblocks.{{i}}', 'text/transformer/blocks',
                           t.ls_init is not None)
  rules += _ln(f'{prefix}ln_final', 'text/ln_final')
  if t.proj and t.proj_bias:
    rules += _linear(f'{prefix}text_projection', 'text/proj')
  elif t.proj:
    rules += [Rule(f'{prefix}text_projection', 'text/proj/kernel')]
  return rules


def _decoder_rules(d: DecoderConfig) -> list[Rule]:
  """CoCa's `text_decoder` (OpenCLIP `MultimodalTransformer`)."""
  o = 'decoder/layers'
  cross = 'text_decoder.cross_attn.{i}'
  return (_openclip_block('text_decoder.resblocks.{i}', f'{o}/self_block', False)
          + _openclip_block(cross, f'{o}/cross_block', False)
          + _ln(f'{cross}.ln_1_kv', f'{o}/cross_block/ln_1_kv')
          + _ln('text_decoder.ln_final', 'decoder/ln_final')
          + [Rule('text_decoder.text_projection', 'decoder/proj')])


def rules_for(cfg: CLIPConfig) -> list[Rule]:
  v = cfg.vision
  if isinstance(v, ConvNeXtConfig):
    vision = _convnext_vision_rules(v)
  elif isinstance(v, ResNetConfig):
    vision = _resnet_vision_rules(v)
  elif isinstance(v, EvaConfig):
    vision = _eva_vision_rules(v)
  else:
    timm = v.timm_model_name or v.naflex  # NaFlex trunks are timm's, named or not
    vision = _timm_vision_rules(v) if timm else _openclip_vision_rules(v)
  text = _text_rules(cfg.text, 'text.' if cfg.custom_text else '')
  decoder = _decoder_rules(cfg.decoder) if cfg.decoder is not None and is_coca(cfg) else []
  scale = [Rule('logit_scale', 'logit_scale')]
  bias = [Rule('logit_bias', 'logit_bias')] if cfg.init_logit_bias is not None else []
  return vision + text + decoder + scale + bias


def is_coca(cfg: CLIPConfig) -> bool:
  """A CoCa model: OpenCLIP has its decoder. LocCa's decoder (`decoder.embed_tokens`) is a
  training aid OpenCLIP has no place for; export leaves it out (a checkpoint keeps it)."""
  return cfg.decoder is not None and not cfg.decoder.embed_tokens


def _layers(cfg: CLIPConfig, rule: Rule) -> int:
  if rule.ours.startswith('decoder/') and cfg.decoder is not None:
    return cfg.decoder.layers
  v = cfg.vision
  if not rule.ours.startswith('visual/'):
    return cfg.text.layers
  if isinstance(v, ConvNeXtConfig):  # visual/stage{S}/blocks/...
    return v.depths[int(rule.ours.split('/')[1][len('stage'):])]
  if isinstance(v, ResNetConfig):  # visual/layer{S}/blocks/...: all but the stage's first
    return v.depths[int(rule.ours.split('/')[1][len('layer'):]) - 1] - 1
  return v.layers


def _torch_keys(cfg: CLIPConfig, rule: Rule) -> list[str]:
  if '{i}' not in rule.torch_key:
    return [rule.torch_key]
  return [rule.torch_key.format(i=i + rule.first) for i in range(_layers(cfg, rule))]


def _flat(tree: Params) -> dict[str, Any]:
  """{'visual/proj': leaf, ...}: the rule table names our parameters by '/'-joined paths."""
  return traverse_util.flatten_dict(tree, sep='/')


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Unwraps `{'state_dict': ...}` and DDP's `module.` prefix."""
  if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], Mapping):
    state_dict = state_dict['state_dict']
  return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}


def params_from_open_clip(cfg: CLIPConfig, state_dict: Mapping[str, Any],
                          shapes: Params) -> Params:
  """OpenCLIP state_dict (numpy arrays) -> our params tree, checked against `shapes`.

  `shapes` is the model's params tree of shapes (from `jax.eval_shape`). Every problem is
  collected first and reported in one `CheckpointMismatchError`.
  """
  state_dict = strip_prefixes(state_dict)
  rules = rules_for(cfg)
  expected = {k for r in rules for k in _torch_keys(cfg, r)}
  problems = [f'missing key {k!r}' for k in sorted(expected - set(state_dict))]
  problems += [f'unexpected key {k!r}' for k in sorted(set(state_dict) - expected)]
  params: dict[str, np.ndarray] = {}
  parts: dict[tuple[str, int], dict[int, np.ndarray]] = {}  # (ours, packed axis): slices
  flat_shapes = _flat(shapes)
  for rule in rules:
    keys = _torch_keys(cfg, rule)
    if any(k not in state_dict for k in keys):
      continue
    per_layer = _rule_shape(rule, tuple(flat_shapes[rule.ours]))
    arrays = []
    for key in keys:
      w = np.asarray(state_dict[key], dtype=None if rule.layout == 'count' else np.float32)
      try:
        arrays.append(to_ours(rule.layout, w, per_layer))
      except ValueError:
        problems.append(f'key {key!r} has shape {tuple(w.shape)}, model expects '
                        f'{torch_shape(rule.layout, per_layer)} (clip_jax {rule.ours} {per_layer})')
    if len(arrays) == len(keys):
      array = np.stack(arrays) if '{i}' in rule.torch_key else arrays[0]
      if rule.part is None:
        params[rule.ours] = array
      else:
        axis = rule.part[0] + int('{i}' in rule.torch_key)
        parts.setdefault((rule.ours, axis), {})[rule.part[1]] = array
  for (ours, axis), slices in parts.items():  # (a missing slice is a problem reported above)
    if len(slices) == flat_shapes[ours][axis]:
      params[ours] = np.stack([slices[i] for i in range(len(slices))], axis=axis)
  if problems:
    found, wanted = image_tower_family(state_dict), _family_of_config(cfg)
    hint = (f'; the checkpoint\'s image tower is {found}, the model\'s {wanted}'
            if found and found != wanted else '')
    raise CheckpointMismatchError(
        f'OpenCLIP checkpoint does not fit the model ({len(problems)} problems{hint}):\n  '
        + '\n  '.join(problems))
  return traverse_util.unflatten_dict(params, sep='/')


# The first key prefix of a state_dict that tells its image tower's family.
_FAMILY_PREFIXES = (('visual.trunk.stages.', 'a ConvNeXt (timm convnext_*)'),
                    ('visual.trunk.head.', 'a timm Eva (EVA-01/02, PE-Core)'),
                    ('visual.trunk.embeds.', 'a timm NaFlex ViT (naflexvit_*)'),
                    ('visual.trunk.blocks.', 'a timm ViT (SigLIP)'),
                    ('visual.transformer.resblocks.', 'an OpenCLIP ViT'),
                    ('visual.layer1.', 'a ModifiedResNet (RN50...)'))


def image_tower_family(state_dict: Mapping[str, Any]) -> str | None:
  """What kind of image tower an OpenCLIP state_dict holds, in words (None: unknown)."""
  for prefix, family in _FAMILY_PREFIXES:
    if any(k.startswith(prefix) for k in state_dict):
      return family
  return None


def _family_of_config(cfg: CLIPConfig) -> str:
  """The family (as `image_tower_family` words it) of the image tower `cfg` builds."""
  if isinstance(cfg.vision, ConvNeXtConfig):
    prefix = 'visual.trunk.stages.'
  elif isinstance(cfg.vision, ResNetConfig):
    prefix = 'visual.layer1.'
  elif isinstance(cfg.vision, EvaConfig):
    prefix = 'visual.trunk.head.'
  elif cfg.vision.naflex:
    prefix = 'visual.trunk.embeds.'
  elif cfg.vision.timm_model_name:
    prefix = 'visual.trunk.blocks.'
  else:
    prefix = 'visual.transformer.resblocks.'
  return dict(_FAMILY_PREFIXES)[prefix]


def _rule_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of one (per-layer) array of `rule`'s key on our side: the parameter's shape
  without its layer axis and, for a `part`, without the packed axis."""
  per_layer = shape[1:] if '{i}' in rule.torch_key else shape
  if rule.part is None:
    return per_layer
  return per_layer[:rule.part[0]] + per_layer[rule.part[0] + 1:]


def open_clip_shapes(cfg: CLIPConfig, shapes: Params) -> dict[str, tuple[int, ...]]:
  """OpenCLIP state_dict key -> shape for our model, from our params tree of shapes."""
  out, flat_shapes = {}, _flat(shapes)
  for rule in rules_for(cfg):
    per_layer = _rule_shape(rule, tuple(flat_shapes[rule.ours]))
    for key in _torch_keys(cfg, rule):
      out[key] = torch_shape(rule.layout, per_layer)
  return out


def params_to_open_clip(cfg: CLIPConfig, params: Params) -> dict[str, np.ndarray]:
  """Our params tree (with a BatchNorm model's running statistics) -> an OpenCLIP
  state_dict of float32 numpy arrays (int64 for BatchNorm's `num_batches_tracked`)."""
  state_dict, flat_params = {}, _flat(params)
  for rule in rules_for(cfg):
    a = np.asarray(flat_params[rule.ours], dtype=None if rule.layout == 'count' else np.float32)
    a = np.asarray(flat_params[rule.ours], dtype=np.float32)
    if rule.part is not None:  # the key's slice of the packed parameter
      a = np.take(a, rule.part[1], axis=rule.part[0] + int('{i}' in rule.torch_key))
    for i, key in enumerate(_torch_keys(cfg, rule)):
      layer = a[i] if '{i}' in rule.torch_key else a
      state_dict[key] = to_torch(rule.layout, layer)
  return state_dict
