"""Every training config key with its default; `configs/*.py` start from `base_config()`.

The trainer locks the config, so a misspelt `--config.KEY=VALUE` fails at once.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from clip_jax import sharding
from clip_jax.data.pipeline import data_defaults
from clip_jax.models.config import TextConfig, VisionConfig, field_type


def _overrides(klass) -> ml_collections.ConfigDict:
  """One typed, unset placeholder per architecture field (settable from the command line)."""
  return ml_collections.ConfigDict({
      f.name: ml_collections.config_dict.placeholder(field_type(klass, f.name))
      for f in dataclasses.fields(klass)})


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
  c.model.vision = _overrides(VisionConfig)
  c.model.text = _overrides(TextConfig)
  # None keeps the preset's; a sigmoid loss on a CLIP preset needs a bias: OpenCLIP's
  # --siglip sets init_logit_scale=2.302585 (log 10) and init_logit_bias=-10.
  c.model.init_logit_scale = ml_collections.config_dict.placeholder(float)
  c.model.init_logit_bias = ml_collections.config_dict.placeholder(float)
  c.model.dtype = 'float32'          # compute dtype: 'bfloat16' on accelerators
  c.model.scan_layers = True
  c.model.remat = 'none'
  c.model.attention = 'xla'          # 'splash': Pallas flash kernel on TPU (README: Attention)

  # The input pipeline's keys and defaults come from `PipelineConfig` (data/pipeline.py).
  c.data = ml_collections.ConfigDict(data_defaults())

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'softmax'            # 'softmax' | 'sigmoid' | 'sigmoid_chunked'
  c.loss.chunk_size = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = 'cosine'        # 'cosine' | 'constant' | 'constant_cooldown'
  c.optim.end_lr_ratio = 0.0
  c.optim.cooldown_steps = 0
  c.optim.weight_decay = 0.2
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 1             # micro-batches per step (clip_jax/accumulate.py)
  c.optim.grad_accum_mode = 'cache'  # 'cache': negatives over the global batch | 'micro'
  c.optim.freeze = ''                # regex on parameter paths, e.g. '^visual/' (LiT)
  c.optim.ema_decay = 0.0            # >0: keep an EMA of the params (e.g. 0.9999); 0 = off

  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ''             # clip_jax checkpoint or workdir of a frozen teacher
  c.distill.weight = 1.0             # x OpenCLIP's distillation loss, added to the contrastive

  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]

  c.eval = ml_collections.ConfigDict()
  c.eval.zeroshot_shards = ''        # tar shards whose .json holds 'label'
  c.eval.classnames = ''             # one class name per line
  c.eval.templates = ['a photo of a {}.']
  return c
