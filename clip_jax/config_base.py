"""What a config file builds on: every training key with its default (`base_config`), and
the one parser of a config file's `:ARGS` (`parse_arg`).

`configs/*.py` start from `base_config()`. The trainer locks the config, so a misspelt
`--config.KEY=VALUE` fails at once (`clip_jax.cli` names the closest key); `parse_arg`
does the same for `configs/NAME.py:KEY=VALUE,...`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import ml_collections

from clip_jax import sharding
from clip_jax.data.locca import locca_defaults
from clip_jax.data.pipeline import data_defaults
from clip_jax.models.config import (
  ConvNeXtConfig,
  DecoderConfig,
  EvaConfig,
  ResNetConfig,
  TextConfig,
  VisionConfig,
  field_type,
)
from clip_jax.optim import OptimConfig


def _overrides(*klasses) -> ml_collections.ConfigDict:
  """One typed, unset placeholder per architecture field of any of `klasses` (settable from
  the command line; a field of another tower type than the preset's fails naming it)."""
  return ml_collections.ConfigDict({
      f.name: ml_collections.config_dict.placeholder(field_type(klass, f.name))
      for klass in reversed(klasses) for f in dataclasses.fields(klass)})


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256                 # global, over all devices and processes
  c.log_every = 10
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.tensorboard = True               # False: metrics.jsonl and the console only
  c.max_bad_steps = 10               # non-finite steps in a row before stopping
  c.peak_flops_per_device = 0.0      # for MFU on devices metrics.py does not know
  c.init_from = ''                   # clip_jax checkpoint (imported or exported) to start from
  # With model.vision.patch_dropout > 0: the last N steps keep every patch (FLIP's unmasked
  # tuning, OpenCLIP's --force-patch-dropout 0), in a step compiled separately.
  c.patch_dropout_tail_steps = 0
  c.profile_start_step = 0           # >0: capture a profiler trace (TensorBoard) from this step
  c.profile_steps = 5

  c.model = ml_collections.ConfigDict()
  c.model.name = 'tiny'              # a preset, see clip_jax.list_models()
  # Preset overrides (None keeps the preset's value), e.g. --config.model.vision.layers=6.
  # ViT, ConvNeXt, ModifiedResNet or timm Eva (EVA, PE-Core) keys; e.g.
  # --config.model.vision.sync_bn=False: BatchNorm statistics per device (OpenCLIP's
  # default) instead of over the global batch.
  c.model.vision = _overrides(VisionConfig, ConvNeXtConfig, ResNetConfig, EvaConfig)
  c.model.text = _overrides(TextConfig)
  c.model.decoder = _overrides(DecoderConfig)  # CoCa presets' caption decoder
  # None keeps the preset's; a sigmoid loss on a CLIP preset needs a bias: OpenCLIP's
  # --siglip sets init_logit_scale=2.302585 (log 10) and init_logit_bias=-10.
  c.model.init_logit_scale = ml_collections.config_dict.placeholder(float)
  c.model.init_logit_bias = ml_collections.config_dict.placeholder(float)
  c.model.dtype = 'float32'          # compute dtype: 'bfloat16' on accelerators
  c.model.scan_layers = True
  c.model.remat = 'none'
  c.model.attention = 'auto'         # cuDNN on GPU, else XLA; 'splash': TPU (docs/performance.md)

  # The input pipeline's keys and defaults come from `PipelineConfig` (data/pipeline.py).
  c.data = ml_collections.ConfigDict(data_defaults())
  # 'auto' or a count: a reference of any type, so that both `--config.data.workers=8` and
  # `=auto` parse (a str-typed key would read 8 as '8', an int-typed one refuse 'auto').
  c.data.workers = ml_collections.FieldReference(c.data.workers, field_type=object)
  # NaFlex models (`model.vision.naflex`): the sequence lengths a batch may have, and the
  # global token budget per batch (0: batch_size x the longest length); data/naflex.py.
  c.data.naflex = ml_collections.ConfigDict({'seq_lens': (), 'max_tokens_per_batch': 0})

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'softmax'            # 'softmax' | 'sigmoid' | 'sigmoid_chunked'
  c.loss.chunk_size = 0
  # Models with a caption decoder (CoCa): loss = contrastive_weight x the contrastive loss +
  # caption_weight x the captioning cross-entropy (OpenCLIP's --coca-*-loss-weight defaults);
  # contrastive_weight=0: caption-only fine-tuning.
  c.loss.contrastive_weight = 1.0
  c.loss.caption_weight = 2.0

  # LocCa (SigLIP 2's decoder loss) on any image tower: weight > 0 adds a decoder over the
  # image tower's patch tokens (sized by `model.decoder.*`); keys: clip_jax/data/locca.py.
  c.locca = ml_collections.ConfigDict(locca_defaults())

  # The optimizer's keys and defaults come from `OptimConfig` (optim.py).
  c.optim = ml_collections.ConfigDict(dataclasses.asdict(OptimConfig()))

  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ''             # clip_jax checkpoint or workdir of a frozen teacher
  c.distill.weight = 1.0             # x OpenCLIP's distillation loss, added to the contrastive

  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]

  c.eval = ml_collections.ConfigDict()
  c.eval.zeroshot_shards = ''        # tar shards whose .json holds 'label'
  c.eval.classnames = ''             # one class name per line
  c.eval.templates = ['a photo of a {}.']
  c.eval.seq_len = 0                 # NaFlex: images at their aspect ratio, <= N patches (0:
                                     # the longest data.naflex.seq_lens)
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """A config file's `:ARGS` (`KEY=VALUE,...`) over `defaults`, as big_vision's `parse_arg`.

  Each value takes its default's type (`9e9` is accepted for an int: a sample budget);
  a key not in `defaults` fails naming the valid ones, so a typo is never silently dropped.
  """
  args = dict(defaults)
  for item in arg.split(',') if arg else []:
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      close = difflib.get_close_matches(key, defaults, n=1)
      hint = f'did you mean {close[0]}? ' if close and sep else ''
      raise ValueError(f':ARGS {item!r} is not KEY=VALUE with a known KEY; {hint}valid keys: '
                       f'{", ".join(sorted(defaults))}')
    args[key] = _typed(key, value, defaults[key])
  return ml_collections.ConfigDict(args)


def _typed(key: str, value: str, default: Any) -> Any:
  try:
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(value)
      return value.lower() in ('true', '1')
    if isinstance(default, int):
      number = float(value)
      if number != int(number):
        raise ValueError(value)
      return int(number)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    raise ValueError(f':ARGS {key}={value!r} is not a {type(default).__name__} '
                     f'(default {default!r})') from None
  return value
