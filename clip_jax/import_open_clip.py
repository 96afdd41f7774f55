"""Imports an OpenCLIP checkpoint into a clip_jax checkpoint.

  python -m clip_jax.import_open_clip --model ViT-B-32 --checkpoint open_clip_model.safetensors \
      --out /tmp/vit_b32

`--checkpoint` may be `.safetensors`, `.pt`, `.bin` or `.pth` (plain or {'state_dict': ...},
with or without DDP's `module.` prefix). `--override vision.layers=2` adjusts the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import pickle
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from safetensors import SafetensorError

from clip_jax.checkpoint import save_model
from clip_jax.cli import user_errors
from clip_jax.convert.files import read_state_dict
from clip_jax.convert.open_clip import CheckpointMismatchError, Params, params_from_open_clip
from clip_jax.models.config import CLIPConfig, is_naflex
from clip_jax.models.functional import param_shapes
from clip_jax.models.pos_embed import fit_pos_embeds
from clip_jax.models.presets import get_config

# What safetensors and torch.load raise for a damaged, truncated or non-weights file.
UNREADABLE = (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError)
MISMATCHES_SHOWN = 3


# A fixed-resolution timm SigLIP trunk's patch embedding (NaFlex's is `embeds.proj`).
FIXED_PATCH_KEY = 'visual.trunk.patch_embed.proj.weight'


def import_state_dict(cfg: CLIPConfig, state_dict: Mapping[str, Any]) -> Params:
  """Our params of `cfg` from an OpenCLIP state_dict of the same architecture.

  A NaFlex model (`vision.naflex`) also takes its fixed-resolution twin's checkpoint (a
  SigLIP 2 trunk at any image size), as SigLIP 2 began its NaFlex models from the fixed
  ones: the same parameters (the patch conv read as the Linear over flattened patches it
  is), the position grid resized to the NaFlex table with OpenCLIP's rule.
  """
  v = cfg.vision
  if is_naflex(v) and FIXED_PATCH_KEY in state_dict:
    grid = math.isqrt(int(np.shape(state_dict['visual.trunk.pos_embed'])[1]))
    fixed = cfg.replace(vision=dataclasses.replace(v, naflex=False,
                                                   image_size=grid * v.patch_size))
    return fit_pos_embeds(params_from_open_clip(fixed, state_dict, param_shapes(fixed)), cfg)
  return params_from_open_clip(cfg, state_dict, param_shapes(cfg))


def split_overrides(items: list[str]) -> dict[str, str]:
  """['vision.layers=2'] -> {'vision.layers': '2'}; `CLIPConfig.replace` types the values."""
  pairs = [item.partition('=') for item in items]
  bad = [item for item, (_, sep, _) in zip(items, pairs) if not sep]
  if bad:
    raise ValueError(f'--override expects KEY=VALUE, got {bad[0]!r}')
  return {key: value for key, _, value in pairs}


def model_config(model: str, overrides: list[str]) -> CLIPConfig:
  """The preset with its overrides; a bad name or override is a user error naming its flag."""
  pairs = split_overrides(overrides)
  try:
    cfg = get_config(model)
  except ValueError as e:
    raise ValueError(f'--model: {e}') from e
  try:
    return cfg.replace(**pairs).validate()
  except (KeyError, ValueError) as e:  # unknown section or field, value of the wrong type
    raise ValueError(f'--override: {e.args[0] if isinstance(e, KeyError) else e}') from e


def read_weights(path: str) -> dict[str, np.ndarray]:
  """`read_state_dict`, with a missing, damaged or foreign file reported in one line."""
  if epath.Path(path).is_dir():
    raise IsADirectoryError(f'--checkpoint {path} is a directory; give the weights file in it '
                            '(.safetensors, .pt, .bin or .pth).')
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'--checkpoint {path} does not exist.')
  try:
    return read_state_dict(path)
  except UNREADABLE as e:
    raise ValueError(f'--checkpoint {path} is not a readable weights file: '
                     f'{_torch_reason(str(e))}') from e


def _torch_reason(message: str) -> str:
  """The one informative line of torch.load's paragraph-long errors (or the first line)."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  for before, line in itertools.pairwise(lines):
    if before.endswith('WeightsUnpickler error:'):
      return f'torch.load(weights_only=True) refused it: {line}'
  return lines[0].split('. ')[0] if lines else 'no reason given'


def fit(cfg: CLIPConfig, state_dict: Mapping[str, Any], model: str, path: str) -> Params:
  """`import_state_dict`; a mismatch is shortened to a line that says which flag to change."""
  try:
    return import_state_dict(cfg, state_dict)
  except CheckpointMismatchError as e:
    problems = [line.strip() for line in str(e).splitlines()[1:]]
    hidden = len(problems) - MISMATCHES_SHOWN
    shown = '; '.join(problems[:MISMATCHES_SHOWN]) + (f' and {hidden} more' if hidden > 0 else '')
    raise ValueError(f'--checkpoint {path} does not fit --model {model} ({shown}); '
                     'pass the preset it was trained as, or --override to adjust it') from e


def report(source: str, model: str, out: epath.Path, params: Params) -> str:
  """What was written and how to use it: the command's only output on success."""
  count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  return '\n'.join([
      f'Imported {source} as {model} ({count:,} parameters) into the clip_jax checkpoint {out}',
      'Next:',
      f'  python -m clip_jax.evaluate --checkpoint {out} --image_folder VAL_DIR '
      '--imagenet_classnames',
      f'  python -m clip_jax.train --config configs/lit.py:model={model} --workdir RUN '
      f"--config.init_from={out} --config.data.train='SHARDS'"])


@user_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('--model', required=True, help='preset name, e.g. ViT-B-32')
  parser.add_argument('--checkpoint', required=True, help='OpenCLIP weights file')
  parser.add_argument('--out', required=True, help='clip_jax checkpoint directory to create')
  parser.add_argument('--override', action='append', default=[], help='KEY=VALUE model override')
  args = parser.parse_args(argv)
  if epath.Path(args.out).exists():  # before the (slow) read; save_model checks it again
    raise FileExistsError(f'--out {args.out} already exists; choose a new directory.')
  cfg = model_config(args.model, args.override)
  params = fit(cfg, read_weights(args.checkpoint), args.model, args.checkpoint)
  out = save_model(args.out, cfg, params)
  print(report(args.checkpoint, args.model, out, params))


if __name__ == '__main__':
  main()
