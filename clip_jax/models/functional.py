"""The model as a pure function of a params dict: what `jax.jit` programs close over.

The trainer, the evaluators and the converter hold parameters as plain nested dicts
(`nnx.to_pure_dict` layout: `params['visual']['transformer']...`). `FunctionalModel`
binds such a dict (arrays or tracers) into the NNX module for one call.

A model with BatchNorm (the ModifiedResNet) also has running statistics (`nnx.BatchStat`,
`clip_jax/models/batch_norm.py`). Outside the train state they travel in the same dict,
under their layer's path (`visual/layer1/blocks/bn1/mean`): the model's variables, which
`bind`, `check`, `shapes`, `get_params`, checkpoints and the converter take. The train state
keeps them apart (`split` / `with_stats`): `params` for the optimizer, `batch_stats` for
the forward pass to update. A model without BatchNorm has no statistics: its variables are
its params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from clip_jax.models import batch_norm
from clip_jax.models.clip import CLIP
from clip_jax.models.config import CLIPConfig

Params = dict[str, Any]


@dataclasses.dataclass
class FunctionalModel:
  """A model as a pure function of its params dict, for use inside `jax.jit`."""
  cfg: CLIPConfig
  abstract: CLIP   # shapes and metadata only, no arrays
  graphdef: Any
  template: Any    # the abstract nnx.State of the params
  stats_template: Any = None  # that of the BatchNorm statistics (empty without BatchNorm)

  @classmethod
  def create(cls, cfg: CLIPConfig) -> FunctionalModel:
    abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    graphdef, template, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)  # type: ignore[misc]
    return cls(cfg, abstract, graphdef, template, stats)

  def bind(self, params: Params, train: bool = False, freeze: str = '') -> CLIP:
    """The module with `params` (arrays or tracers; with a BatchNorm model's running
    statistics) in place. `train`: BatchNorm normalises by the batch and updates its
    running statistics (read them back with `stats_of`), except the layers frozen by the
    `freeze` regex (`batch_norm.train_mode`); without it, the running statistics are used."""
    params, stats = self.split(params)
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    stats_state = jax.tree.map(lambda x: x, self.stats_template)
    if stats:
      nnx.replace_by_pure_dict(stats_state, stats)
    model = nnx.merge(self.graphdef, state, stats_state)
    if train and self.stats_template:
      batch_norm.train_mode(model, freeze)
    return model

  def split(self, variables: Params) -> tuple[Params, Params]:
    """(params, BatchNorm statistics) of a variables tree; the statistics must all be there
    for a BatchNorm model ({} for others)."""
    names = set(traverse_util.flatten_dict(self.stats_shapes(), sep='/'))
    if not names:
      return variables, {}
    flat = traverse_util.flatten_dict(variables, sep='/')
    missing = sorted(names - set(flat))
    if missing:
      raise ValueError(f'The params lack the BatchNorm running statistics {missing[0]} (and '
                       f'{len(missing) - 1} more): pass the model\'s variables '
                       '(`with_stats(params, batch_stats)`).')
    stats = {k: v for k, v in flat.items() if k in names}
    params = {k: v for k, v in flat.items() if k not in names}
    unflatten = lambda d: traverse_util.unflatten_dict(d, sep='/') if d else {}
    return unflatten(params), unflatten(stats)

  def stats_of(self, model: CLIP) -> Params:
    """The BatchNorm running statistics of a bound module ({} without BatchNorm)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  def abstract_variables(self) -> Params:
    """The variables tree of shapes and dtypes (`jax.ShapeDtypeStruct`s)."""
    return nnx.to_pure_dict(nnx.state(self.abstract, (nnx.Param, nnx.BatchStat)))

  def stats_shapes(self) -> Params:
    return jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(self.stats_template))

  def shapes(self) -> Params:
    """The variables' shapes: params and (BatchNorm models) running statistics."""
    params = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(self.template))
    return with_stats(params, self.stats_shapes())

  def check(self, params: Params) -> None:
    """Raises ValueError naming the first parameter missing, extra or mis-shaped."""
    problem = first_difference(self.shapes(), params)
    if problem:
      raise ValueError(f'Params do not match the model config: {problem}')


def with_stats(params: Params, stats: Params) -> Params:
  """The model's variables: `params` with the BatchNorm statistics `stats` merged in at their
  layers' paths (disjoint from the params'); `params` itself when `stats` is empty."""
  if not stats:
    return params
  flat = traverse_util.flatten_dict(params, sep='/')
  flat.update(traverse_util.flatten_dict(stats, sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


def first_difference(shapes: Params, params: Params) -> str:
  """'' when `params` has exactly the paths and shapes of `shapes`, else the first problem."""
  expected = traverse_util.flatten_dict(shapes, sep='/')
  got = traverse_util.flatten_dict(params, sep='/')
  for path in sorted(expected.keys() | got.keys()):
    if path not in got:
      return f'missing {path}'
    if path not in expected:
      return f'unexpected {path}'
    if tuple(np.shape(got[path])) != tuple(expected[path]):
      return f'{path}: model {tuple(expected[path])}, params {tuple(np.shape(got[path]))}'
  return ''


def param_shapes(cfg: CLIPConfig) -> Params:
  """The params tree of shapes, computed without allocating the model."""
  return FunctionalModel.create(cfg).shapes()


def get_params(model: CLIP) -> Params:
  """The model's variables: its params, and a BatchNorm model's running statistics."""
  return nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))


def model_from_params(cfg: CLIPConfig, params: Params) -> CLIP:
  """Builds the model without random init and fills it with `params` (shapes checked)."""
  model = FunctionalModel.create(cfg)
  model.check(params)
  return model.bind(jax.tree.map(jax.numpy.asarray, params))
