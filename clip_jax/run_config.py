"""A training config resolved once: checked, then turned into the typed configs the code reads.

`resolve(config, num_devices)` runs every check that needs no data file (loss, schedule,
mesh, batch divisibility, steps, the model preset and its overrides, the distillation
teacher's fit, a checkpoint at `init_from`, an empty `data.train`) and returns a
`RunConfig`: the model's `CLIPConfig`, the input pipeline's `PipelineConfig` (tokenizer
loaded once) and the frozen `StepConfig` that the jitted step reads. Everything below the
binaries takes these, never the raw ConfigDict, so the preset is resolved and the tokenizer
loaded once per start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from clip_jax import accumulate, distill, sharding
from clip_jax import checkpoint as ckpt
from clip_jax.data import locca
from clip_jax.data.naflex import NaFlexBatching
from clip_jax.data.pipeline import PipelineConfig
from clip_jax.data.tokenizers import tokenizer_from_spec
from clip_jax.losses import KINDS
from clip_jax.models.config import CLIPConfig, DecoderConfig, is_naflex, require_vit
from clip_jax.models.presets import get_config
from clip_jax.optim import SCHEDULES, OptimConfig


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The run keys the train step is built from (model and data aside)."""
  loss: str                    # 'softmax' | 'sigmoid' | 'sigmoid_chunked'
  loss_chunk_size: int | None  # rows per chunk of the chunked sigmoid loss; None: the default
  optim: OptimConfig
  total_steps: int
  seed: int                    # init and per-step patch-dropout keys
  batch_size: int              # global
  distill_teacher: str         # checkpoint or workdir; '' = no distillation
  distill_weight: float
  patch_dropout_tail_steps: int  # 0 when the model drops no patches
  # Models with a caption decoder: loss = contrastive_weight x contrastive + caption_weight x
  # captioning (OpenCLIP's CoCa defaults 1 and 2; LocCa: config.locca.weight).
  contrastive_weight: float = 1.0
  caption_weight: float = 0.0

  @property
  def unmasked_from(self) -> int:
    """The step count from which the patch-dropout tail's unmasked step runs."""
    return self.total_steps - self.patch_dropout_tail_steps


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A config, resolved: what `clip_jax.step` and the trainer build from."""
  preset: str                                   # config.model.name
  model: CLIPConfig
  step: StepConfig
  mesh: dict[str, int]                          # config.mesh (-1: the remaining devices)
  sharding_rules: tuple[tuple[Any, ...], ...]
  pipeline: PipelineConfig | None               # None when resolved without data (aot)
  init_from: str = ''                           # checkpoint to start from; '' = random

  @property
  def data(self) -> PipelineConfig:
    """The pipeline config of a config resolved with data (the trainer's)."""
    if self.pipeline is None:
      raise ValueError('this config was resolved without data (run_config.resolve(data=False))')
    return self.pipeline


def model_config(config: ml_collections.ConfigDict) -> CLIPConfig:
  """The preset with `config.model.{vision,text,decoder}` and logit init overrides, and
  execution options."""
  overrides = {f'{tower}.{k}': v for tower in ('vision', 'text')
               for k, v in config.model[tower].items() if v is not None}
  overrides.update({k: config.model[k] for k in ('init_logit_scale', 'init_logit_bias')
                    if config.model[k] is not None})
  overrides.update({k: config.model[k] for k in ('dtype', 'scan_layers', 'remat', 'attention')})
  model = get_config(config.model.name, **overrides)
  if config.locca.weight:
    model = with_locca_decoder(model, config.locca)
  decoder = {f'decoder.{k}': v for k, v in config.model.decoder.items() if v is not None}
  return model.replace(**decoder).validate() if decoder else model


def with_locca_decoder(model: CLIPConfig, config_locca) -> CLIPConfig:
  """`model` with LocCa's decoder: as wide as the image tower (its patch tokens are the
  keys and values, each placed by its grid position), half its depth, its vocabulary the
  text ids plus box and task tokens (`data/locca.py`); `config.model.decoder.*` overrides
  any of it."""
  if model.decoder is not None:
    raise ValueError(f'config.locca.weight={config_locca.weight}: the preset already has a '
                     'caption decoder (CoCa); LocCa adds one to a two-tower model.')
  v = require_vit(model.vision, f'config.locca.weight={config_locca.weight} (LocCa\'s decoder)')
  bins = config_locca.get('bins', locca.locca_defaults()['bins'])
  return model.replace(decoder=DecoderConfig(
      width=v.width, heads=v.heads, layers=max(1, v.layers // 2), mlp_dim=v.mlp_dim,
      context_length=config_locca.get('context_length', 32), act=v.act, norm_eps=v.norm_eps,
      vocab_size=model.text.vocab_size + bins + len(locca.TASKS), embed_tokens=True,
      image_positions=v.grid ** 2))


def resolve(config: ml_collections.ConfigDict, num_devices: int, data: bool = True
            ) -> RunConfig:
  """Checks `config` for `num_devices` and resolves it; `data=False` skips the pipeline
  (and its tokenizer file), for compiling the step without data (`clip_jax.aot`)."""
  model = model_config(config)  # unknown preset or override
  step = _step_config(config, model)
  _check(config, model, step, num_devices)
  distill.check(config, model)  # reads the teacher's model config
  _check_init_from(config.init_from)
  return RunConfig(preset=config.model.name, model=model, step=step, mesh=dict(config.mesh),
                   sharding_rules=tuple(tuple(r) for r in config.sharding_rules),
                   pipeline=pipeline_config(config, model, num_devices) if data else None,
                   init_from=config.init_from)


def _check_init_from(init_from: str) -> None:
  """A missing `init_from` is named before the trainer creates its workdir or compiles."""
  if not init_from:
    return
  try:
    ckpt.resolve_checkpoint(init_from)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.init_from={init_from}: {e}') from e


def naflex_batching(config: ml_collections.ConfigDict, model: CLIPConfig, num_devices: int
                    ) -> NaFlexBatching | None:
  """`config.data.naflex` for a NaFlex model (None for the others); either without the
  other is an error naming the key. Batches divide by the data-parallel size x
  `optim.grad_accum`, as `config.batch_size` must."""
  keys, v = config.data.naflex, model.vision
  if not is_naflex(v):
    if keys.seq_lens:
      raise ValueError(f'config.data.naflex.seq_lens={tuple(keys.seq_lens)}: model '
                       f'{config.model.name!r} is not a NaFlex model (model.vision.naflex).')
    return None
  if not keys.seq_lens:
    raise ValueError(f'config.data.naflex.seq_lens is empty: {config.model.name!r} is a NaFlex '
                     'model, trained on patch sequences; set the lengths, e.g. '
                     "--config.data.naflex.seq_lens='(256, 576, 1024)'.")
  seq_lens = tuple(int(n) for n in keys.seq_lens)
  return NaFlexBatching(
      patch_size=v.patch_size, seq_lens=seq_lens,
      max_tokens_per_batch=keys.max_tokens_per_batch or config.batch_size * max(seq_lens),
      batch_multiple=data_parallel_size(config, num_devices) * config.optim.grad_accum,
      seed=config.seed)


def data_parallel_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """The batch shards of `config.mesh` on `num_devices`: its data x fsdp axes."""
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  return shape['data'] * shape['fsdp']


def pipeline_config(config: ml_collections.ConfigDict, model: CLIPConfig, num_devices: int = 1
                    ) -> PipelineConfig:
  """`config.data` plus what the pipeline derives from the model and the run."""
  if config.data.kind == 'tar' and not config.data.train:
    raise ValueError("--config.data.train is empty: set it to your tar shards, e.g. "
                     "--config.data.train='/data/shards/{00000..00099}.tar' "
                     "(or --config.data.kind=synthetic for random data)")
  tokenizer = tokenizer_from_spec(model.text.tokenizer, model.text.context_length)
  spec = locca.locca_spec(config.locca, tokenizer)
  if spec is not None and model.decoder is not None and (
      spec.vocab_size != model.decoder.vocab_size):
    raise ValueError(f'config.model.decoder.vocab_size={model.decoder.vocab_size}: LocCa needs '
                     f'{spec.vocab_size} (the tokenizer\'s {spec.text_vocab} ids, '
                     f'{spec.bins} box bins, {len(locca.TASKS)} task tokens).')
  data = {k: v for k, v in config.data.items() if k != 'naflex'}
  return PipelineConfig(
      **data, global_batch_size=config.batch_size, image_size=model.vision.image_size,
      tokenizer=tokenizer, seed=config.seed, vocab_size=model.text.vocab_size, locca=spec,
      naflex=naflex_batching(config, model, num_devices))


def _step_config(config: ml_collections.ConfigDict, model: CLIPConfig) -> StepConfig:
  return StepConfig(
      loss=config.loss.kind, loss_chunk_size=config.loss.chunk_size or None,
      optim=OptimConfig(**config.optim), total_steps=config.total_steps, seed=config.seed,
      batch_size=config.batch_size, distill_teacher=config.distill.teacher,
      distill_weight=config.distill.weight,
      patch_dropout_tail_steps=(config.patch_dropout_tail_steps
                                if model.vision.patch_dropout > 0 else 0),
      contrastive_weight=config.loss.contrastive_weight,
      caption_weight=_caption_weight(config, model))


def _caption_weight(config: ml_collections.ConfigDict, model: CLIPConfig) -> float:
  if model.decoder is None:
    return 0.0
  return config.locca.weight if model.decoder.embed_tokens else config.loss.caption_weight


def _check(config: ml_collections.ConfigDict, model: CLIPConfig, step: StepConfig,
           num_devices: int) -> None:
  """The checks that need no file: loss, schedule, mesh, batch divisibility, steps."""
  optim = step.optim
  if step.loss not in KINDS:
    raise ValueError(f'config.loss.kind must be one of {KINDS}, got {step.loss!r}')
  if step.loss != 'softmax' and model.init_logit_bias is None:
    raise ValueError(f'config.loss.kind={step.loss!r} needs a logit bias and the preset '
                     f'{config.model.name!r} has none: set config.model.init_logit_bias=-10 '
                     '(and config.model.init_logit_scale=2.302585, as OpenCLIP\'s --siglip).')
  if optim.schedule not in SCHEDULES:
    raise ValueError(f'config.optim.schedule must be one of {SCHEDULES}')
  if optim.grad_accum_mode not in accumulate.MODES:
    raise ValueError(f'config.optim.grad_accum_mode must be one of {accumulate.MODES}, got '
                     f'{optim.grad_accum_mode!r}')
  dp = data_parallel_size(config, num_devices)
  if step.batch_size % (dp * optim.grad_accum):
    raise ValueError(f'config.batch_size={step.batch_size} must be divisible by the '
                     f'data-parallel size {dp} x config.optim.grad_accum={optim.grad_accum}.')
  if model.decoder is not None and model.decoder.embed_tokens and not config.locca.weight:
    raise ValueError('config.model.decoder.embed_tokens=True is LocCa\'s decoder: set '
                     'config.locca.weight > 0 (its data) or leave embed_tokens unset.')
  if step.total_steps <= 0:
    raise ValueError('config.total_steps must be positive.')
  if is_naflex(model.vision) and config.distill.teacher:
    raise ValueError(f'config.distill.teacher={config.distill.teacher!r}: a teacher embeds square '
                     'images, and a NaFlex model trains on patch sequences.')
  if not 0 <= optim.ema_decay < 1:
    raise ValueError(f'config.optim.ema_decay={optim.ema_decay} must be in [0, 1) '
                     '(0 = no EMA).')
  if not 0 <= config.patch_dropout_tail_steps <= step.total_steps:
    raise ValueError(f'config.patch_dropout_tail_steps={config.patch_dropout_tail_steps} must be '
                     f'in [0, config.total_steps={step.total_steps}].')
