r"""Trains a CLIP or SigLIP model from a config.

  python -m clip_jax.train --config configs/demo.py --workdir /tmp/demo_run \
      [--config.total_steps=2000] [--config.batch_size=256]

Flow (one function per phase): validate config -> distributed init -> mesh -> data ->
model + optimizer state created already sharded -> restore the latest checkpoint of the
workdir (or `init_from`) -> loop (step, log, evaluate, checkpoint). Preemption (SIGTERM)
saves a checkpoint at the next step and exits cleanly; restarting the same command
resumes exactly where the run stopped.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any, Callable

from absl import app, flags
from ml_collections import config_flags

from clip_jax import distributed

distributed.configure_from_env()  # before JAX initialises its backends

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from etils import epath  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.experimental import multihost_utils  # pylint: disable=wrong-import-position

from clip_jax import checkpoint as ckpt  # pylint: disable=wrong-import-position
from clip_jax.api import FunctionalModel  # pylint: disable=wrong-import-position
from clip_jax import optim, sharding  # pylint: disable=wrong-import-position
from clip_jax.data.make_demo import make_demo  # pylint: disable=wrong-import-position
from clip_jax.data.pipeline import Loader, PipelineConfig  # pylint: disable=wrong-import-position
from clip_jax.data.specs import parse_spec  # pylint: disable=wrong-import-position
from clip_jax.data.tokenizers import tokenizer_from_spec  # pylint: disable=wrong-import-position
from clip_jax.data.transforms import normalize_on_device  # pylint: disable=wrong-import-position
from clip_jax.eval import zeroshot  # pylint: disable=wrong-import-position
from clip_jax.eval.encoder import Encoder  # pylint: disable=wrong-import-position
from clip_jax.losses import KINDS, contrastive_loss  # pylint: disable=wrong-import-position
from clip_jax.metrics import (MetricLogger, peak_flops_per_device,  # pylint: disable=wrong-import-position
                              train_flops_per_sample)
from clip_jax.models.clip import CLIP, MAX_LOGIT_SCALE  # pylint: disable=wrong-import-position
from clip_jax.models.config import CLIPConfig  # pylint: disable=wrong-import-position
from clip_jax.models.presets import get_config  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')

Params = dict[str, Any]


# --- config -------------------------------------------------------------------------------

def model_config(config) -> CLIPConfig:
  """The preset with `config.model.{vision,text}` overrides and execution options."""
  overrides = {f'{tower}.{k}': v for tower in ('vision', 'text')
               for k, v in config.model[tower].items() if v is not None}
  overrides.update(dtype=config.model.dtype, scan_layers=config.model.scan_layers,
                   remat=config.model.remat)
  return get_config(config.model.name, **overrides)


def validate(config, workdir: str, mesh_devices: int) -> None:
  """Every check that can fail before any compile, each naming the key or flag."""
  if config.loss.kind not in KINDS:
    raise ValueError(f'config.loss.kind must be one of {KINDS}, got {config.loss.kind!r}')
  if config.optim.schedule not in optim.SCHEDULES:
    raise ValueError(f'config.optim.schedule must be one of {optim.SCHEDULES}')
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, mesh_devices)))
  dp = shape['data'] * shape['fsdp']
  if config.batch_size % (dp * config.optim.grad_accum):
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the '
                     f'data-parallel size {dp} x config.optim.grad_accum='
                     f'{config.optim.grad_accum}.')
  if config.total_steps <= 0:
    raise ValueError('config.total_steps must be positive.')
  model_config(config)  # unknown preset / impossible architecture
  if config.data.kind == 'tar':
    parse_spec(config.data.train, config.data.weights or None)  # names a spec with no file
  _check_workdir(workdir)


def ensure_demo_data(config) -> None:
  """Generates the demo dataset on first use (process 0; the others wait for it)."""
  demo = config.data.demo_dir
  if demo and not (epath.Path(demo) / 'classnames.txt').exists():
    if jax.process_index() == 0:
      logging.info('Generating the demo dataset in %s', demo)
      make_demo(demo)
  if demo and jax.process_count() > 1:
    multihost_utils.sync_global_devices('demo_data')


def _check_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'--workdir {workdir} is not writable: {e}') from e


# --- data ---------------------------------------------------------------------------------

def make_loader(config, cfg: CLIPConfig, mesh) -> Loader:
  tokenizer = tokenizer_from_spec(cfg.text.tokenizer, cfg.text.context_length)
  d = config.data
  pipeline = PipelineConfig(
      global_batch_size=config.batch_size, image_size=cfg.vision.image_size,
      tokenizer=tokenizer, kind=d.kind, train=d.train, weights=d.weights or None,
      caption_key=d.caption_key, augment=d.augment, crop_scale=tuple(d.crop_scale),
      seed=config.seed, shuffle_window=d.shuffle_window, cycle_length=d.cycle_length,
      workers=d.workers, vocab_size=cfg.text.vocab_size)
  return Loader(pipeline, sharding.batch_sharding(mesh))


# --- model and optimizer state ------------------------------------------------------------

def build_model(cfg: CLIPConfig, mesh, rules, seed: int
                ) -> tuple[FunctionalModel, Params, Callable]:
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
  try:
    model.check(params)
  except ValueError as e:
    raise ValueError(f'config.init_from={config.init_from} does not fit config.model '
                     f'({config.model.name}): {e}') from e
  logging.info('Initialised from %s', config.init_from)
  return jax.device_put(params, shardings)


def create_state(params: Params, tx, mesh) -> dict[str, Any]:
  """Params, optimizer state (sharded like the params) and replicated step counters."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_state = jax.tree.map(  # moments follow the params; scalars (counts) are replicated
      lambda x: x if len(x.sharding.device_set) == mesh.size else jax.device_put(x, replicated),
      jax.jit(tx.init)(params))
  counter = lambda: jax.device_put(np.zeros((), np.int32), replicated)  # pylint: disable=unnecessary-lambda-assignment
  # Separate buffers: the step donates its state, and a buffer cannot be donated twice.
  return {'params': params, 'opt_state': opt_state, 'step': counter(), 'bad_steps': counter()}


# --- the step -----------------------------------------------------------------------------

def make_train_step(config, model: FunctionalModel, tx, mesh, state_shardings, batch_sharding):
  """One jitted step: loss, grads (with accumulation), update, clamp, NaN guard."""
  accum = config.optim.grad_accum
  loss_kind, chunk = config.loss.kind, config.loss.chunk_size or None
  preprocess = model.cfg.preprocess

  def loss_fn(params, batch):
    clip = model.bind(params)
    images = normalize_on_device(batch['image'], preprocess).astype(model.cfg.dtype)
    img, txt, scale, bias = clip(images, batch['text'])
    if loss_kind == 'softmax':
      bias = None
    return contrastive_loss(img, txt, scale, bias, kind=loss_kind, mesh=mesh,
                            batch_axes=sharding.BATCH_AXES, chunk_size=chunk)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated_grads(params, batch):
    """Mean over micro-batches; each micro-batch's negatives are its own rows only."""
    if accum == 1:
      return grad_fn(params, batch)

    def split(x):  # rows j*accum + i form micro-batch i: every device keeps its share
      x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
              None, *batch_sharding.spec)))

    def body(carry, micro):
      (loss, metrics), grads = grad_fn(params, micro)
      return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(
        lambda x: x[0], jax.tree.map(split, batch))))
    total, _ = jax.lax.scan(body, zeros, jax.tree.map(split, batch))
    return jax.tree.map(lambda x: x / accum, total)

  def step_fn(state, batch):
    params = state['params']
    (loss, metrics), grads = accumulated_grads(params, batch)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    new_params['logit_scale'] = jnp.minimum(new_params['logit_scale'], MAX_LOGIT_SCALE)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # pylint: disable=unnecessary-lambda-assignment
    new_state = {'params': keep(new_params, params),
                 'opt_state': keep(opt_state, state['opt_state']),
                 'step': state['step'] + 1,
                 'bad_steps': jnp.where(ok, 0, state['bad_steps'] + 1)}
    metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm,
               'logit_scale': jnp.exp(params['logit_scale']),
               'logit_bias': params.get('logit_bias', jnp.zeros(())),
               'skipped_nonfinite': 1 - ok.astype(jnp.int32),
               'bad_steps': new_state['bad_steps']}
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


# --- evaluation ---------------------------------------------------------------------------

class ZeroShotEval:
  """Periodic zero-shot accuracy on labelled tar shards (the evaluator CLI's code)."""

  def __init__(self, config, model: FunctionalModel, mesh, params: Params):
    self.enabled = bool(config.eval.zeroshot_shards)
    if not self.enabled:
      return
    cfg = model.cfg
    self.classnames = zeroshot.read_lines(config.eval.classnames, 'config.eval.classnames')
    self.templates = list(config.eval.templates)
    zeroshot.check_templates(self.templates, 'config.eval.templates')
    self.tokenizer = tokenizer_from_spec(cfg.text.tokenizer, cfg.text.context_length)
    examples = list(zeroshot.shard_images(config.eval.zeroshot_shards, cfg.vision.image_size,
                                          cfg.preprocess))
    if not examples:
      raise ValueError(f'config.eval.zeroshot_shards={config.eval.zeroshot_shards!r} holds no '
                       'labelled sample.')
    self.examples = examples
    self.encoder = Encoder(model, params, mesh)

  def __call__(self, params: Params) -> dict[str, float]:
    self.encoder.params = params
    result = zeroshot.run(self.encoder, self.tokenizer, self.classnames, self.templates,
                          iter(self.examples), len(self.examples))
    return {f'zeroshot_{k}': result[k] for k in ('top1', 'top5')}


# --- checkpoints --------------------------------------------------------------------------

class Preemption:
  """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: checkpointing at the next step, then exiting.')
    self.requested = True


def restore_or_init(manager: ckpt.TrainCheckpoints, state: dict, loader: Loader
                    ) -> tuple[dict, int]:
  step = manager.latest_step()
  if step is None:
    return state, 0
  logging.info('Resuming from %s step %d', manager.directory, step)
  return manager.restore(step, state, loader), step


# --- the loop -----------------------------------------------------------------------------

def train(config, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics."""
  ensure_demo_data(config)
  validate(config, workdir, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  cfg = model_config(config)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model, param_shardings, init_fn = build_model(cfg, mesh, rules, config.seed)
  params = init_params(config, model, param_shardings, init_fn)
  tx = optim.make_optimizer(config.optim, config.total_steps, params)
  state = create_state(params, tx, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  loader = make_loader(config, cfg, mesh)
  manager = ckpt.TrainCheckpoints(workdir, cfg, config.checkpoint_every, config.keep_checkpoints)
  state, start = restore_or_init(manager, state, loader)
  step_fn = make_train_step(config, model, tx, mesh, state_shardings,
                            sharding.batch_sharding(mesh))
  evaluate = ZeroShotEval(config, model, mesh, state['params'])
  logger = MetricLogger(workdir)
  if start == 0:
    from clu import parameter_overview  # pylint: disable=import-outside-toplevel
    logger.write_config(config, parameter_overview.get_parameter_overview(state['params']))
  flops = train_flops_per_sample(cfg, cfg.text.context_length) * config.batch_size
  peak = peak_flops_per_device(config.peak_flops_per_device)
  schedule = optim.schedule(config.optim, config.total_steps)
  preemption = Preemption()
  try:
    return run_loop(config, state, step_fn, loader, manager, evaluate, logger, start,
                    flops, peak, schedule, preemption)
  finally:  # worker processes and async saves must end even when the loop raises
    manager.close()
    logger.close()
    loader.close()


def run_loop(config, state, step_fn, loader, manager, evaluate, logger, start, flops, peak,
             schedule, preemption) -> dict[str, float]:
  last: dict[str, float] = {}
  previous = None  # (step, its consecutive non-finite count) of the step before
  step, window_start, data_wait = start, time.perf_counter(), 0.0
  profile_dir = str(epath.Path(manager.directory).parent / 'profile')
  while step < config.total_steps:
    if config.profile_start_step and step == config.profile_start_step - 1:
      jax.profiler.start_trace(profile_dir)
    if config.profile_start_step and step == config.profile_start_step - 1 + config.profile_steps:
      jax.profiler.stop_trace()
      logging.info('Profiler trace written to %s', profile_dir)
    wait_start = time.perf_counter()
    batch = next(loader)
    data_wait += time.perf_counter() - wait_start
    state, metrics = step_fn(state, batch)
    step += 1
    # Read the previous step's counter: waiting on it lets this step run on the device
    # while the host fetches the next batch (reading this step's would serialise them).
    check_finite(previous, config.max_bad_steps, manager.directory)
    previous = (step, metrics['bad_steps'])
    if step % config.log_every == 0 or step == config.total_steps:
      seconds = (time.perf_counter() - window_start) / config.log_every
      last = log_step(logger, step, metrics, schedule, seconds, data_wait / config.log_every,
                      config.batch_size, flops, peak, loader)
      window_start, data_wait = time.perf_counter(), 0.0
    if evaluate.enabled and (step % config.eval_every == 0 or step == config.total_steps):
      results = evaluate(state['params'])
      logger.write(step, results)
      last.update(results)
      logging.info('step %d: %s', step, results)
    if manager.should_save(step) or step == config.total_steps or preemption.requested:
      manager.save(step, state, loader, force=preemption.requested or step == config.total_steps)
    if preemption.requested:
      break
  check_finite(previous, config.max_bad_steps, manager.directory)
  return last


def check_finite(step_and_count, limit: int, checkpoints) -> None:
  """Stops the run after `limit` non-finite steps in a row (none of them was applied)."""
  if step_and_count is not None and int(step_and_count[1]) >= limit:
    raise FloatingPointError(
        f'{limit} steps in a row had a non-finite loss or gradient (last: step '
        f'{step_and_count[0]}); stopping. The last good checkpoint is in {checkpoints}.')


def log_step(logger, step, metrics, schedule, seconds, data_wait, batch_size, flops, peak,
             loader) -> dict[str, float]:
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  achieved = flops / seconds / jax.device_count()
  scalars = {**metrics, 'lr': float(schedule(step - 1)), 'step_time': seconds,
             'data_wait': data_wait, 'samples_per_second': batch_size / seconds,
             'mfu': achieved / peak if peak else None,
             **{f'skipped/{k}': v for k, v in loader.skipped.items()}}
  logger.write(step, scalars)
  logging.info('step %d | loss %.4f | lr %.2e | scale %.1f | %.0f samples/s | data wait %.0f%%',
               step, metrics['loss'], scalars['lr'], metrics['logit_scale'],
               scalars['samples_per_second'], 100 * data_wait / max(seconds, 1e-9))
  return {k: v for k, v in scalars.items() if v is not None}


class _QuietLibraries(logging.Filter):
  """Keeps orbax's and grain's per-operation INFO lines out of the training log."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = ('orbax' in record.pathname or 'grain' in record.pathname)
    return record.levelno >= logging.WARNING or not noisy


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  distributed.initialize()
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required.')
  last = train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0 and 'zeroshot_top1' in last:
    print(f'Zero-shot on {_CONFIG.value.eval.zeroshot_shards}: top-1 {last["zeroshot_top1"]:.1%}, '
          f'top-5 {last["zeroshot_top5"]:.1%}; checkpoints and logs in {_WORKDIR.value}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
