"""Golden PartitionSpecs of the parameters of full-size presets on the meshes the trainer uses.

`sharding.param_shardings` (with `DEFAULT_RULES`) decides where every weight lives; a change
to the logical axis names of a layer, to the rules or to `partition_spec` silently moves
weights (a replicated 400M-parameter tower, an unsharded embedding). These tests pin the
result, as maxtext pins its sharding dumps: one JSON file per model x mesh under
`tests/golden/`, one line per parameter (`"path/to/param": [mesh axis or null per dim]`), so a
change shows up as a readable diff of the lines that moved.

Built from shapes only (`FunctionalModel.create` evaluates the model abstractly): no weights
are allocated and the whole file runs in seconds, on the 8 fake CPU devices of conftest.py.

After an intended change, regenerate the files and review the diff:

  UPDATE_GOLDEN=1 python -m pytest tests/test_partition_specs.py
  git diff tests/golden/
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import pytest
from flax import traverse_util

import clip_jax
from clip_jax import sharding
from clip_jax.models.functional import FunctionalModel

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / 'golden'
UPDATE_COMMAND = 'UPDATE_GOLDEN=1 python -m pytest tests/test_partition_specs.py'
MODELS = ('ViT-B-16', 'ViT-SO400M-14-SigLIP')
MESHES = ({'data': 1, 'fsdp': 8, 'tensor': 1}, {'data': 1, 'fsdp': 4, 'tensor': 2})


def _mesh_name(mesh: dict[str, int]) -> str:
  return '_'.join(f'{axis}{size}' for axis, size in mesh.items())


def golden_path(model: str, mesh: dict[str, int]) -> pathlib.Path:
  return GOLDEN_DIR / f'partition_specs.{model}.{_mesh_name(mesh)}.json'


@functools.cache
def _abstract_model(name: str) -> FunctionalModel:
  return FunctionalModel.create(clip_jax.get_config(name))


def _spec_entry(entry):
  """One dimension of a PartitionSpec as JSON: null, an axis name, or a list of axis names."""
  return list(entry) if isinstance(entry, tuple) else entry


def partition_specs(model: str, mesh: dict[str, int]) -> dict[str, list]:
  """'path/to/param' -> its PartitionSpec as a list (one entry per dim), sorted by path."""
  shardings = sharding.param_shardings(_abstract_model(model).abstract, sharding.make_mesh(mesh),
                                       sharding.DEFAULT_RULES)
  flat = traverse_util.flatten_dict(shardings, sep='/')
  # A PartitionSpec may be shorter than its array (trailing dims unsharded): pad it so each
  # line reads one entry per dimension.
  shapes = traverse_util.flatten_dict(_abstract_model(model).shapes(), sep='/')
  return {path: [_spec_entry(e) for e in flat[path].spec]
                + [None] * (len(shapes[path]) - len(flat[path].spec))
          for path in sorted(flat)}


def dumps(specs: dict[str, list]) -> str:
  """JSON with one parameter per line, so a golden diff names exactly the params that moved."""
  lines = [f'  {json.dumps(path)}: {json.dumps(spec)}' for path, spec in specs.items()]
  return '{\n' + ',\n'.join(lines) + '\n}\n'


def describe_differences(golden: dict[str, list], got: dict[str, list]) -> list[str]:
  out = []
  for path in sorted(golden.keys() | got.keys()):
    if path not in got:
      out.append(f'  - {path}: {golden[path]} (no longer a parameter)')
    elif path not in golden:
      out.append(f'  + {path}: {got[path]} (new parameter)')
    elif golden[path] != got[path]:
      out.append(f'  ~ {path}: golden {golden[path]}, now {got[path]}')
  return out


@pytest.mark.parametrize('mesh', MESHES, ids=_mesh_name)
@pytest.mark.parametrize('model', MODELS)
def test_param_partition_specs_match_golden(model, mesh):
  got = partition_specs(model, mesh)
  path = golden_path(model, mesh)
  if os.environ.get('UPDATE_GOLDEN'):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(got))
    return
  if not path.exists():
    pytest.fail(f'{path.relative_to(GOLDEN_DIR.parent.parent)} is missing; write it with '
                f'`{UPDATE_COMMAND}` and commit it.')
  golden = json.loads(path.read_text())
  differences = describe_differences(golden, got)
  if differences:
    pytest.fail(f'PartitionSpecs of {model} on mesh {mesh} differ from '
                f'{path.relative_to(GOLDEN_DIR.parent.parent)} ({len(differences)} params):\n'
                + '\n'.join(differences)
                + f'\nIf the change is intended, regenerate the goldens with `{UPDATE_COMMAND}` '
                'and review `git diff tests/golden/`.', pytrace=False)


def test_golden_format_round_trips():
  """The one-line-per-param writer is valid JSON and keeps the order (sorted paths)."""
  specs = {'a/kernel': [None, 'fsdp'], 'b': [], 'c/bias': [['data', 'fsdp']]}
  assert json.loads(dumps(specs)) == specs
  assert list(json.loads(dumps(specs))) == sorted(specs)
