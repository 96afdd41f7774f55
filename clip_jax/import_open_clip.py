"""Imports an OpenCLIP checkpoint into a clip_jax checkpoint.

  python -m clip_jax.import_open_clip --model ViT-B-32 --checkpoint open_clip_model.safetensors \
      --out /tmp/vit_b32

`--checkpoint` may be `.safetensors`, `.pt`, `.bin` or `.pth` (plain or {'state_dict': ...},
with or without DDP's `module.` prefix). `--override vision.layers=2` adjusts the preset.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

from clip_jax.checkpoint import save_model
from clip_jax.convert.files import read_state_dict
from clip_jax.convert.open_clip import Params, params_from_open_clip
from clip_jax.models.config import CLIPConfig
from clip_jax.models.functional import param_shapes
from clip_jax.models.presets import get_config


def import_state_dict(cfg: CLIPConfig, state_dict: Mapping[str, Any]) -> Params:
  return params_from_open_clip(cfg, state_dict, param_shapes(cfg))


def split_overrides(items: list[str]) -> dict[str, str]:
  """['vision.layers=2'] -> {'vision.layers': '2'}; `CLIPConfig.replace` types the values."""
  pairs = [item.partition('=') for item in items]
  bad = [item for item, (_, sep, _) in zip(items, pairs) if not sep]
  if bad:
    raise ValueError(f'--override expects KEY=VALUE, got {bad[0]!r}')
  return {key: value for key, _, value in pairs}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('--model', required=True, help='preset name, e.g. ViT-B-32')
  parser.add_argument('--checkpoint', required=True, help='OpenCLIP weights file')
  parser.add_argument('--out', required=True, help='clip_jax checkpoint directory to create')
  parser.add_argument('--override', action='append', default=[], help='KEY=VALUE model override')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  cfg = get_config(args.model, **split_overrides(args.override))
  params = import_state_dict(cfg, read_state_dict(args.checkpoint))
  out = save_model(args.out, cfg, params)
  logging.info('Imported %s (%s) into %s', args.checkpoint, args.model, out)


if __name__ == '__main__':
  main()
