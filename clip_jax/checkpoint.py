"""clip_jax checkpoints on orbax: one composite directory per model.

Layout: `DIR/params` (orbax StandardSave of the params tree) and `DIR/model_config`
(JSON of the `CLIPConfig`). Orbax writes into a temporary directory and renames it on
commit, so a checkpoint is never half-written. A training workdir keeps the same
layout per step under `WORKDIR/checkpoints/<step>/`, so every command that takes a
checkpoint also takes a workdir (meaning its latest step).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clip_jax.models.config import CLIPConfig

Params = dict[str, Any]
CHECKPOINTS_SUBDIR = 'checkpoints'


def save_model(path: str | epath.Path, cfg: CLIPConfig, params: Params) -> epath.Path:
  """Writes params + model config; refuses to overwrite an existing checkpoint."""
  path = epath.Path(path).absolute()
  if path.exists():
    raise FileExistsError(f'Checkpoint directory {path} already exists; choose a new --out.')
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(path, ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             model_config=ocp.args.JsonSave(cfg.to_dict())))
  return path


def resolve_checkpoint(path: str | epath.Path) -> epath.Path:
  """A checkpoint dir as is; a workdir (or its `checkpoints/`) -> its latest step."""
  path = epath.Path(path).absolute()
  if (path / 'params').exists() and (path / 'model_config').exists():
    return path
  for steps_dir in (path / CHECKPOINTS_SUBDIR, path):
    if steps_dir.is_dir():
      steps = [p for p in steps_dir.iterdir() if p.name.isdigit() and (p / 'params').exists()]
      if steps:
        return max(steps, key=lambda p: int(p.name))
  raise FileNotFoundError(
      f'{path} holds no clip_jax checkpoint: expected {path}/params and {path}/model_config, '
      f'or a training workdir with {path}/{CHECKPOINTS_SUBDIR}/<step>/.')


def load_model_config(path: str | epath.Path) -> CLIPConfig:
  path = resolve_checkpoint(path)
  restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      path, ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return CLIPConfig.from_dict(restored['model_config'])


def load_params(path: str | epath.Path) -> tuple[CLIPConfig, Params]:
  """(model config, params as numpy arrays) from a checkpoint or a workdir."""
  path = resolve_checkpoint(path)
  cfg = load_model_config(path)
  restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      path, ocp.args.Composite(params=ocp.args.StandardRestore()))
  return cfg, jax.tree.map(np.asarray, restored['params'])


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


class TrainCheckpoints:
  """Asynchronous, atomic training checkpoints in `WORKDIR/checkpoints/<step>/`.

  Items: `params`, `opt_state`, `train` (step counters), `model_config` and `data` (the
  input pipeline state, per process). Restoring takes the current state's shardings as
  the target, so a run can resume on a different mesh or device count.
  """

  def __init__(self, workdir: str, model_cfg: CLIPConfig, every: int, keep: int):
    self.directory = epath.Path(workdir) / CHECKPOINTS_SUBDIR
    self.model_cfg = model_cfg
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           enable_async_checkpointing=True, create=True)
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
                                 'bad_steps': int(state['bad_steps'])}),
        model_config=ocp.args.JsonSave(self.model_cfg.to_dict()),
        data=grain.checkpoint.CheckpointSave(_DataState(loader, loader.get_state())))
    self.manager.save(step, args=args, force=force)

  def restore(self, step: int, state: dict, loader) -> dict:
    """Restores onto the shardings of `state` (a freshly initialised state)."""
    def abstract(tree):
      return jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(state['params'])),
        opt_state=ocp.args.StandardRestore(abstract(state['opt_state'])),
        train=ocp.args.JsonRestore(),
        data=grain.checkpoint.CheckpointRestore(_DataState(loader))))
    replicated = state['step'].sharding
    return {'params': restored['params'], 'opt_state': restored['opt_state'],
            'step': jax.device_put(np.int32(restored['train']['step']), replicated),
            'bad_steps': jax.device_put(np.int32(restored['train']['bad_steps']), replicated)}

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
