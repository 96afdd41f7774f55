"""Results are never half-written or silently replaced, whatever the input or the disk does:
`embed` over missing and truncated shards, an image bomb in `embed`, `export` into a full
disk or an existing folder."""

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clip_jax
from clip_jax import embed as embed_module
from clip_jax import export as export_module
from clip_jax.checkpoint import save_model
from clip_jax.export import CONFIG_NAME, SAFETENSORS_NAME
from clip_jax.models.functional import get_params
from tests.conftest import ROOT
from tests.helpers import jpeg, write_tar


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  model = clip_jax.create_model('tiny', seed=0)
  return save_model(tmp_path_factory.mktemp('tiny') / 'c', model.cfg, get_params(model))


def _samples(prefix, count, image=None):
  """Tar members of `count` captioned samples; `image` replaces the first one's JPEG."""
  members = []
  for i in range(count):
    data = image if i == 0 and image else jpeg(ord(prefix[0]) * 100 + i, 40, 48)
    members.append((f'{prefix}{i}.jpg', data))
    members.append((f'{prefix}{i}.txt', f'photo {prefix} {i}'.encode()))
  return members


def _embed(checkpoint, spec, out, *flags):
  """The embed binary in-process; its exit status (its summary goes to stdout)."""
  argv = ['--checkpoint', str(checkpoint), '--shards', spec, '--out', str(out),
          '--batch_size', '8', *flags]
  try:
    embed_module.main(argv)
    status = 0
  except SystemExit as e:
    status = e.code
  return status


def _rows(out):
  """Part index -> its metadata rows, for the parts written (marked done)."""
  return {int(path.stem.rsplit('_', 1)[1]): pq.read_table(path).num_rows
          for path in sorted((out / 'metadata').glob('*.parquet'))}


def test_embed_writes_a_part_only_when_its_shards_were_read_whole(tiny_checkpoint, tmp_path,
                                                                  capsys, caplog):
  """Part 1's shard is missing, part 2's is cut mid-member: neither is written (a warning
  names each shard, exit 1); part 0 keeps its good rows, its bad image skipped and counted.
  Once the shards are back, a rerun embeds exactly parts 1 and 2, in full."""
  shards = tmp_path / 'shards'
  shards.mkdir()
  write_tar(shards / '00000.tar', _samples('a', 4, image=b'not an image'))
  write_tar(shards / '00002.tar', _samples('c', 4))
  write_tar(shards / '00003.tar', _samples('d', 4))
  whole = (shards / '00002.tar').read_bytes()
  (shards / '00002.tar').write_bytes(whole[:len(whole) // 2])
  spec, out = f'{shards}/{{00000..00003}}.tar', tmp_path / 'out'
  with caplog.at_level(logging.WARNING):
    status = _embed(tiny_checkpoint, spec, out)
  summary = json.loads(capsys.readouterr().out)
  assert status == 1
  assert summary['parts_embedded'] == 2 and summary['parts_incomplete'] == 2
  assert summary['samples'] == 7 and summary['skipped'] == {
      'unreadable_shard': 1, 'truncated_shard': 1, 'bad_image': 1}
  assert _rows(out) == {0: 3, 3: 4}
  for shard, reason in (('00001.tar', 'unreadable_shard'), ('00002.tar', 'truncated_shard')):
    assert any(f'{shards / shard} was not read whole ({reason})' in r.getMessage()
               for r in caplog.records)

  write_tar(shards / '00001.tar', _samples('b', 4))
  (shards / '00002.tar').write_bytes(whole)
  done = {path.name: path.stat().st_mtime_ns for path in (out / 'metadata').iterdir()}
  assert _embed(tiny_checkpoint, spec, out) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary['parts_embedded'] == 2 and summary['parts_incomplete'] == 0
  assert summary['samples'] == 8 and not summary['skipped']
  assert _rows(out) == {0: 3, 1: 4, 2: 4, 3: 4}
  assert all((out / 'metadata' / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
  assert sum(len(np.load(p)) for p in (out / 'img_emb').glob('*.npy')) == 15


def _png_bomb(width, height):
  """A 1-bit PNG of width x height pixels: a few KB that decode to width*height*3 bytes."""
  buffer = io.BytesIO()
  Image.new('1', (width, height)).save(buffer, 'PNG')
  return buffer.getvalue()


# As the binary runs: clip_jax.data.transforms turns PIL's bomb warning into an error
# process-wide, and pytest resets warning filters around each test.
@pytest.mark.filterwarnings('error::PIL.Image.DecompressionBombWarning')
def test_embed_decodes_few_images_at_once_and_skips_an_image_bomb(tiny_checkpoint, tmp_path,
                                                                  capsys, monkeypatch):
  """A PNG of 10000x9000 pixels (over the 89.5 MP cap) is counted as `oversized_image`, never
  decoded; with --decode_threads 2 no more than 2 images are ever decoding at once."""
  bomb = _png_bomb(10_000, 9_000)
  assert len(bomb) < 100_000
  write_tar(tmp_path / '00000.tar', _samples('a', 8, image=bomb))
  in_flight, peak, lock = [0], [0], threading.Lock()
  decode = embed_module.decode_or_skip

  def counting_decode(*args, **kwargs):
    with lock:
      in_flight[0] += 1
      peak[0] = max(peak[0], in_flight[0])
    try:
      time.sleep(0.02)  # holds the slot, so that threads, if allowed, would overlap
      return decode(*args, **kwargs)
    finally:
      with lock:
        in_flight[0] -= 1

  monkeypatch.setattr(embed_module, 'decode_or_skip', counting_decode)
  status = _embed(tiny_checkpoint, f'{tmp_path}/00000.tar', tmp_path / 'out',
                  '--decode_threads', '2', '--modalities', 'image')
  summary = json.loads(capsys.readouterr().out)
  assert status == 0 and summary['skipped'] == {'oversized_image': 1}
  assert summary['samples'] == 7 and _rows(tmp_path / 'out') == {0: 7}
  assert 1 <= peak[0] <= 2


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
