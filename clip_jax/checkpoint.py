"""clip_jax checkpoints on orbax: one composite directory per model.

Layout: `DIR/params` (orbax StandardSave of the params tree), for a BatchNorm model
`DIR/batch_stats` (its running statistics, `clip_jax/models/batch_norm.py`) and
`DIR/model_config` (JSON of the `CLIPConfig`). Orbax writes into a temporary directory and
renames it on commit, so a checkpoint is never half-written. A training workdir keeps the same
layout per step under `WORKDIR/checkpoints/<step>/`, so every command that takes a
checkpoint also takes a workdir (meaning its latest step).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from clip_jax.distributed import on_all_processes
from clip_jax.models.config import CLIPConfig
from clip_jax.models.functional import FunctionalModel, first_difference, with_stats

Params = dict[str, Any]
CHECKPOINTS_SUBDIR = 'checkpoints'


def save_model(path: str | epath.Path, cfg: CLIPConfig, params: Params) -> epath.Path:
  """Writes the model's variables (params; a BatchNorm model's running statistics as the
  item `batch_stats`) + model config; refuses to overwrite an existing checkpoint."""
  path = absolute(path)
  if path.exists():
    raise FileExistsError(f'Checkpoint directory {path} already exists; choose a new --out.')
  params, stats = FunctionalModel.create(cfg).split(params)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(path, ocp.args.Composite(
      params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(cfg.to_dict()),
      **({'batch_stats': ocp.args.StandardSave(stats)} if stats else {})))
  return path


def resolve_checkpoint(path: str | epath.Path) -> epath.Path:
  """A checkpoint dir as is; a workdir (or its `checkpoints/`) -> its latest step."""
  path = absolute(path)
  if (path / 'params').exists() and (path / 'model_config').exists():
    return path
  for steps_dir in (path / CHECKPOINTS_SUBDIR, path):
    if steps_dir.is_dir():
      steps = [p for p in steps_dir.iterdir() if p.name.isdigit() and _finalized(p)]
      if steps:
        return max(steps, key=lambda p: int(p.name))
  raise FileNotFoundError(
      f'{path} holds no clip_jax checkpoint: expected {path}/params and {path}/model_config, '
      f'or a training workdir with {path}/{CHECKPOINTS_SUBDIR}/<step>/.')


def absolute(path: str | epath.Path) -> epath.Path:
  """A local path made absolute (orbax wants one); `gs://...` as is (`epath`'s `absolute()`
  would prefix it with the working directory)."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def _finalized(step_dir: epath.Path) -> bool:
  """Whether a step directory holds a whole checkpoint: locally orbax renames a finished
  one into place, but on gs://, which cannot rename, it writes in place and adds
  `commit_success.txt` last, so a run killed mid-save leaves an unfinished step there."""
  return (step_dir / 'params').exists() and ocp.step.is_checkpoint_finalized(step_dir)


def load_model_config(path: str | epath.Path) -> CLIPConfig:
  path = resolve_checkpoint(path)
  restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      path, ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return CLIPConfig.from_dict(restored['model_config'])


def load_params(path: str | epath.Path, ema: bool = False) -> tuple[CLIPConfig, Params]:
  """(model config, params as numpy arrays) from a checkpoint or a workdir: the model's
  variables, with a BatchNorm model's running statistics (item `batch_stats`) merged in.

  `ema`: the EMA of the params instead (a training checkpoint of a run with
  `config.optim.ema_decay`), with the same running statistics; the same tree, so the same
  model config applies. Read as host arrays whatever the saved sharding, so every process
  of a multi-process run gets the whole tree (restoring onto the saved devices fails where
  they are not local).
  """
  path = resolve_checkpoint(path)
  cfg = load_model_config(path)
  item = path / ('ema' if ema else 'params')
  if not item.exists():
    raise FileNotFoundError(f'{path} holds no EMA of the params: it was not trained with '
                            'config.optim.ema_decay > 0. Leave out --ema / ema=True.')
  stats = path / 'batch_stats'
  return cfg, with_stats(_read_numpy(item), _read_numpy(stats) if stats.exists() else {})


def _read_numpy(item: epath.Path) -> Params:
  """An orbax PyTree item as host numpy arrays."""
  # The item's tree from its handler: `Checkpointer.metadata` would look for the step's
  # `_CHECKPOINT_METADATA` inside the item directory and warn that it does not exist.
  tree = ocp.PyTreeCheckpointHandler().metadata(item).tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


class _DataState:
  """Adapts `Loader` to grain's orbax handler (one JSON file per process).

  The state is snapshotted when the checkpoint is requested, so an asynchronous save
  never records batches the loop consumed afterwards.
  """

  def __init__(self, loader, snapshot: dict | None = None):
    self.loader, self.snapshot = loader, snapshot

  def get_state(self) -> bytes:
    return json.dumps(self.snapshot).encode()

  def set_state(self, state: bytes) -> None:
    self.loader.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


class ModelMismatchError(ValueError):
  """The workdir's checkpoint is of another model than the one asked for: a user error to
  report as such, never a damaged checkpoint to move aside."""


# Error codes of a tensorstore read that may succeed when tried again (tensorstore raises
# ValueError('CODE: ...')); the same for Python's own I/O errors.
TRANSIENT_CODES = ('UNAVAILABLE:', 'DEADLINE_EXCEEDED:')
TRANSIENT_ERRORS = (ConnectionError, TimeoutError)
# What a damaged checkpoint raises: tensorstore's DATA_LOSS/OUT_OF_RANGE/NOT_FOUND and JSON
# errors are ValueErrors, a missing item is a KeyError, a missing file FileNotFoundError.
DAMAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, EOFError)


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the errors it was raised from (orbax wraps tensorstore's in `Exception`)."""
  chain: list[BaseException] = []
  e: BaseException | None = error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  return chain


def transient(error: BaseException) -> bool:
  """Whether a restore error may go away when tried again (a network or storage hiccup)."""
  return any(isinstance(e, TRANSIENT_ERRORS) or
             (isinstance(e, ValueError) and str(e).startswith(TRANSIENT_CODES))
             for e in _chain(error))


def damaged(error: BaseException) -> bool:
  """Whether a restore error says the checkpoint's data is bad (and not transient)."""
  return not transient(error) and any(isinstance(e, DAMAGE_ERRORS) for e in _chain(error))


def config_differences(stored: dict, requested: CLIPConfig, most: int = 3) -> str:
  """'vision.layers 12 vs 6, ...': the first `most` fields whose stored value differs."""
  stored = traverse_util.flatten_dict(stored, sep='.')
  # Through JSON, as the stored dict went: tuples become lists on both sides.
  asked = traverse_util.flatten_dict(json.loads(json.dumps(requested.to_dict())), sep='.')
  fields = [k for k in asked.keys() | stored.keys() if stored.get(k) != asked.get(k)]
  fields.sort(key=lambda k: list(asked).index(k) if k in asked else len(asked))
  return ', '.join(f'{k} {stored.get(k)} vs {asked.get(k)}' for k in fields[:most])


class TrainCheckpoints:
  """Asynchronous, atomic training checkpoints in `WORKDIR/checkpoints/<step>/`.

  Items: `params`, `opt_state`, `ema` (only when the state holds an EMA of the params),
  `batch_stats` (only for a BatchNorm model: its running statistics), `train` (step
  counters and the process count), `model_config` and `data` (the input pipeline state, one
  file per process). Restoring takes the current state's shardings as
  the target, so a run can resume on a different mesh or device count. `preset` (the
  config's `model.name`) is stored with the counters so that a workdir of another model can
  be named as such.
  """

  def __init__(self, workdir: str, model_cfg: CLIPConfig, every: int, keep: int,
               preset: str = ''):
    self.directory = epath.Path(workdir) / CHECKPOINTS_SUBDIR
    self.model_cfg, self.preset = model_cfg, preset
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(every),
                                                     policies.PreemptionCheckpointingPolicy()]),
        max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: dict, loader, force: bool = False) -> None:
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state['params']),
        opt_state=ocp.args.StandardSave(state['opt_state']),
        train=ocp.args.JsonSave({'step': int(state['step']),
                                 'bad_steps': int(state['bad_steps']),
                                 'process_count': jax.process_count(),
                                 'data_workers': loader.workers,
                                 'preset': self.preset}),
        model_config=ocp.args.JsonSave(self.model_cfg.to_dict()),
        data=grain.checkpoint.CheckpointSave(_DataState(loader, loader.get_state())),
        **({'ema': ocp.args.StandardSave(state['ema'])} if 'ema' in state else {}),
        **({'batch_stats': ocp.args.StandardSave(state['batch_stats'])}
           if state.get('batch_stats') else {}))
    self.manager.save(step, args=args, force=force)

  def restore_latest(self, state: dict, loader) -> tuple[int, dict, bool]:
    """(step, state, data restored?) from the newest checkpoint that restores.

    A checkpoint whose data is damaged on any process (a truncated or corrupt file, a
    missing item: `damaged`) is moved aside to `<step>.unreadable` with a warning, and the
    next older one is tried. Any other failure moves nothing and stops the run: a transient
    I/O error (`transient`) after `RETRY_SECONDS` retries, anything else at once, since
    neither says the checkpoint is bad and resuming from an older one would silently
    discard steps. When checkpoints exist but none restores, the run stops rather than
    starting from scratch. A checkpoint of another model raises `ModelMismatchError`.
    No checkpoint: (0, state, False).
    """
    failures: list[tuple[int, Exception]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      restored, data_restored, error = self._restore_with_retries(step, state, loader)
      if on_all_processes(error is None):
        for bad_step, bad_error in failures:
          self._move_aside(bad_step, bad_error)
        return step, restored, data_restored
      if not on_all_processes(error is None or damaged(error)):
        raise self._not_restored(step, error)
      failures.append((step, error or RuntimeError('failed to restore on another process')))
    if failures:
      listing = '; '.join(f'{self.directory / str(s)}: {e!r}' for s, e in failures)
      raise RuntimeError(
          f'No checkpoint in {self.directory} restores ({listing}). Not starting from scratch '
          'over them: move them away (or use a new --workdir) to start a new run.')
    return 0, state, False

  # Seconds to wait before each retry of a restore that met a transient I/O error.
  RETRY_SECONDS = (2.0, 8.0, 30.0)

  def _restore_with_retries(self, step: int, state: dict, loader
                            ) -> tuple[dict, bool, Exception | None]:
    """`restore(step)` as (state, data restored?, None), or ({}, False, the error), retried
    after `RETRY_SECONDS` while the error is transient."""
    retries = iter(self.RETRY_SECONDS)
    while True:
      try:
        return (*self.restore(step, state, loader), None)
      except ModelMismatchError:
        raise
      except Exception as e:  # orbax and tensorstore raise many types; `damaged` sorts them
        wait = next(retries, None) if transient(e) else None
        if wait is None:
          return {}, False, e
        logging.warning('Restoring checkpoint %s: %r; retrying in %.0f s.',
                        self.directory / str(step), e, wait)
        time.sleep(wait)

  def _not_restored(self, step: int, error: Exception | None) -> RuntimeError:
    """The error that stops a run whose checkpoint failed for a reason other than damage."""
    path = self.directory / str(step)
    if error is None:
      return RuntimeError(f'Checkpoint {path} failed to restore on another process (its log '
                          'says why); it is left in place. Restart when that is fixed.')
    if transient(error):
      cause, then = f'{len(self.RETRY_SECONDS) + 1} tries', 'when the storage answers again'
    else:
      cause, then = 'not a sign of damaged data', 'once that is fixed'
    return RuntimeError(
        f'Checkpoint {path} could not be read ({cause}): {error!r}. It is left in place and '
        f'the run stops rather than resuming from an older step: restart {then}.')

  def restore(self, step: int, state: dict, loader) -> tuple[dict, bool]:
    """(state on the shardings of `state`, whether the input pipeline state was restored).

    The pipeline state is per process and per data worker, so it is restored only when the
    checkpoint was written by as many processes, each with as many workers, as there are
    now ('auto' workers follow the host's cores). A state with an EMA restores it; from a
    checkpoint without one (EMA switched on for a running run) the EMA starts at the params.
    """
    def abstract(tree):
      return jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    stored = self.manager.restore(step, args=ocp.args.Composite(
        train=ocp.args.JsonRestore(), model_config=ocp.args.JsonRestore()))
    counters = stored['train']
    self._check_model(step, counters.get('preset', ''), stored['model_config'], state['params'])
    same_layout = (counters.get('process_count', 1) == jax.process_count()
                      and counters.get('data_workers', loader.workers) == loader.workers)
    items = dict(params=ocp.args.StandardRestore(abstract(state['params'])),
                 opt_state=ocp.args.StandardRestore(abstract(state['opt_state'])))
    if same_layout:
      items['data'] = grain.checkpoint.CheckpointRestore(_DataState(loader))
    with_ema = 'ema' in state and (self.directory / str(step) / 'ema').exists()
    if with_ema:
      items['ema'] = ocp.args.StandardRestore(abstract(state['ema']))
    if state.get('batch_stats'):
      items['batch_stats'] = ocp.args.StandardRestore(abstract(state['batch_stats']))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    replicated = state['step'].sharding
    result = {'params': restored['params'], 'opt_state': restored['opt_state'],
              'step': jax.device_put(np.int32(counters['step']), replicated),
              'bad_steps': jax.device_put(np.int32(counters['bad_steps']), replicated)}
    if 'batch_stats' in state:
      result['batch_stats'] = restored['batch_stats'] if state['batch_stats'] else {}
    if 'ema' in state:
      if not with_ema:
        logging.warning('Checkpoint step %d holds no EMA: it starts at the params.', step)
      result['ema'] = restored['ema'] if with_ema else jax.tree.map(jnp.copy, result['params'])
    return result, same_layout

  def _check_model(self, step: int, preset: str, model_config: dict, params: dict) -> None:
    """Raises ModelMismatchError, naming both models, when the step's params do not have the
    paths and shapes of `params` (orbax would fail deep in the tree with a shape error)."""
    item = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / 'params')
    stored_shapes = jax.tree.map(lambda leaf: leaf.shape, item.tree)
    if not first_difference(stored_shapes, params):
      return
    held = f'a {preset} checkpoint' if preset else 'a checkpoint of another model'
    named_apart = preset and self.preset and preset != self.preset
    detail = '' if named_apart else f' ({config_differences(model_config, self.model_cfg)})'
    raise ModelMismatchError(
        f'--workdir {self.directory.parent} holds {held}; you asked for '
        f'{self.preset or "this model"}{detail}. Use another --workdir, or ask for the model '
        'it holds.')

  def _move_aside(self, step: int, error: Exception) -> None:
    """Renames a checkpoint that does not restore (process 0) so no restart tries it again."""
    source = self.directory / str(step)
    target = self.directory / f'{step}.unreadable'
    if jax.process_index() == 0:
      suffix = 1
      while target.exists():
        target, suffix = self.directory / f'{step}.unreadable{suffix}', suffix + 1
      source.rename(target)
    logging.warning('CHECKPOINT %s DOES NOT RESTORE (%r); moved it to %s and resumed from an '
                    'older one.', source, error, target)
    on_all_processes(True)  # the rename is done before anyone lists the steps again
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
