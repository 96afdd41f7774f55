r"""Trains a CLIP or SigLIP model from a config.

  python -m clip_jax.train --config configs/demo.py --workdir /tmp/demo_run \
      [--config.total_steps=2000] [--config.batch_size=256]

Read top to bottom: config checks (`validate`: the config resolved once) -> model,
optimizer, state and jitted step (`clip_jax.step`, shared with the aot tool and the
benchmarks) and data (`setup`, which returns the `Run` the loop needs) -> the loop
(`train_loop`: step, then the named periodic parts: profile, log, evaluate, checkpoint).
Preemption (SIGTERM) saves a checkpoint at the next step and exits cleanly; restarting the
same command resumes exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from absl import app, flags
from clu import parameter_overview
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from clip_jax import checkpoint as ckpt
from clip_jax import cli, distributed, optim, run_config, sharding
from clip_jax import step as step_lib
from clip_jax.data.pipeline import COUNTED, Loader
from clip_jax.data.specs import parse_spec
from clip_jax.eval import skips, zeroshot
from clip_jax.eval.encoder import Encoder
from clip_jax.eval.inputs import ImageInput
from clip_jax.metrics import MetricLogger, peak_flops_per_device, train_flops_per_sample
from clip_jax.models.config import CLIPConfig, is_naflex, is_vit
from clip_jax.models.functional import FunctionalModel
from clip_jax.run_config import RunConfig

_CONFIG = cli.config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')

Params = dict[str, Any]
State = dict[str, Any]
StepFn = Callable[[State, dict], tuple[State, dict]]


# --- config -------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict, workdir: str, mesh_devices: int
             ) -> tuple[RunConfig, zeroshot.Labels | None]:
  """Every check that can fail before any compile, each naming the key or flag; returns the
  config resolved (`run_config.resolve`: preset, pipeline and tokenizer, step keys) and the
  zero-shot shards' labels (None without them), which the periodic evaluation reuses."""
  run = run_config.resolve(config, mesh_devices)
  pipeline = run.data
  if pipeline.kind == 'tar':
    parse_spec(pipeline.train, pipeline.weights or None)  # names a spec with no file
  labels = _check_zeroshot(config) if config.eval.zeroshot_shards else None
  _check_workdir(workdir)
  return run, labels


def _check_zeroshot(config: ml_collections.ConfigDict) -> zeroshot.Labels:
  """The eval shards hold labelled samples, and the class names cover their largest label."""
  if not config.eval.classnames:
    raise ValueError('config.eval.zeroshot_shards needs config.eval.classnames (a file, one '
                     'class name per label in label order).')
  source = f'config.eval.classnames={config.eval.classnames}'
  return zeroshot.labelled_shards(config.eval.zeroshot_shards, 'config.eval.zeroshot_shards',
                                  zeroshot.read_lines(config.eval.classnames, source), source)


def _check_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'--workdir {workdir} is not writable: {e}') from e


# --- evaluation ---------------------------------------------------------------------------

def eval_seq_len(config: ml_collections.ConfigDict, cfg: CLIPConfig) -> int | None:
  """The length a NaFlex model is evaluated at during training (`config.eval.seq_len`, by
  default its longest training length), each image at its own aspect ratio; None: square."""
  if config.eval.seq_len or not is_naflex(cfg.vision):
    return config.eval.seq_len or None
  return max(config.data.naflex.seq_lens)


class ZeroShotEval:
  """Periodic zero-shot accuracy on labelled tar shards, streamed (`zeroshot.run`, as the
  evaluate CLI).

  Images are decoded batch by batch at each evaluation, never all held in host RAM (ImageNet
  val at 224 px would be ~7.5 GB per process); each process decodes every P-th labelled
  image and the counts are summed over processes. Bad samples are skipped and counted
  (`zeroshot_skipped/KIND` in the metrics), so one bad file does not end the run.
  """

  def __init__(self, config, model: FunctionalModel, mesh, tokenizer,
               labels: zeroshot.Labels | None = None):
    cfg = model.cfg
    self.classnames = zeroshot.read_lines(config.eval.classnames, 'config.eval.classnames')
    self.templates = list(config.eval.templates)
    zeroshot.check_templates(self.templates, 'config.eval.templates')
    self.tokenizer = tokenizer
    self.spec = config.eval.zeroshot_shards
    self.total = (labels or _check_zeroshot(config)).count
    inputs = ImageInput.of(cfg, eval_seq_len(config, cfg), 'config.eval.seq_len')
    self.encoder = Encoder(model, None, mesh, inputs=inputs)  # params set at each evaluation

  def __call__(self, params: Params) -> dict[str, float]:
    self.encoder.params = params
    skipped = skips.Skipped()
    examples = zeroshot.shard_images(self.spec, self.encoder.inputs,
                                     part=(jax.process_index(), jax.process_count()),
                                     skipped=skipped)
    result = zeroshot.run(self.encoder, self.tokenizer, self.classnames, self.templates,
                          examples, -(-self.total // jax.process_count()), skipped)
    return {'zeroshot_top1': result['top1'], 'zeroshot_top5': result['top5'],
            **{f'zeroshot_skipped/{k}': n for k, n in result['skipped'].items()}}


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
    if self.unmasked_step_fn is not None and self.in_unmasked_tail(done):
      return self.unmasked_step_fn
    return self.step_fn

  def in_unmasked_tail(self, done: int) -> bool:
    return self.unmasked_step_fn is not None and done >= self.unmasked_from

  def close(self) -> None:
    """Ends worker processes and waits for async saves, also when the loop raised."""
    self.checkpoints.close()
    self.logger.close()
    self.loader.close()


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Config (resolved once) -> mesh -> model, optimizer state and step (`clip_jax.step`)
  -> data -> restore -> evaluation."""
  run, eval_labels = validate(config, workdir, jax.device_count())
  mesh = sharding.make_mesh(run.mesh)
  program = step_lib.build(run, mesh)
  loader = Loader(run.data, program.batch_sharding)
  checkpoints = ckpt.TrainCheckpoints(workdir, run.model, config.checkpoint_every,
                                      config.keep_checkpoints, preset=run.preset)
  start, state, data_restored = checkpoints.restore_latest(program.state, loader)
  if start:
    logging.info('Resuming from %s step %d', checkpoints.directory, start)
  if start and not data_restored:
    loader.close()
    loader = Loader(dataclasses.replace(run.data, seed=config.seed + start),
                    program.batch_sharding)
    logging.warning(
        'The checkpoint at step %d was written by a different number of processes or data '
        'workers: params, optimizer state and step are restored, but the input position is '
        'per process and worker and is not. The data starts a new pass, reshuffled with seed '
        '%d (seed + step): samples of the interrupted pass may be seen again.', start,
        config.seed + start)
  logger = MetricLogger(workdir, config.tensorboard, start_step=start)
  if not start:
    logger.write_config(config, parameter_overview.get_parameter_overview(state['params']))
  flops_per_step = lambda c: train_flops_per_sample(c, c.text.context_length) * config.batch_size
  return Run(
      config=config, state=state, step_fn=program.step, unmasked_step_fn=program.unmasked_step,
      unmasked_from=run.step.unmasked_from,
      unmasked_flops_per_step=flops_per_step(unmasked(run.model)),
      loader=loader, checkpoints=checkpoints, logger=logger,
      evaluate=(ZeroShotEval(config, program.model, mesh, run.data.tokenizer, eval_labels)
                if eval_labels else None),
      schedule=optim.schedule(run.step.optim, config.total_steps),
      flops_per_step=flops_per_step(run.model),
      peak_flops=peak_flops_per_device(config.peak_flops_per_device),
      preemption=Preemption(), start_step=start)


def unmasked(cfg: CLIPConfig) -> CLIPConfig:
  """`cfg` with every patch kept (a ViT's patch dropout off); other towers as they are."""
  return cfg.replace(**{'vision.patch_dropout': 0.0}) if is_vit(cfg.vision) else cfg


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
  """Wall time, data wait, samples and step count since the last log line (NaFlex batches
  hold as many samples as their sequence length allows, so samples are counted).

  Read only after the device finished the window's last step (dispatch is async, so the
  clock alone would count steps still queued), and divided by the steps it really holds.
  """

  def __init__(self, step: int):
    self.reset(step)

  def reset(self, step: int) -> None:
    self.first_step, self.start, self.data_wait, self.excluded = step, time.perf_counter(), 0., 0.
    self.samples = 0

  def next_batch(self, loader: Loader) -> dict:
    start = time.perf_counter()
    batch = next(loader)
    self.data_wait += time.perf_counter() - start
    self.samples += int(batch['text'].shape[0])
    return batch

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    yield
    self.excluded += time.perf_counter() - start

  def close(self, step: int, device_values: Any) -> tuple[float, float, float, Any]:
    """(seconds per step, data wait per step, samples per second, host values) for the
    window ending now."""
    host_values = jax.device_get(device_values)  # waits for the window's last step
    steps = max(step - self.first_step, 1)
    elapsed = time.perf_counter() - self.start - self.excluded
    seconds, data_wait, rate = elapsed / steps, self.data_wait / steps, self.samples / elapsed
    self.reset(step)
    return seconds, data_wait, rate, host_values


def log_metrics(run: Run, step: int, metrics: dict, window: Window, bar) -> dict[str, float]:
  seconds, data_wait, samples_per_second, metrics = window.close(step, metrics)
  metrics = {k: float(v) for k, v in metrics.items()}
  flops = run.unmasked_flops_per_step if run.in_unmasked_tail(step - 1) else run.flops_per_step
  achieved = flops / seconds / jax.device_count()
  scalars = {**metrics, 'lr': float(run.schedule(step - 1)), 'step_time': seconds,
             'data_wait': data_wait, 'samples_per_second': samples_per_second,
             'mfu': achieved / run.peak_flops if run.peak_flops else None,
             **{f'skipped/{k}': v for k, v in run.loader.skipped.items()},
             # Texts cut to fit (kept, as the tokenizer cuts), LocCa's unreadable boxes,
             # NaFlex images smaller than a patch (`pipeline.COUNTED`).
             **{f'{counter}/{k}': v for counter in dict(COUNTED)
                for k, v in getattr(run.loader, counter).items()}}
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
  if run.evaluate is None:
    return {}
  results = run.evaluate(step_lib.variables(run.state))
  if 'ema' in run.state:  # with the running BatchNorm statistics of the params
    results.update({f'ema/{k}': v
                    for k, v in run.evaluate(step_lib.variables(run.state, 'ema')).items()})
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
  """A step bar on process 0 in a terminal or a notebook (a notebook's stderr is no tty but
  shows the bar); log lines replace it everywhere else."""
  interactive = sys.stderr.isatty() or 'ipykernel' in sys.modules
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
              disable=jax.process_index() != 0 or not interactive)


# --- the binary ---------------------------------------------------------------------------

class _QuietLibraries(logging.Filter):
  """Keeps orbax's, grain's and fsspec's per-operation INFO lines (fsspec: one per shard
  opened on gs://) out of the training log."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = any(name in record.pathname for name in ('orbax', 'grain', 'fsspec'))
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


@cli.user_errors
def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {" ".join(argv[1:])!r}: flags are --config, '
                     '--workdir and --config.KEY=VALUE')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise ValueError('--config and --workdir are required, e.g. python -m clip_jax.train '
                     '--config configs/demo.py --workdir /tmp/clip_demo')
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  distributed.initialize()
  last = train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(next_steps(_CONFIG.value, _WORKDIR.value, last))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.absl_flags_parser)
