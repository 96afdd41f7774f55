"""The device mesh and the mapping of parameters onto it.

The mesh has axes `data` (pure data parallel), `fsdp` (data parallel with weights sharded
across it) and `tensor` (weights split inside matmuls). Parameters carry logical axis
names (`clip_jax.models.layers`); `rules` map each logical name to a mesh axis, first
match wins, as in big_vision. A dimension is only sharded when the mesh axis divides it
and is not already used by another dimension of the same array, so any rule table is safe
on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
DEFAULT_RULES = (('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
                 ('vocab', 'tensor'), ('proj', 'tensor'))


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for (data, fsdp, tensor); one -1 takes the remaining devices."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}.')
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError('config.mesh: at most one axis may be -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are '
                       f'not divisible by {known}.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} '
                     f'devices, but {num_devices} are available.')
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with GSPMD ('auto') axes; device order follows the topology."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[tuple[str, str | None]]) -> P:
  """PartitionSpec for one array; leading dims beyond `axes` (stacked layers) stay whole."""
  axes = (None,) * (len(shape) - len(axes)) + tuple(axes)
  used: set[str] = set()
  spec: list[str | None] = []
  for name, size in zip(axes, shape):
    target = next((mesh_axis for logical, mesh_axis in rules if logical == name), None)
    if (target and target in mesh.shape and target not in used and mesh.shape[target] > 1
        and size % mesh.shape[target] == 0):
      spec.append(target)
      used.add(target)
    else:
      spec.append(None)
  return P(*spec)


def logical_axes(abstract_model: nnx.Module) -> dict[str, Any]:
  """Pure-dict tree of each parameter's logical axis names."""
  state = nnx.state(abstract_model, nnx.Param)
  axes = jax.tree.map(lambda v: v.get_metadata()['axes'], state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(axes)


def param_shardings(abstract_model: nnx.Module, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> dict[str, Any]:
  """Pure-dict tree of NamedShardings matching `nnx.to_pure_dict` of the params."""
  shapes = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  is_axes = lambda x: isinstance(x, tuple)
  return jax.tree.map(
      lambda axes, s: NamedSharding(mesh, partition_spec(axes, s.shape, mesh, rules)),
      logical_axes(abstract_model), shapes, is_leaf=is_axes)


def variable_shardings(abstract_model: nnx.Module, mesh: Mesh,
                       rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> dict[str, Any]:
  """`param_shardings` over the model's variables: the params by their logical axes, and
  BatchNorm's running statistics (`nnx.BatchStat`, per-channel vectors) replicated. The same
  as `param_shardings` for a model without BatchNorm."""
  replicated = NamedSharding(mesh, P())
  state = nnx.state(abstract_model, (nnx.Param, nnx.BatchStat))
  place = lambda v: (replicated if isinstance(v, nnx.BatchStat) else NamedSharding(
      mesh, partition_spec(v.get_metadata()['axes'], v.shape, mesh, rules)))
  return nnx.to_pure_dict(jax.tree.map(place, state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def constrain_batch(x: jax.Array) -> jax.Array:
  """Shards dim 0 of an activation over the batch axes of the mesh in context, if any.

  GSPMD does not always carry the batch sharding into a `lax.scan` over layers: without
  this pin the scanned stack ran (and kept its residuals) on the whole global batch on
  every device. No-op outside `jax.sharding.use_abstract_mesh` (single-device eval, tests).
  """
  axes = context_batch_axes(x.shape[0])
  return jax.lax.with_sharding_constraint(x, P(axes)) if axes else x


def context_batch_axes(batch: int) -> tuple[str, ...]:
  """The batch axes (size > 1) of the mesh in context that can split `batch` rows; () if none."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))
