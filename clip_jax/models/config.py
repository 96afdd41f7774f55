"""Typed architecture configs: models are data (OpenCLIP style), never name substrings.

`CLIPConfig` fully describes a two-tower model: architecture (what the converter and the
exported `open_clip_config.json` need), preprocessing (kept with the model so zero-shot
numbers never depend on where weights came from) and execution options (dtype, scan,
remat) that change how, not what, the model computes.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeGuard

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

ACTIVATIONS = ('gelu', 'quick_gelu', 'gelu_tanh', 'silu')  # silu: SwiGLU's gate (gated_mlp)
VISION_POOLS = ('tok', 'gap', 'map')
TEXT_POOLS = ('argmax', 'last', 'first', 'mean')
REMAT_POLICIES = ('none', 'minimal', 'save_attn', 'minimal_offloaded', 'full', 'dots',
                  'dots_no_batch')
ATTENTIONS = ('auto', 'xla', 'splash', 'cudnn')


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT image tower. `pool`: tok (class token), gap (mean of patch tokens), map (SigLIP).

  `patch_dropout` (FLIP): the fraction of patch tokens each image drops in a training step
  given a random key; calls without a key (evaluation, export, inference) keep them all.

  `naflex` (SigLIP 2's NaFlex, timm `naflexvit_*`): the tower takes `NaFlexPatches` (each
  image at its own aspect ratio, a padded patch sequence whose length the data chooses) and
  resizes its [grid, grid] position table to each image's grid; `image_size` / `patch_size`
  is then only the table's grid (timm's `pos_embed_grid_size`, 16 for SigLIP 2).
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  class_token: bool = True
  pool: str = 'tok'
  ln_pre: bool = True
  patch_bias: bool = False
  proj: bool = True
  act: str = 'gelu'
  norm_eps: float = 1e-5
  ls_init: float | None = None
  patch_dropout: float = 0.0
  # Execution option, as in TextConfig: layers per iteration of the scanned loop.
  scan_unroll: int = 1
  # Set for towers that OpenCLIP builds from a timm trunk (the SigLIP family).
  timm_model_name: str | None = None
  # CoCa's attentional pooler (OpenCLIP `attentional_pool`): this many learned queries
  # (0: none) cross-attend to the tokens after the blocks, output width `embed_dim`; the first
  # query pools for the contrastive loss, the others are the decoder's image tokens.
  attn_pool_queries: int = 0
  attn_pool_heads: int = 8
  naflex: bool = False

  kind: ClassVar[str] = 'vit'

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def kept_patches(self) -> int:
    """Patch tokens left after patch dropout of the square grid (`kept_count`)."""
    return kept_count(self.grid ** 2, self.patch_dropout)


@dataclasses.dataclass(frozen=True)
class EvaConfig(VisionConfig):
  """A timm `Eva` trunk (EVA-01, EVA-02, PE-Core) with OpenCLIP's TimmModel head: a ViT whose
  blocks take the options below, timm's classifier `head` (Linear with bias) projecting the
  pooled token to `embed_dim` (`proj`, `proj_bias`), `ln_pre` as timm's `norm_pre`.

  2-D rotary position embedding (`rope`, timm's `RotaryEmbeddingCat`, interleaved pairs,
  added to the absolute position table): each head's q and k of the patch tokens (not the
  class token) are rotated by angles `coordinate * temperature**(-j / (head_dim / 4))`,
  j < head_dim / 4, one half of the pairs by the patch's row and the other by its column
  (`rope_xy`: column first, PE-Core; else row first, EVA-02). Coordinates are the grid
  index plus `rope_offset` (PE-Core: 1), scaled by `rope_ref_grid / grid` when set (timm's
  `ref_feat_shape`). The tables are computed, not parameters.

  `qkv_bias='qv'`: no bias on k (EVA: `q_bias`, `v_bias`). `attn_norm`: a LayerNorm over the
  heads' outputs before the output projection (timm `scale_attn_inner`). `gated_mlp`: the
  MLP is act(gate(x)) * fc1(x) (`act='silu'`: SwiGLU), `mlp_norm`: a LayerNorm on the MLP's
  hidden (timm `scale_mlp`). `post_norm`: x + norm(attn(x)) blocks (EVA02-E). The MAP head
  (`pool='map'`, timm `AttentionPoolLatent`) has `map_heads` heads and a 4x MLP.
  `qkv_fused=False` only changes how timm stores q, k and v (separate `q_proj`, `k_proj`,
  `v_proj`: the EVA-02 CLIP trunks), not what it computes: ours stay packed.
  OpenCLIP builds the trunk by `timm_model_name` alone, so export checks the rest against
  that name's architecture (`presets.eva_tower`).
  """
  kind: ClassVar[str] = 'eva'

  rope: bool = True
  rope_offset: float = 0.0
  rope_xy: bool = False
  rope_ref_grid: int | None = None
  rope_temperature: float = 10000.0
  qkv_bias: str = 'qkv'
  qkv_fused: bool = True
  attn_norm: bool = False
  gated_mlp: bool = False
  mlp_norm: bool = False
  post_norm: bool = False
  map_heads: int = 8
  proj_bias: bool = True

  @property
  def map_mlp_dim(self) -> int:
    return 4 * self.width


QKV_BIASES = ('qkv', 'qv')


CONVNEXT_HEADS = ('linear', 'mlp')


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
  """A timm `convnext_*` image tower with OpenCLIP's `TimmModel` head (`timm_pool: ''`).

  Stem: a 4x4 stride-4 conv and LayerNorm; 4 stages of `depths[i]` blocks at width
  `dims[i]`, each stage after the first opening with a LayerNorm and a 2x2 stride-2 conv.
  A block: depthwise 7x7 conv, LayerNorm, MLP (4x, exact GELU), LayerScale (`ls_init`),
  stochastic depth (`drop_path`: timm's rate rising linearly over all blocks to this value,
  per image, in training only, given keys) on the residual branch. Head: global average
  pool, LayerNorm (timm's head norm), then OpenCLIP's projection to `embed_dim`: `linear`
  (no bias unless `proj_bias`) or `mlp` (Linear 2*embed_dim with bias, GELU, Linear).
  `conv_mlp` only changes how timm stores the block MLP (1x1 convs: the small timm models,
  `convnext_atto`...), not what it computes. OpenCLIP builds the trunk by
  `timm_model_name` alone, so export checks the rest against that name's architecture.
  """
  kind: ClassVar[str] = 'convnext'

  image_size: int = 224
  depths: tuple[int, ...] = (3, 3, 27, 3)
  dims: tuple[int, ...] = (128, 256, 512, 1024)
  ls_init: float | None = 1e-6
  norm_eps: float = 1e-6
  drop_path: float = 0.0
  head_proj: str = 'linear'
  proj_bias: bool = False
  conv_mlp: bool = False
  timm_model_name: str | None = 'convnext_base'
  # Execution option: blocks per iteration of each stage's scanned loop.
  scan_unroll: int = 1

  # ViT-only notions, constant here so that code reading them works for any tower.
  patch_dropout: ClassVar[float] = 0.0
  attn_pool_queries: ClassVar[int] = 0

  @property
  def width(self) -> int:
    """The trunk's output width (the last stage's)."""
    return self.dims[-1]

  @property
  def drop_path_rates(self) -> tuple[tuple[float, ...], ...]:
    """Per stage, each block's stochastic-depth rate (timm: linear over all blocks)."""
    total = sum(self.depths)
    rates = [self.drop_path * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(self.depths[:i]) for i in range(len(self.depths))]
    return tuple(tuple(rates[s:s + d]) for s, d in zip(starts, self.depths))


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """OpenAI CLIP's ModifiedResNet image tower (OpenCLIP `RN50`, `RN101`, `RN50x4`, ...: the
  configs whose `vision_cfg.layers` is a list of 4 stage depths).

  Stem: three 3x3 convs (the first with stride 2; widths `width/2`, `width/2`, `width`), each
  followed by BatchNorm and ReLU, then a 2x2 average pool. Then 4 stages of `depths[i]`
  bottleneck blocks with `width * 2**i` planes and 4x that many output channels. Stages 2-4
  halve the grid with anti-aliasing instead of strided convs: a 2x2 average pool after the
  block's 3x3 conv, and one before its downsample branch's 1x1 conv. Head: OpenCLIP's
  AttentionPool2d over the final (image_size/32)^2 grid. The mean of the tokens is prepended,
  a learned position embedding is added, and `heads`-head attention runs with the mean token
  as the only query; an output projection maps it to embed_dim. No biases in the convs.

  BatchNorm (eps 1e-5, momentum 0.1, as torch's) keeps running statistics beside the params
  (`clip_jax/models/batch_norm.py`). `sync_bn` is a training option: True normalises a
  training batch by the statistics of the global batch (synchronised over the mesh's batch
  axes, OpenCLIP's `--use-bn-sync`); False by each device's rows (OpenCLIP's default, plain
  BatchNorm2d per GPU). Evaluation always uses the running statistics.
  """
  kind: ClassVar[str] = 'resnet'

  image_size: int = 224
  depths: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  heads: int = 32
  sync_bn: bool = True
  # Execution option: blocks per iteration of each stage's scanned loop (the blocks after
  # the first, which differs: it changes the width, and the grid in stages 2-4).
  scan_unroll: int = 1

  # ViT-only notions, constant here so that code reading them works for any tower.
  patch_dropout: ClassVar[float] = 0.0
  attn_pool_queries: ClassVar[int] = 0
  timm_model_name: ClassVar[str | None] = None

  @property
  def grid(self) -> int:
    """Side of the final feature map that the attention pool reads."""
    return self.image_size // 32

  @property
  def features(self) -> int:
    """Channels of the final feature map (the attention pool's width): 32 x width."""
    return self.width * 32


AnyVisionConfig = VisionConfig | ConvNeXtConfig | ResNetConfig
# config.json's `vision.kind` -> the config type (absent: a ViT, as before the field).
VISION_CONFIGS: dict[str, type] = {'vit': VisionConfig, 'convnext': ConvNeXtConfig,
                                   'resnet': ResNetConfig, 'eva': EvaConfig}


def is_vit(v: Any) -> bool:
  """A ViT image tower (patch tokens): OpenCLIP's, timm's SigLIP trunk or a timm Eva."""
  return isinstance(v, VisionConfig)


def is_naflex(v: Any) -> TypeGuard[VisionConfig]:
  """A NaFlex image tower: a ViT taking patch sequences at each image's aspect ratio."""
  return isinstance(v, VisionConfig) and v.naflex


def kept_count(patches: int, rate: float) -> int:
  """Patch tokens left of `patches` after patch dropout at `rate`; rounded as OpenCLIP's
  PatchDropout, at least 1."""
  return max(1, int(patches * (1 - rate)))


def require_vit(v: Any, what: str) -> VisionConfig:
  """`v` if it is a ViT tower, else a one-line ValueError saying `what` needs ViT tokens."""
  if not isinstance(v, VisionConfig):
    raise ValueError(f'{what} needs a ViT image tower (patch tokens); this model\'s image tower '
                     f'is {v.kind} ({_tower_name(v)}).')
  return v


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text transformer. `causal=False` with `pool='last'` is the SigLIP text tower."""
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_dim: int = 2048
  causal: bool = True
  pool: str = 'argmax'
  proj: bool = True
  proj_bias: bool = False
  act: str = 'gelu'
  norm_eps: float = 1e-5
  ls_init: float | None = None
  pad_id: int = 0
  # Tokenizer: 'clip' (the shipped BPE) or a sentencepiece `.model` path.
  tokenizer: str = 'clip'
  # OpenCLIP's hub tokenizer name, written to the exported config only.
  hf_tokenizer_name: str | None = None
  # Execution option (the numbers do not change): layers per iteration of the loop that
  # `scan_layers` makes (`jax.lax.scan`'s `unroll`). XLA schedules and fuses across the
  # layers of one iteration; `clip_jax.aot` costs a scanned layer by compiling 1 and 2.
  scan_unroll: int = 1
  # CoCa (OpenCLIP `embed_cls`): a learned token appended after the text, pooled for the
  # contrastive loss; the token outputs before it feed the caption decoder.
  embed_cls: bool = False

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def positions(self) -> int:
    """Rows of the position embedding: the context, plus the appended class token."""
    return self.context_length + int(self.embed_cls)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A caption decoder: per layer a causal self-attention block, then a cross-attention
  block over the image tokens; `ln_final` and a projection to `vocab_size` logits.

  CoCa (OpenCLIP `multimodal_cfg`): its input is the text tower's token outputs. LocCa
  (`embed_tokens=True`): it embeds its own token sequence (text ids, then box and task
  tokens past the tokenizer's vocabulary: `data/locca.py`) and reads the image tower's
  un-pooled patch tokens; a training aid that export leaves out.
  """
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_dim: int = 2048
  context_length: int = 76
  vocab_size: int = 49408
  act: str = 'gelu'
  norm_eps: float = 1e-5
  scan_unroll: int = 1
  embed_tokens: bool = False
  # LocCa: a learned embedding of each image token's grid position (this many: the tower's
  # patches), added to the tokens the decoder reads; 0 for none (CoCa, as OpenCLIP). Why:
  # a referring expression's box needs to know where a token sits, and the tokens of a tower
  # trained by a contrastive loss barely say (the demo's after 1,000 steps: position
  # embedding norm 1.5 against 33 for the patch embedding; held-out referring accuracy 25-44%
  # without, docs/captioning.md with); towers with relative or no positions say nothing.
  image_positions: int = 0

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Eval-time image preprocessing; exported as OpenCLIP's `preprocess_cfg`."""
  mean: tuple[float, ...] = OPENAI_MEAN
  std: tuple[float, ...] = OPENAI_STD
  resize_mode: str = 'shortest'  # 'shortest' (resize + center crop) or 'squash'
  interpolation: str = 'bicubic'


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A complete two-tower model description."""
  embed_dim: int = 512
  vision: VisionConfig | ConvNeXtConfig | ResNetConfig = VisionConfig()
  text: TextConfig = TextConfig()
  init_logit_scale: float = 2.6592600369644043  # log(1 / 0.07)
  init_logit_bias: float | None = None
  # OpenCLIP stores the text tower under `text.` (CustomTextCLIP) instead of at the root.
  custom_text: bool = False
  preprocess: PreprocessConfig = PreprocessConfig()
  # CoCa's caption decoder; None for two-tower models.
  decoder: DecoderConfig | None = None
  # Execution options: never change the numbers beyond floating-point rounding.
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat: str = 'none'
  # 'auto': the core measured best per platform: cuDNN flash attention where compiled for an
  # NVIDIA GPU, XLA elsewhere (on TPU splash took more HBM at CLIP lengths, RESULTS
  # 2026-11-30); 'xla', 'cudnn', 'splash' name one (layers.attend).
  attention: str = 'auto'

  def replace(self, **overrides: Any) -> CLIPConfig:
    """Returns a copy with top-level or nested (`vision.layers=2`) fields replaced.

    The one parser of architecture overrides: the trainer's `config.model.{vision,text}`
    keys and `import_open_clip --override KEY=VALUE` both end here. String values of
    non-string fields are parsed as Python literals (`'2'`, `'False'`, `'None'`).
    """
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {'vision': {}, 'text': {}, 'preprocess': {},
                                         'decoder': {}}
    for key, value in overrides.items():
      head, _, tail = key.partition('.')
      if tail:
        if head not in nested:
          raise KeyError(f'Unknown model config section {head!r} in override {key!r}.')
        nested[head][tail] = value
      else:
        top[key] = value
    for section, fields in nested.items():
      if fields:
        if section == 'vision' and not is_vit(self.vision):
          _check_tower_keys(self.vision, fields)
        if getattr(self, section) is None:
          raise KeyError(f'Override {next(iter(fields))!r} of {section}: this model has no '
                         f'{section} (a CoCa preset has one).')
        top[section] = _replace_checked(getattr(self, section), fields)
    return _replace_checked(self, top)

  def validate(self) -> CLIPConfig:
    """Raises ValueError naming the field for impossible architectures."""
    v = self.vision
    if isinstance(v, ConvNeXtConfig):
      return self._validate_with(self._convnext_checks(v))
    if isinstance(v, ResNetConfig):
      return self._validate_with(self._resnet_checks(v))
    if isinstance(v, EvaConfig):
      return self._validate_with(self._vit_checks(v) + self._eva_checks(v))
    return self._validate_with(self._vit_checks(v))

  def _eva_checks(self, v: EvaConfig) -> list[tuple[bool, str]]:
    return [
        (not v.rope or v.head_dim % 4 == 0,
         'vision.rope needs vision.head_dim divisible by 4 (2 axes x sin/cos pairs)'),
        (v.qkv_bias in QKV_BIASES, f'vision.qkv_bias must be one of {QKV_BIASES}'),
        (v.pool != 'map' or v.width % v.map_heads == 0,
         'vision.width must be divisible by vision.map_heads'),
        (not v.attn_pool_queries, "vision.attn_pool_queries (CoCa's pooler) needs an OpenCLIP "
                                  'ViT, not a timm Eva'),
        (v.proj, 'vision.proj=False: a timm Eva under OpenCLIP always has its head'),
        (not v.post_norm or v.ls_init is None, 'vision.post_norm blocks have no LayerScale'),
        (not v.naflex, 'vision.naflex needs a plain ViT trunk (timm naflexvit_*), not an Eva'),
    ]

  def _resnet_checks(self, v: ResNetConfig) -> list[tuple[bool, str]]:
    return self._text_checks() + [
        (len(v.depths) == 4, 'vision.depths must have 4 stages'),
        (all(d >= 1 for d in v.depths), 'vision.depths must be >= 1 per stage'),
        (v.image_size >= 32 and v.image_size % 32 == 0,
         'vision.image_size must be a multiple of 32 (the attention pool\'s grid is '
         'image_size / 32)'),
        (v.width >= 2 and v.width % 2 == 0, 'vision.width must be even (the stem starts at '
                                            'width / 2)'),
        (v.heads >= 1 and v.features % v.heads == 0,
         'vision.heads must divide the attention pool\'s width (32 x vision.width)'),
        (v.scan_unroll >= 1, 'vision.scan_unroll must be >= 1'),
        (self.decoder is None, 'a caption decoder (CoCa, LocCa) needs a ViT image tower\'s '
                               'tokens; this model\'s image tower is a ModifiedResNet'),
    ]

  def _convnext_checks(self, v: ConvNeXtConfig) -> list[tuple[bool, str]]:
    n = len(v.depths)
    return self._text_checks() + [
        (n == len(v.dims) == 4, 'vision.depths and vision.dims must have 4 stages each'),
        (all(d >= 1 for d in v.depths), 'vision.depths must be >= 1 per stage'),
        (v.image_size >= 32, 'vision.image_size must be >= 32 (4x4 stem, 3 2x downsamples)'),
        (v.head_proj in CONVNEXT_HEADS, f'vision.head_proj must be one of {CONVNEXT_HEADS}'),
        (0 <= v.drop_path < 1, 'vision.drop_path must be in [0, 1)'),
        (v.scan_unroll >= 1, 'vision.scan_unroll must be >= 1'),
        (self.decoder is None, 'a caption decoder (CoCa, LocCa) needs a ViT image tower\'s '
                               'tokens; this model\'s image tower is a ConvNeXt'),
    ]

  def _text_checks(self) -> list[tuple[bool, str]]:
    t = self.text
    return [
        (t.width % t.heads == 0, 'text.width must be divisible by text.heads'),
        (t.pool in TEXT_POOLS, f'text.pool must be one of {TEXT_POOLS}'),
        (t.act in ACTIVATIONS, f'act must be one of {ACTIVATIONS}'),
        (t.proj or t.width == self.embed_dim, 'text.proj=False needs text.width == embed_dim'),
        (t.scan_unroll >= 1, 'text.scan_unroll must be >= 1'),
        (self.remat in REMAT_POLICIES, f'remat must be one of {REMAT_POLICIES}'),
        (self.attention in ATTENTIONS, f'attention must be one of {ATTENTIONS}'),
    ]

  def _validate_with(self, checks: list[tuple[bool, str]]) -> CLIPConfig:
    errors = [msg for ok, msg in checks if not ok]
    if errors:
      raise ValueError('Invalid model config: ' + '; '.join(errors))
    return self

  def _vit_checks(self, v: VisionConfig) -> list[tuple[bool, str]]:
    t = self.text
    checks = [
        (v.image_size >= v.patch_size, 'vision.image_size must be >= vision.patch_size'),
        (v.width % v.heads == 0, 'vision.width must be divisible by vision.heads'),
        (t.width % t.heads == 0, 'text.width must be divisible by text.heads'),
        (v.pool in VISION_POOLS, f'vision.pool must be one of {VISION_POOLS}'),
        (t.pool in TEXT_POOLS, f'text.pool must be one of {TEXT_POOLS}'),
        (v.act in ACTIVATIONS and t.act in ACTIVATIONS, f'act must be one of {ACTIVATIONS}'),
        (v.pool != 'tok' or v.class_token, "vision.pool='tok' needs vision.class_token=True"),
        (v.proj or v.width == self.embed_dim, 'vision.proj=False needs vision.width == embed_dim'),
        (t.proj or t.width == self.embed_dim, 'text.proj=False needs text.width == embed_dim'),
        (0 <= v.patch_dropout < 1, 'vision.patch_dropout must be in [0, 1)'),
        (v.scan_unroll >= 1, 'vision.scan_unroll must be >= 1'),
        (t.scan_unroll >= 1, 'text.scan_unroll must be >= 1'),
        (self.remat in REMAT_POLICIES, f'remat must be one of {REMAT_POLICIES}'),
        (self.attention in ATTENTIONS, f'attention must be one of {ATTENTIONS}'),
        (not v.attn_pool_queries or v.pool == 'tok',
         "vision.attn_pool_queries needs vision.pool='tok' (the first query is pooled)"),
        (not v.attn_pool_queries or self.embed_dim % v.attn_pool_heads == 0,
         'embed_dim must be divisible by vision.attn_pool_heads'),
        (not v.naflex or (not v.class_token and not v.attn_pool_queries),
         'vision.naflex needs vision.class_token=False and no vision.attn_pool_queries '
         '(a NaFlex SigLIP trunk: patch tokens pooled by map or gap)'),
        (not v.naflex or self.decoder is None,
         'vision.naflex: a caption decoder (model.decoder, locca.weight) does not read NaFlex '
         'tokens yet'),
    ]
    if self.decoder is not None:
      d = self.decoder
      checks += [
          (d.width % d.heads == 0, 'decoder.width must be divisible by decoder.heads'),
          (d.act in ACTIVATIONS, f'decoder.act must be one of {ACTIVATIONS}'),
          (d.embed_tokens or t.embed_cls,
           'a CoCa decoder (decoder.embed_tokens=False) needs text.embed_cls=True'),
          (d.embed_tokens or t.width == d.width, 'decoder.width must equal text.width'),
          (d.embed_tokens or not d.image_positions,
           "decoder.image_positions is a LocCa decoder's (decoder.embed_tokens=True)"),
          (d.embed_tokens or d.context_length >= t.context_length - 1,
           'decoder.context_length must be >= text.context_length - 1'),
          (d.scan_unroll >= 1, 'decoder.scan_unroll must be >= 1'),
          ((self.embed_dim if v.attn_pool_queries else v.width) == d.width,
           'decoder.width must equal the image tokens\' width (embed_dim with '
           'vision.attn_pool_queries, else vision.width)'),
      ]
    return checks

  def to_dict(self) -> dict[str, Any]:
    """Plain data for config.json; a non-ViT image tower says its `kind`."""
    out = dataclasses.asdict(self)
    if self.vision.kind != 'vit':
      out['vision'] = {'kind': self.vision.kind, **out['vision']}
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
    d = dict(d)
    pre = dict(d.pop('preprocess', {}))
    for key in ('mean', 'std'):
      if key in pre:
        pre[key] = tuple(pre[key])
    decoder = d.pop('decoder', None)
    vision = dict(d.pop('vision', {}))
    kind = vision.pop('kind', 'vit')
    if kind not in VISION_CONFIGS:
      raise KeyError(f'Unknown vision kind {kind!r}; known: {sorted(VISION_CONFIGS)}')
    return cls(vision=_build(VISION_CONFIGS[kind], vision),
               text=_build(TextConfig, d.pop('text', {})),
               preprocess=_build(PreprocessConfig, pre),
               decoder=_build(DecoderConfig, decoder) if decoder is not None else None, **d)


def _build(klass, fields: dict[str, Any]):
  unknown = set(fields) - {f.name for f in dataclasses.fields(klass)}
  if unknown:
    raise KeyError(f'Unknown {klass.__name__} keys: {sorted(unknown)}')
  # JSON keeps tuples as lists.
  return klass(**{k: tuple(v) if isinstance(v, list) and field_type(klass, k) is tuple else v
                  for k, v in fields.items()})


def _tower_name(v: Any) -> str:
  return v.timm_model_name or ('ModifiedResNet' if v.kind == 'resnet' else 'custom')


def _check_tower_keys(v: Any, fields: dict[str, Any]) -> None:
  """ViT-only keys given for another tower fail in one line naming the key."""
  own = {f.name for f in dataclasses.fields(v)}
  vit = {f.name for f in dataclasses.fields(VisionConfig)} - own
  for key in fields:
    if key in vit:
      needs = (' (patch dropout drops ViT patch tokens)' if key == 'patch_dropout' else '')
      raise KeyError(f'vision.{key} is a ViT option{needs}; this model\'s image tower is '
                     f'{v.kind} ({_tower_name(v)}), whose keys are '
                     f'{sorted(own)}.')


def _replace_checked(obj, fields: dict[str, Any]):
  unknown = set(fields) - {f.name for f in dataclasses.fields(obj)}
  if unknown:
    raise KeyError(f'Unknown {type(obj).__name__} keys: {sorted(unknown)}')
  return dataclasses.replace(obj, **{k: _parse_value(type(obj), k, v) for k, v in fields.items()})


def field_type(klass: type, name: str) -> type:
  """The declared type of a config field, `Optional` unwrapped (`ls_init` -> float)."""
  return _unwrap(typing.get_type_hints(klass)[name])


def _unwrap(hint: Any) -> type:
  if _is_optional(hint):
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  return typing.get_origin(hint) or hint


def _is_optional(hint: Any) -> bool:
  return (typing.get_origin(hint) in (typing.Union, types.UnionType)
          and type(None) in typing.get_args(hint))


def _parse_value(klass: type, name: str, value: Any) -> Any:
  """A string typed by the field's declaration (`'2'` -> 2); any other value as it is."""
  if not isinstance(value, str):
    return value
  hint = typing.get_type_hints(klass)[name]
  if value == 'None' and _is_optional(hint):
    return None
  kind = _unwrap(hint)
  if kind is str:
    return value
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  if isinstance(parsed, kind) or (kind is float and type(parsed) is int):
    return parsed
  raise ValueError(f'{klass.__name__}.{name} expects {kind.__name__}, got {value!r}')
