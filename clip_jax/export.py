"""Exports a clip_jax checkpoint (or a workdir's latest step) for OpenCLIP.

  python -m clip_jax.export --checkpoint WORKDIR_OR_CHECKPOINT --out OUT [--ema]

writes OUT/open_clip_model.safetensors, OUT/open_clip_pytorch_model.bin (when PyTorch is
installed) and OUT/open_clip_config.json, so that in PyTorch
`open_clip.create_model_and_transforms('local-dir:OUT')` loads it with strict keys.

An export is never half-written and never silently replaces another: the files are written
into a temporary sibling folder, then moved into place (`publish`). A non-empty OUT is
refused unless `--overwrite`, which replaces an earlier export only once the new one is
complete, and never a folder holding other files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import uuid

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
EXPORT_NAMES = (SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME)


@dataclasses.dataclass(frozen=True)
class Exported:
  """What an export wrote, for the command's report."""
  checkpoint: epath.Path  # the checkpoint step actually read (a workdir's latest)
  out: epath.Path
  files: tuple[epath.Path, ...]
  parameters: int


def export(checkpoint: str, out: str, ema: bool = False, overwrite: bool = False) -> epath.Path:
  """Writes the OpenCLIP files of the params (`ema`: of their EMA) to `out`."""
  return export_files(checkpoint, out, ema, overwrite).out


def export_files(checkpoint: str, out: str, ema: bool = False,
                 overwrite: bool = False) -> Exported:
  """`export`, also saying which files it wrote (no .bin without PyTorch)."""
  out_dir = epath.Path(out)
  check_out(out_dir, overwrite)  # before the slow load
  with naming('--checkpoint'):
    source = resolve_checkpoint(checkpoint)
    cfg, params = load_params(source, ema=ema)
  config = open_clip_config(cfg)  # raises before anything is written if OpenCLIP can't build it
  state_dict = params_to_open_clip(cfg, params)
  temp = out_dir.parent / f'.{out_dir.name}.export-{uuid.uuid4().hex[:8]}.tmp'
  try:
    names = write_files(temp, state_dict, config)
    check_out(out_dir, overwrite)  # again: another process may have written there meanwhile
    publish(temp, out_dir, names)
  finally:
    if temp.exists():
      temp.rmtree()
  count = sum(int(np.size(v)) for v in state_dict.values())
  return Exported(source, out_dir, tuple(out_dir / name for name in names), count)


def check_out(out: epath.Path, overwrite: bool) -> None:
  """Refuses an `out` that is a file, or a non-empty folder (without `overwrite`, or, with
  it, one holding anything but an export's files: those are the user's, not ours to drop)."""
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f'--out {out} is a file; give a directory.')
  present = sorted(path.name for path in out.iterdir()) if out.exists() else []
  if present and not overwrite:
    raise FileExistsError(f'--out {out} is not empty; choose a new directory, or pass '
                          '--overwrite to replace the export there.')
  foreign = [name for name in present if name not in EXPORT_NAMES]
  if foreign:
    raise FileExistsError(f'--out {out} holds {foreign[0]}, which is no file of an export; '
                          '--overwrite replaces only an earlier export: choose another directory.')


def write_files(folder: epath.Path, state_dict: dict, config: dict) -> list[str]:
  """Writes the export's files into `folder`, the config last; returns their names."""
  folder.mkdir(parents=True)
  names = [SAFETENSORS_NAME]
  write_safetensors(state_dict, folder / SAFETENSORS_NAME)
  if write_torch_bin(state_dict, folder / BIN_NAME):
    names.append(BIN_NAME)
  (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
  return [*names, CONFIG_NAME]


def publish(temp: epath.Path, out: epath.Path, names: list[str]) -> None:
  """Moves the complete export in `temp` to `out`, replacing an earlier export there.

  Locally, folder renames: the earlier export is moved aside, the new one into place, then
  the earlier one is removed (restored if the second rename fails). gs:// has no rename (a
  move is a copy and a delete per object), so there the config, which OpenCLIP's
  `local-dir:` loading starts from, marks a whole export: the earlier config is deleted
  first, the other files are copied in server-side, the config last. An interrupted
  overwrite on gs:// leaves an export without its config, never a mix that loads.
  """
  if '://' in str(out):
    present = [out / name for name in EXPORT_NAMES if (out / name).exists()]
    for stale in sorted(present, key=lambda path: path.name != CONFIG_NAME):  # config first
      stale.unlink()
    for name in names:  # the config last
      (temp / name).copy(out / name)
    return
  if not out.exists():
    temp.rename(out)
    return
  old = out.parent / f'{temp.name}.old'
  out.rename(old)
  try:
    temp.rename(out)
  except OSError:
    old.rename(out)
    raise
  old.rmtree()


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
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an earlier export in --out, once the new one is complete')
  args = parser.parse_args(argv)
  print(report(export_files(args.checkpoint, args.out, args.ema, args.overwrite), args.ema))


if __name__ == '__main__':
  main()
