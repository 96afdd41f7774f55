r"""Trains a CLIP or SigLIP model from a config.

  python -m clip_jax.train --config configs/demo.py --workdir /tmp/demo_run \
      [--config.total_steps=2000] [--config.batch_size=256]

Read top to bottom: config checks -> model, optimizer and data (`setup`, which returns
the `Run` the loop needs) -> the jitted step -> the loop (`train_loop`: step, then the
named periodic parts: profile, log, evaluate, checkpoint). Preemption (SIGTERM) saves a
checkpoint at the next step and exits cleanly; restarting the same command resumes
exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from clu import parameter_overview
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from clip_jax import accumulate, distill, distributed, optim, sharding
from clip_jax import checkpoint as ckpt
from clip_jax.data.pipeline import Loader, PipelineConfig
from clip_jax.data.specs import parse_spec
from clip_jax.data.tokenizers import tokenizer_from_spec
from clip_jax.data.transforms import normalize_on_device
from clip_jax.eval import zeroshot
from clip_jax.eval.encoder import Encoder
from clip_jax.losses import KINDS, contrastive_loss, distillation_loss
from clip_jax.metrics import MetricLogger, peak_flops_per_device, train_flops_per_sample
from clip_jax.models.clip import CLIP, MAX_LOGIT_SCALE
from clip_jax.models.config import CLIPConfig
from clip_jax.models.functional import FunctionalModel
from clip_jax.models.pos_embed import fit_pos_embeds
from clip_jax.models.presets import get_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')

Params = dict[str, Any]
State = dict[str, Any]
StepFn = Callable[[State, dict], tuple[State, dict]]


# --- config -------------------------------------------------------------------------------

def model_config(config: ml_collections.ConfigDict) -> CLIPConfig:
  """The preset with `config.model.{vision,text}` and logit init overrides, and execution
  options."""
  overrides = {f'{tower}.{k}': v for tower in ('vision', 'text')
               for k, v in config.model[tower].items() if v is not None}
  overrides.update({k: config.model[k] for k in ('init_logit_scale', 'init_logit_bias')
                    if config.model[k] is not None})
  overrides.update({k: config.model[k] for k in ('dtype', 'scan_layers', 'remat', 'attention')})
  return get_config(config.model.name, **overrides)


def pipeline_config(config: ml_collections.ConfigDict, cfg: CLIPConfig) -> PipelineConfig:
  """`config.data` plus what the pipeline derives from the model and the run."""
  return PipelineConfig(
      **config.data, global_batch_size=config.batch_size, image_size=cfg.vision.image_size,
      tokenizer=tokenizer_from_spec(cfg.text.tokenizer, cfg.text.context_length),
      seed=config.seed, vocab_size=cfg.text.vocab_size)


def validate(config: ml_collections.ConfigDict, workdir: str, mesh_devices: int) -> None:
  """Every check that can fail before any compile, each naming the key or flag."""
  check_config(config, mesh_devices)
  pipeline = pipeline_config(config, model_config(config))  # unknown preset, bad data keys
  distill.check(config, model_config(config))  # reads the teacher's model config
  if pipeline.kind == 'tar':
    parse_spec(pipeline.train, pipeline.weights or None)  # names a spec with no file
  _check_workdir(workdir)


def check_config(config: ml_collections.ConfigDict, mesh_devices: int) -> None:
  """The checks that need no file: loss, schedule, mesh, batch divisibility, steps."""
  if config.loss.kind not in KINDS:
    raise ValueError(f'config.loss.kind must be one of {KINDS}, got {config.loss.kind!r}')
  if config.loss.kind != 'softmax' and model_config(config).init_logit_bias is None:
    raise ValueError(f'config.loss.kind={config.loss.kind!r} needs a logit bias and the preset '
                     f'{config.model.name!r} has none: set config.model.init_logit_bias=-10 '
                     '(and config.model.init_logit_scale=2.302585, as OpenCLIP\'s --siglip).')
  if config.optim.schedule not in optim.SCHEDULES:
    raise ValueError(f'config.optim.schedule must be one of {optim.SCHEDULES}')
  if config.optim.grad_accum_mode not in accumulate.MODES:
    raise ValueError(f'config.optim.grad_accum_mode must be one of {accumulate.MODES}, got '
                     f'{config.optim.grad_accum_mode!r}')
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, mesh_devices)))
  dp = shape['data'] * shape['fsdp']
  if config.batch_size % (dp * config.optim.grad_accum):
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the '
                     f'data-parallel size {dp} x config.optim.grad_accum='
                     f'{config.optim.grad_accum}.')
  if config.total_steps <= 0:
    raise ValueError('config.total_steps must be positive.')
  if not 0 <= config.optim.ema_decay < 1:
    raise ValueError(f'config.optim.ema_decay={config.optim.ema_decay} must be in [0, 1) '
                     '(0 = no EMA).')
  if not 0 <= config.patch_dropout_tail_steps <= config.total_steps:
    raise ValueError(f'config.patch_dropout_tail_steps={config.patch_dropout_tail_steps} must be '
                     f'in [0, config.total_steps={config.total_steps}].')


def _check_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'--workdir {workdir} is not writable: {e}') from e


# --- model and optimizer state ------------------------------------------------------------

def build_model(cfg: CLIPConfig, mesh, rules, seed: int
                ) -> tuple[FunctionalModel, Params, Callable[[], Params]]:
  """Functional model, param shardings and a jitted init that creates params sharded."""
  model = FunctionalModel.create(cfg)
  shardings = sharding.param_shardings(model.abstract, mesh, rules)

  def init() -> Params:
    return nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(seed)), nnx.Param))

  return model, shardings, jax.jit(init, out_shardings=shardings)


def init_params(config, model: FunctionalModel, shardings: Params, init_fn) -> Params:
  if not config.init_from:
    return init_fn()
  _, params = ckpt.load_params(config.init_from)
  if model.cfg.init_logit_bias is not None and 'logit_bias' not in params:
    # A CLIP checkpoint for a sigmoid loss: the bias starts at config.model.init_logit_bias.
    params['logit_bias'] = np.float32(model.cfg.init_logit_bias)
  params = fit_pos_embeds(params, model.cfg)  # another image size, patch grid or context
  try:
    model.check(params)
  except ValueError as e:
    raise ValueError(f'config.init_from={config.init_from} does not fit config.model '
                     f'({config.model.name}): {e}') from e
  logging.info('Initialised from %s', config.init_from)
  return jax.device_put(params, shardings)


def state_shardings(params: Params, param_shardings: Params, tx, mesh, ema: bool = False
                    ) -> State:
  """Where the state lives: optimizer moments and the EMA sharded like their params, the
  rest (counts, step counters) replicated. `params` may be arrays or shapes
  (`jax.ShapeDtypeStruct`)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  masked = lambda x: isinstance(x, optax.MaskedNode)  # a frozen parameter has no moments
  opt_state = optax.tree_map_params(
      tx, lambda x, s: x if masked(x) else s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  return {'params': param_shardings, 'opt_state': opt_state, 'step': replicated,
          'bad_steps': replicated, **({'ema': param_shardings} if ema else {})}


def create_state(params: Params, tx, mesh, param_shardings: Params | None = None,
                 ema: bool = False) -> State:
  """Params, optimizer state, step counters and (`ema`) the EMA of the params, which starts
  at the params; placed by `state_shardings`.

  Under `jax.eval_shape` (abstract params, as `clip_jax.aot` does) pass `param_shardings`.
  """
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
  shardings = state_shardings(params, param_shardings, tx, mesh)
  opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)

  def counter():  # separate buffers: the step donates its state, a buffer only once
    return jax.device_put(np.zeros((), np.int32), shardings['step'])

  # jnp.copy: the EMA needs buffers of its own, as the counters do.
  return {'params': params, 'opt_state': opt_state, 'step': counter(), 'bad_steps': counter(),
          **({'ema': jax.tree.map(jnp.copy, params)} if ema else {})}


# --- the step -----------------------------------------------------------------------------

def make_train_step(config, model: FunctionalModel, tx, mesh, state_shardings, batch_sharding,
                    teacher: distill.Teacher | None = None, patch_dropout: bool = True):
  """One jitted step: loss, grads (`clip_jax.accumulate`), update, clamp, NaN guard, and
  with `optim.ema_decay` the EMA (the state then holds one: `create_state(ema=True)`).

  With a `teacher` the step takes the teacher's params as a third argument and adds
  `distill.weight` x the distillation loss; the teacher embeds the whole batch before the
  student's (accumulated) gradients, which see its features as constants.
  `patch_dropout=False` builds the unmasked step (every patch kept) of a model with
  `vision.patch_dropout`, for the run's tail.
  """
  loss_kind, chunk = config.loss.kind, config.loss.chunk_size or None
  ema_decay = config.optim.ema_decay
  accum, accum_mode = config.optim.grad_accum, config.optim.grad_accum_mode
  preprocess = model.cfg.preprocess
  patch_dropout = patch_dropout and model.cfg.vision.patch_dropout > 0

  def embed(params, batch):
    # Frozen parameters enter as constants: their backward pass is never built.
    clip = model.bind(optim.stop_frozen(params, config.optim.freeze))
    images = normalize_on_device(batch['image'], preprocess).astype(model.cfg.dtype)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for sharding.constrain_batch
      img, txt, scale, bias = clip(images, batch['text'], batch.get('dropout_keys'))
    return img, txt, scale, None if loss_kind == 'softmax' else bias

  def loss_of(img, txt, scale, bias, teacher_features=None):
    loss, metrics = contrastive_loss(img, txt, scale, bias, kind=loss_kind, mesh=mesh,
                                     batch_axes=sharding.BATCH_AXES, chunk_size=chunk)
    if teacher_features is None:
      return loss, metrics
    distill_loss = distillation_loss(img, txt, scale, *teacher_features, mesh=mesh,
                                     batch_axes=sharding.BATCH_AXES)
    return loss + config.distill.weight * distill_loss, {
        **metrics, 'contrastive_loss': loss, 'distill_loss': distill_loss}

  def step_fn(state, batch, teacher_params=None):
    params = state['params']
    if patch_dropout:
      batch = {**batch, 'dropout_keys': dropout_keys(config.seed, state['step'],
                                                     batch['image'].shape[0], batch_sharding)}
    teacher_features = (None if teacher is None else
                        teacher.embed(teacher_params, batch, mesh, accum, batch_sharding))
    grads_fn = accumulate.value_and_grad(
        embed, functools.partial(loss_of, teacher_features=teacher_features), accum=accum,
        mode=accum_mode, batch_sharding=batch_sharding)
    (loss, metrics), grads = grads_fn(params, batch)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    new_params['logit_scale'] = jnp.minimum(new_params['logit_scale'], MAX_LOGIT_SCALE)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep(new, old):  # a non-finite step changes nothing
      return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = {'params': keep(new_params, params),
                 'opt_state': keep(opt_state, state['opt_state']),
                 'step': state['step'] + 1,
                 'bad_steps': jnp.where(ok, 0, state['bad_steps'] + 1)}
    if ema_decay:
      # ema = d * ema + (1 - d) * params, after the update. It starts at the initial params,
      # so it needs no debiasing (optax.ema, made for gradients, starts at zeros and does).
      ema = optax.tree.update_moment(new_params, state['ema'], ema_decay, order=1)
      new_state['ema'] = keep(ema, state['ema'])
    metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm,
               'logit_scale': jnp.exp(params['logit_scale']),
               'logit_bias': params.get('logit_bias', jnp.zeros(())),
               'skipped_nonfinite': 1 - ok.astype(jnp.int32),
               'bad_steps': new_state['bad_steps']}
    return new_state, metrics

  in_shardings = (state_shardings, batch_sharding, *([teacher.shardings] if teacher else []))
  return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(state_shardings, None),
                 donate_argnums=(0,))


def dropout_keys(seed: int, step: jax.Array, batch_size: int, batch_sharding) -> jax.Array:
  """One key per row of the global batch, a function of (seed, step, row) only: a resumed
  run, another mesh or any `optim.grad_accum` drops the same patches of the same image."""
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), batch_size)
  return jax.lax.with_sharding_constraint(keys, batch_sharding)


def fresh_state_and_step(config: ml_collections.ConfigDict, mesh
                         ) -> tuple[FunctionalModel, State, Callable[[State, dict], Any]]:
  """The model, a freshly initialised state and the jitted step of `config` on `mesh`: no
  data, checkpoint or teacher (for benchmarks and tests that drive the step directly)."""
  cfg = model_config(config)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model, _, init = build_model(cfg, mesh, rules, config.seed)
  params = init()
  tx = optim.make_optimizer(config.optim, config.total_steps, params)
  state = create_state(params, tx, mesh, ema=config.optim.ema_decay > 0)
  step = make_train_step(config, model, tx, mesh, jax.tree.map(lambda x: x.sharding, state),
                         sharding.batch_sharding(mesh))
  return model, state, step


# --- evaluation ---------------------------------------------------------------------------

class ZeroShotEval:
  """Periodic zero-shot accuracy on labelled tar shards, streamed.

  Images are decoded batch by batch at each evaluation, never all held in host RAM (ImageNet
  val at 224 px would be ~7.5 GB per process); each process decodes every P-th labelled
  image and the hit counts are summed over processes.
  """

  def __init__(self, config, model: FunctionalModel, mesh):
    cfg = model.cfg
    self.classnames = zeroshot.read_lines(config.eval.classnames, 'config.eval.classnames')
    self.templates = list(config.eval.templates)
    zeroshot.check_templates(self.templates, 'config.eval.templates')
    self.tokenizer = tokenizer_from_spec(cfg.text.tokenizer, cfg.text.context_length)
    self.spec, self.size, self.preprocess = (config.eval.zeroshot_shards, cfg.vision.image_size,
                                             cfg.preprocess)
    self.total = zeroshot.count_labelled(self.spec)
    if not self.total:
      raise ValueError(f'config.eval.zeroshot_shards={self.spec!r} holds no labelled sample.')
    self.encoder = Encoder(model, None, mesh)  # params are set at each evaluation

  def __call__(self, params: Params) -> dict[str, float]:
    self.encoder.params = params
    classifier = zeroshot.build_classifier(self.encoder.texts, self.tokenizer, self.classnames,
                                           self.templates)
    part = (jax.process_index(), jax.process_count())
    examples = zeroshot.shard_images(self.spec, self.size, self.preprocess, part=part)
    hits = np.zeros(2, np.int64)
    most = -(-self.total // jax.process_count())
    for features, labels in self.encoder.local_image_batches(examples, most, desc='zero-shot'):
      if labels:
        hits += zeroshot.correct_counts(features @ classifier.T, labels)
    hits = distributed.sum_over_processes(hits)
    return {'zeroshot_top1': hits[0] / self.total, 'zeroshot_top5': hits[1] / self.total}


# --- preemption ---------------------------------------------------------------------------

class Preemption:
  """A preemption notice (SIGTERM) that every process acts on at the same step.

  One process: a SIGTERM handler sets a flag that the loop reads after each step. Several
  processes: the notice may reach only some hosts, and a process that stopped alone would
  leave the others blocked in collectives. JAX's preemption sync service (started by
  `jax.distributed.initialize`) catches SIGTERM on any process and makes
  `reached_preemption_sync_point(step)` true on all of them at the same step, so every
  process saves that step and exits.
  """

  def __init__(self):
    self.requested = False
    self.synced = jax.process_count() > 1
    if not self.synced:
      signal.signal(signal.SIGTERM, self._handle)

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; call once per step on every process."""
    if self.synced and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
      if self.requested:
        logging.warning('Preemption notice: every process checkpoints step %d, then exits.',
                        step)
    return self.requested

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: checkpointing at the next step, then exiting.')
    self.requested = True


# --- setup: everything the loop needs -----------------------------------------------------

@dataclasses.dataclass
class Run:
  """What the training loop works with; `setup` builds it, `train_loop` advances it."""
  config: ml_collections.ConfigDict
  state: State
  step_fn: StepFn
  loader: Loader
  checkpoints: ckpt.TrainCheckpoints
  logger: MetricLogger
  evaluate: ZeroShotEval | None
  schedule: optax.Schedule
  flops_per_step: float           # analytic training FLOPs of one global batch
  peak_flops: float | None     # per device, for MFU; None when unknown
  preemption: Preemption
  start_step: int
  # A patch-dropout run's unmasked tail: its step function, the step count it starts at and
  # its analytic FLOPs (every patch kept).
  unmasked_step_fn: StepFn | None = None
  unmasked_from: int = 0
  unmasked_flops_per_step: float = 0.0

  def step_fn_at(self, done: int) -> StepFn:
    """The step function that runs after `done` steps: the tail's from `unmasked_from` on.

    A function of the step count alone, so a resumed run switches at the same step."""
    return self.unmasked_step_fn if self.in_unmasked_tail(done) else self.step_fn

  def in_unmasked_tail(self, done: int) -> bool:
    return self.unmasked_step_fn is not None and done >= self.unmasked_from

  def close(self) -> None:
    """Ends worker processes and waits for async saves, also when the loop raised."""
    self.checkpoints.close()
    self.logger.close()
    self.loader.close()


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Config -> mesh -> model and optimizer state (sharded) -> data -> restore -> step."""
  validate(config, workdir, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  cfg = model_config(config)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model, param_shardings, init_fn = build_model(cfg, mesh, rules, config.seed)
  params = init_params(config, model, param_shardings, init_fn)
  tx = optim.make_optimizer(config.optim, config.total_steps, params)
  state = create_state(params, tx, mesh, ema=config.optim.ema_decay > 0)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  pipeline = pipeline_config(config, cfg)
  loader = Loader(pipeline, sharding.batch_sharding(mesh))
  checkpoints = ckpt.TrainCheckpoints(workdir, cfg, config.checkpoint_every,
                                      config.keep_checkpoints)
  start, state, data_restored = checkpoints.restore_latest(state, loader)
  if start:
    logging.info('Resuming from %s step %d', checkpoints.directory, start)
  if start and not data_restored:
    loader.close()
    loader = Loader(dataclasses.replace(pipeline, seed=config.seed + start),
                    sharding.batch_sharding(mesh))
    logging.warning(
        'The checkpoint at step %d was written by a different number of processes: params, '
        'optimizer state and step are restored, but the input position is per process and '
        'is not. The data starts a new pass, reshuffled with seed %d (seed + step): samples '
        'of the interrupted pass may be seen again.', start, config.seed + start)
  teacher, teacher_params = None, None
  if config.distill.teacher:
    teacher, teacher_params = distill.load(config.distill.teacher, mesh, rules,
                                           config.model.dtype)
    logging.info('Distilling from %s (weight %g)', config.distill.teacher, config.distill.weight)
  logger = MetricLogger(workdir, config.tensorboard)
  if not start:
    logger.write_config(config, parameter_overview.get_parameter_overview(state['params']))
  step_args = (config, model, tx, mesh, shardings, sharding.batch_sharding(mesh), teacher)

  def with_teacher(step):
    return step if teacher is None else lambda state, batch: step(state, batch, teacher_params)

  tail = config.patch_dropout_tail_steps if cfg.vision.patch_dropout > 0 else 0
  flops_per_step = lambda c: train_flops_per_sample(c, c.text.context_length) * config.batch_size
  return Run(
      config=config, state=state, step_fn=with_teacher(make_train_step(*step_args)),
      unmasked_step_fn=(with_teacher(make_train_step(*step_args, patch_dropout=False))
                        if tail else None),
      unmasked_from=config.total_steps - tail,
      unmasked_flops_per_step=flops_per_step(cfg.replace(**{'vision.patch_dropout': 0.0})),
      loader=loader, checkpoints=checkpoints, logger=logger,
      evaluate=ZeroShotEval(config, model, mesh) if config.eval.zeroshot_shards else None,
      schedule=optim.schedule(config.optim, config.total_steps),
      flops_per_step=flops_per_step(cfg),
      peak_flops=peak_flops_per_device(config.peak_flops_per_device),
      preemption=Preemption(), start_step=start)


# --- the loop -----------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics."""
  run = setup(config, workdir)
  try:
    return train_loop(run)
  finally:
    run.close()


def train_loop(run: Run) -> dict[str, float]:
  """Steps until `total_steps` or preemption; returns the last logged metrics."""
  config = run.config
  step, last = run.start_step, {}
  previous = None  # (step, its consecutive non-finite count) of the step before
  window = Window(step)
  profile = _profiler(config, run.checkpoints.directory.parent / 'profile')
  with _progress_bar(config.total_steps, step) as bar:
    while step < config.total_steps:
      batch = window.next_batch(run.loader)
      run.state, metrics = run.step_fn_at(step)(run.state, batch)
      step += 1
      # Read the previous step's counter: waiting on it lets this step run on the device
      # while the host fetches the next batch (reading this step's would serialise them).
      check_finite(previous, config.max_bad_steps, run.checkpoints.directory)
      previous = (step, metrics['bad_steps'])
      final = step == config.total_steps
      if profile:
        profile(step)
      if step % config.log_every == 0 or final:
        last = log_metrics(run, step, metrics, window, bar)
      preempted = run.preemption.reached(step)
      with window.paused():  # evaluation and saving are not training throughput
        if run.evaluate and (step % config.eval_every == 0 or final):
          last.update(evaluate(run, step))
        save_checkpoint(run, step, force=final or preempted)
      bar.update(1)
      if preempted:
        break
  check_finite(previous, config.max_bad_steps, run.checkpoints.directory)
  return last


class Window:
  """Wall time, data wait and step count since the last log line.

  Read only after the device finished the window's last step (dispatch is async, so the
  clock alone would count steps still queued), and divided by the steps it really holds.
  """

  def __init__(self, step: int):
    self.reset(step)

  def reset(self, step: int) -> None:
    self.first_step, self.start, self.data_wait, self.excluded = step, time.perf_counter(), 0., 0.

  def next_batch(self, loader: Loader) -> dict:
    start = time.perf_counter()
    batch = next(loader)
    self.data_wait += time.perf_counter() - start
    return batch

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    yield
    self.excluded += time.perf_counter() - start

  def close(self, step: int, device_values: Any) -> tuple[float, float, Any]:
    """(seconds per step, data wait per step, host values) for the window ending now."""
    host_values = jax.device_get(device_values)  # waits for the window's last step
    steps = max(step - self.first_step, 1)
    seconds = (time.perf_counter() - self.start - self.excluded) / steps
    data_wait = self.data_wait / steps
    self.reset(step)
    return seconds, data_wait, host_values


def log_metrics(run: Run, step: int, metrics: dict, window: Window, bar) -> dict[str, float]:
  seconds, data_wait, metrics = window.close(step, metrics)
  metrics = {k: float(v) for k, v in metrics.items()}
  flops = run.unmasked_flops_per_step if run.in_unmasked_tail(step - 1) else run.flops_per_step
  achieved = flops / seconds / jax.device_count()
  scalars = {**metrics, 'lr': float(run.schedule(step - 1)), 'step_time': seconds,
             'data_wait': data_wait, 'samples_per_second': run.config.batch_size / seconds,
             'mfu': achieved / run.peak_flops if run.peak_flops else None,
             **{f'skipped/{k}': v for k, v in run.loader.skipped.items()}}
  run.logger.write(step, scalars)
  line = (f'step {step} | loss {metrics["loss"]:.4f} | lr {scalars["lr"]:.2e} | '
          f'scale {metrics["logit_scale"]:.1f} | {scalars["samples_per_second"]:.0f} samples/s '
          f'| data wait {100 * data_wait / max(seconds, 1e-9):.0f}%')
  if bar.disable:
    logging.info(line)
  else:
    bar.set_postfix_str(f'loss {metrics["loss"]:.3f}, {scalars["samples_per_second"]:.0f}/s')
  return {k: v for k, v in scalars.items() if v is not None}


def evaluate(run: Run, step: int) -> dict[str, float]:
  """Zero-shot accuracy of the params and, with an EMA, of the EMA (`ema/` keys)."""
  results = run.evaluate(run.state['params'])
  if 'ema' in run.state:
    results.update({f'ema/{k}': v for k, v in run.evaluate(run.state['ema']).items()})
  run.logger.write(step, results)
  logging.info('step %d: %s', step, results)
  return results


def save_checkpoint(run: Run, step: int, force: bool) -> None:
  if force or run.checkpoints.should_save(step):
    run.logger.flush()  # on gs:// metrics.jsonl is uploaded now, not line by line
    run.checkpoints.save(step, run.state, run.loader, force=force)


def check_finite(step_and_count, limit: int, checkpoints) -> None:
  """Stops the run after `limit` non-finite steps in a row (none of them was applied)."""
  if step_and_count is not None and int(step_and_count[1]) >= limit:
    raise FloatingPointError(
        f'{limit} steps in a row had a non-finite loss or gradient (last: step '
        f'{step_and_count[0]}); stopping. The last good checkpoint is in {checkpoints}.')


def _profiler(config, logdir: epath.Path) -> Callable[[int], bool] | None:
  """clu's profiler window: `profile_steps` steps from `profile_start_step` (TensorBoard)."""
  if not config.profile_start_step:
    return None
  from clu import periodic_actions  # imports TensorFlow (~3 s): only when profiling
  return periodic_actions.Profile(logdir=logdir, num_profile_steps=config.profile_steps,
                                  profile_duration_ms=None,
                                  first_profile=config.profile_start_step,
                                  every_steps=None, every_secs=None)


def _progress_bar(total: int, initial: int) -> tqdm:
  """A step bar on process 0 in a terminal; log lines replace it everywhere else."""
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
              disable=jax.process_index() != 0 or not sys.stderr.isatty())


# --- the binary ---------------------------------------------------------------------------

class _QuietLibraries(logging.Filter):
  """Keeps orbax's and grain's per-operation INFO lines out of the training log."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = ('orbax' in record.pathname or 'grain' in record.pathname)
    return record.levelno >= logging.WARNING or not noisy


def next_steps(config: ml_collections.ConfigDict, workdir: str, last: dict[str, float]) -> str:
  """What the run reached and the commands that use its checkpoint."""
  lines = []
  if 'zeroshot_top1' in last:
    lines.append(f'Zero-shot on {config.eval.zeroshot_shards}: top-1 '
                 f'{last["zeroshot_top1"]:.1%}, top-5 {last["zeroshot_top5"]:.1%}')
  if 'ema/zeroshot_top1' in last:
    lines.append(f'  with the EMA of the params: top-1 {last["ema/zeroshot_top1"]:.1%}, '
                 f'top-5 {last["ema/zeroshot_top5"]:.1%}')
  lines.append(f'Checkpoints and logs: {workdir} (tensorboard --logdir {workdir})')
  lines.append('Next:')
  if config.eval.zeroshot_shards:
    lines.append(f'  python -m clip_jax.evaluate --workdir {workdir} --zeroshot_shards '
                 f"'{config.eval.zeroshot_shards}' --classnames {config.eval.classnames}")
  lines.append(f'  python -m clip_jax.export --checkpoint {workdir} --out {workdir}/open_clip')
  lines.append(f'  python -m clip_jax.demo --checkpoint {workdir}')
  if config.optim.ema_decay:
    lines.append('  (evaluate and export take --ema for the EMA of the params)')
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  distributed.initialize()
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required.')
  last = train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(next_steps(_CONFIG.value, _WORKDIR.value, last))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
