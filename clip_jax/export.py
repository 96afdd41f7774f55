"""Exports a clip_jax checkpoint (or a workdir's latest step) for OpenCLIP.

  python -m clip_jax.export --checkpoint WORKDIR_OR_CHECKPOINT --out OUT [--ema]

writes OUT/open_clip_model.safetensors, OUT/open_clip_pytorch_model.bin (when PyTorch is
installed) and OUT/open_clip_config.json, so that in PyTorch
`open_clip.create_model_and_transforms('local-dir:OUT')` loads it with strict keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
from etils import epath

from clip_jax.checkpoint import load_params, resolve_checkpoint
from clip_jax.cli import naming, user_errors
from clip_jax.convert.files import write_safetensors, write_torch_bin
from clip_jax.convert.open_clip import params_to_open_clip
from clip_jax.convert.open_clip_config import open_clip_config

SAFETENSORS_NAME = 'open_clip_model.safetensors'
BIN_NAME = 'open_clip_pytorch_model.bin'
CONFIG_NAME = 'open_clip_config.json'


@dataclasses.dataclass(frozen=True)
class Exported:
  """What an export wrote, for the command's report."""
  checkpoint: epath.Path  # the checkpoint step actually read (a workdir's latest)
  out: epath.Path
  files: tuple[epath.Path, ...]
  parameters: int


def export(checkpoint: str, out: str, ema: bool = False) -> epath.Path:
  """Writes the OpenCLIP files of the params (`ema`: of their EMA) to `out`."""
  return export_files(checkpoint, out, ema).out


def export_files(checkpoint: str, out: str, ema: bool = False) -> Exported:
  """`export`, also saying which files it wrote (no .bin without PyTorch)."""
  with naming('--checkpoint'):
    source = resolve_checkpoint(checkpoint)
    cfg, params = load_params(source, ema=ema)
  config = open_clip_config(cfg)  # raises before anything is written if OpenCLIP can't build it
  state_dict = params_to_open_clip(cfg, params)
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  files = [out_dir / SAFETENSORS_NAME]
  write_safetensors(state_dict, files[0])
  if write_torch_bin(state_dict, out_dir / BIN_NAME):
    files.append(out_dir / BIN_NAME)
  files.append(out_dir / CONFIG_NAME)
  files[-1].write_text(json.dumps(config, indent=2))
  count = sum(int(np.size(v)) for v in state_dict.values())
  return Exported(source, out_dir, tuple(files), count)


def report(done: Exported, ema: bool) -> str:
  """What was written and how to load it: the command's only output on success."""
  what = 'the EMA of the params of ' if ema else ''
  lines = [f'Exported {what}{done.checkpoint} ({done.parameters:,} parameters) to {done.out}:']
  lines += [f'  {path}' for path in done.files]
  if not any(path.name == BIN_NAME for path in done.files):
    lines.append(f'  (no {BIN_NAME}: PyTorch is not installed here)')
  name = f"'local-dir:{done.out}'"
  lines += ['Next, in PyTorch:',
            f'  model, _, preprocess = open_clip.create_model_and_transforms({name})',
            f'  tokenizer = open_clip.get_tokenizer({name})']
  return '\n'.join(lines)


@user_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('--checkpoint', required=True,
                      help='clip_jax checkpoint dir, or a training workdir (latest step)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--ema', action='store_true',
                      help='export the EMA of the params (runs with config.optim.ema_decay)')
  args = parser.parse_args(argv)
  if epath.Path(args.out).exists() and not epath.Path(args.out).is_dir():
    raise NotADirectoryError(f'--out {args.out} is a file; give a directory.')
  print(report(export_files(args.checkpoint, args.out, ema=args.ema), args.ema))


if __name__ == '__main__':
  main()
