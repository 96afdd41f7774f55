"""Reading and writing PyTorch weight files without ever unpickling untrusted code.

`.safetensors` is read with safetensors' numpy API (no torch needed); `.pt`/`.bin`/`.pth`
need torch and are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

TORCH_SUFFIXES = ('.pt', '.bin', '.pth')


def read_state_dict(path: str | epath.Path) -> dict[str, np.ndarray]:
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'Checkpoint file {path} does not exist.')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load
    return dict(load(path.read_bytes()))
  if path.suffix not in TORCH_SUFFIXES:
    raise ValueError(f'{path}: expected .safetensors or one of {TORCH_SUFFIXES}.')
  torch = _import_torch(path)
  with path.open('rb') as f:
    obj = torch.load(f, map_location='cpu', weights_only=True)
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict.')
  if isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  return {k: _tensor_to_numpy(v) for k, v in obj.items() if hasattr(v, 'shape')}


def _tensor_to_numpy(t: Any) -> np.ndarray:
  """float32 for floating tensors; integer ones (BatchNorm's num_batches_tracked) as they are."""
  if not hasattr(t, 'detach'):
    return np.asarray(t)
  return t.detach().numpy() if not t.is_floating_point() else t.detach().float().numpy()


def _import_torch(path: epath.Path):
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'Reading {path} needs PyTorch; convert it to .safetensors or '
                      "`pip install 'clip_jax[test]'`.") from e
  return torch


def write_safetensors(state_dict: dict[str, np.ndarray], path: str | epath.Path) -> None:
  from safetensors.numpy import save
  epath.Path(path).write_bytes(save({k: np.array(v, order="C") for k, v in state_dict.items()}))


def write_torch_bin(state_dict: dict[str, np.ndarray], path: str | epath.Path) -> bool:
  """Writes a torch `.bin` if PyTorch is installed; returns whether it did."""
  try:
    import torch
  except ImportError:
    return False
  tensors = {k: torch.from_numpy(np.array(v, dtype=v.dtype if v.dtype.kind in 'iu' else np.float32))
             for k, v in state_dict.items()}
  with epath.Path(path).open('wb') as f:
    torch.save(tensors, f)
  return True
