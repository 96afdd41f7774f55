"""clip_jax checkpoints on orbax: one composite directory per model.

Layout: `DIR/params` (orbax StandardSave of the params tree) and `DIR/model_config`
(JSON of the `CLIPConfig`). Orbax writes into a temporary directory and renames it on
commit, so a checkpoint is never half-written. A training workdir keeps the same
layout per step under `WORKDIR/checkpoints/<step>/`, so every command that takes a
checkpoint also takes a workdir (meaning its latest step).
"""

from __future__ import annotations

from typing import Any

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
  params = _to_numpy(restored['params'])
  return cfg, params


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
