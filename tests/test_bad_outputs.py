"""Results are never half-written or silently replaced, whatever the input or the disk does:
`embed` over missing and truncated shards, an image bomb in `embed`, `export` into a full
disk or an existing folder."""

import os
import subprocess
import sys

import pytest

import clip_jax
from clip_jax import export as export_module
from clip_jax.checkpoint import save_model
from clip_jax.export import CONFIG_NAME, SAFETENSORS_NAME
from clip_jax.models.functional import get_params
from tests.conftest import ROOT


def _snapshot(folder):
  return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _export_cli(checkpoint, out, *flags, file_size_limit):
  """The export binary in a process whose files may not grow past `file_size_limit` bytes
  (RLIMIT_FSIZE: a write past it fails with EFBIG, as a write to a full disk fails)."""
  run = ('import resource, runpy, sys; '
         f'resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); '
         "sys.argv[0] = 'export'; runpy.run_module('clip_jax.export', run_name='__main__')")
  return subprocess.run(
      [sys.executable, '-c', run, '--checkpoint', str(checkpoint), '--out', str(out), *flags],
      env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE='1'),
      capture_output=True, text=True, check=False)


def test_export_never_half_writes_or_silently_replaces(tmp_path, capsys):
  """An export into a non-empty folder is refused without --overwrite; an overwrite that
  fails mid-write (the file size limit) leaves the earlier export byte for byte, and no
  temporary folder; a folder holding other files is never replaced."""
  checkpoints = []
  for seed in (1, 2):
    model = clip_jax.create_model('tiny', seed=seed)
    checkpoints.append(save_model(tmp_path / f'c{seed}', model.cfg, get_params(model)))
  out = tmp_path / 'exported'
  export_module.export(str(checkpoints[0]), str(out))
  before = _snapshot(out)

  with pytest.raises(SystemExit) as exit_:
    export_module.main(['--checkpoint', str(checkpoints[1]), '--out', str(out)])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (
      f'error: --out {out} is not empty; choose a new directory, or pass --overwrite to '
      'replace the export there.\n')
  assert _snapshot(out) == before

  limit = len(before[SAFETENSORS_NAME]) // 2
  full = _export_cli(checkpoints[1], out, '--overwrite', file_size_limit=limit)
  assert full.returncode != 0 and 'File too large' in full.stderr
  assert _snapshot(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['c1', 'c2', 'exported']

  export_module.main(['--checkpoint', str(checkpoints[1]), '--out', str(out), '--overwrite'])
  after = _snapshot(out)
  assert after.keys() == before.keys() and after[SAFETENSORS_NAME] != before[SAFETENSORS_NAME]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['c1', 'c2', 'exported']

  (out / 'notes.txt').write_text('mine')
  with pytest.raises(SystemExit):
    export_module.main(['--checkpoint', str(checkpoints[0]), '--out', str(out), '--overwrite'])
  assert 'holds notes.txt, which is no file of an export' in capsys.readouterr().err
  assert (out / 'notes.txt').read_text() == 'mine' and (out / CONFIG_NAME).exists()
