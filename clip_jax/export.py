"""Exports a clip_jax checkpoint (or a workdir's latest step) for OpenCLIP.

  python -m clip_jax.export --checkpoint WORKDIR_OR_CHECKPOINT --out OUT [--ema]

writes OUT/open_clip_model.safetensors, OUT/open_clip_pytorch_model.bin (when PyTorch is
installed) and OUT/open_clip_config.json, so that in PyTorch
`open_clip.create_model_and_transforms('local-dir:OUT')` loads it with strict keys.
"""

from __future__ import annotations

import argparse
import json
import logging

from etils import epath

from clip_jax.checkpoint import load_params
from clip_jax.convert.files import write_safetensors, write_torch_bin
from clip_jax.convert.open_clip import params_to_open_clip
from clip_jax.convert.open_clip_config import open_clip_config

SAFETENSORS_NAME = 'open_clip_model.safetensors'
BIN_NAME = 'open_clip_pytorch_model.bin'
CONFIG_NAME = 'open_clip_config.json'


def export(checkpoint: str, out: str, ema: bool = False) -> epath.Path:
  """Writes the OpenCLIP files of the params (`ema`: of their EMA) to `out`."""
  cfg, params = load_params(checkpoint, ema=ema)
  config = open_clip_config(cfg)  # raises before anything is written if OpenCLIP can't build it
  state_dict = params_to_open_clip(cfg, params)
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_safetensors(state_dict, out_dir / SAFETENSORS_NAME)
  if not write_torch_bin(state_dict, out_dir / BIN_NAME):
    logging.info('PyTorch not installed: wrote only %s', SAFETENSORS_NAME)
  (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
  return out_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('--checkpoint', required=True,
                      help='clip_jax checkpoint dir, or a training workdir (latest step)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--ema', action='store_true',
                      help='export the EMA of the params (runs with config.optim.ema_decay)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  out = export(args.checkpoint, args.out, ema=args.ema)
  logging.info("Exported to %s; in PyTorch: open_clip.create_model_and_transforms('local-dir:%s')",
               out, out)


if __name__ == '__main__':
  main()
