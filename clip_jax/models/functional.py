"""The model as a pure function of a params dict: what `jax.jit` programs close over.

The trainer, the evaluators and the converter hold parameters as plain nested dicts
(`nnx.to_pure_dict` layout: `params['visual']['transformer']...`). `FunctionalModel`
binds such a dict (arrays or tracers) into the NNX module for one call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

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

  @classmethod
  def create(cls, cfg: CLIPConfig) -> FunctionalModel:
    abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    graphdef, template = nnx.split(abstract, nnx.Param)
    return cls(cfg, abstract, graphdef, template)

  def bind(self, params: Params) -> CLIP:
    """The module with `params` (arrays or tracers) in place."""
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def shapes(self) -> Params:
    return jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(self.template))

  def check(self, params: Params) -> None:
    """Raises ValueError naming the first parameter missing, extra or mis-shaped."""
    problem = first_difference(self.shapes(), params)
    if problem:
      raise ValueError(f'Params do not match the model config: {problem}')


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
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(cfg: CLIPConfig, params: Params) -> CLIP:
  """Builds the model without random init and fills it with `params` (shapes checked)."""
  model = FunctionalModel.create(cfg)
  model.check(params)
  return model.bind(jax.tree.map(jax.numpy.asarray, params))
