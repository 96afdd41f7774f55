"""Writes webdataset tar shards the way img2dataset lays them out.

Members are added from bytes in memory under generated keys (`000000123.jpg`,
`.txt`, `.json`), never from paths on disk, and each shard is written to a temporary
name and renamed when complete, so a reader never sees a half-written shard. Members carry
a fixed modification time (`MTIME`), so the same samples always give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import IO, Any

from etils import epath

# Every member's mtime (2000-01-01 UTC): shards depend on their samples only, not on the clock.
MTIME = 946684800


class ShardWriter:
  """Appends samples to `OUT/00000.tar`, `OUT/00001.tar`, ... (N samples per shard)."""

  def __init__(self, out_dir: str | epath.Path, samples_per_shard: int = 10000):
    if samples_per_shard <= 0:
      raise ValueError(f'samples_per_shard must be positive, got {samples_per_shard}')
    self.out_dir = epath.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.samples_per_shard = samples_per_shard
    self.count = 0
    self.shards: list[str] = []
    self._shard: tuple[tarfile.TarFile, IO[Any]] | None = None  # the open tar and its file

  def write(self, image: bytes, image_ext: str, caption: str, meta: dict | None = None) -> str:
    """Adds one sample; returns its key."""
    if self._shard is None:
      self._shard = self._open()
    tar, file = self._shard
    key = f'{self.count:09d}'
    _add(tar, f'{key}.{image_ext}', image)
    _add(tar, f'{key}.txt', caption.encode('utf-8'))
    _add(tar, f'{key}.json', json.dumps({'key': key, 'caption': caption, **(meta or {})}).encode())
    self.count += 1
    if self.count % self.samples_per_shard == 0:
      self._close_shard(tar, file)
    return key

  def _shard_name(self) -> str:
    return f'{len(self.shards):05d}.tar'

  def _open(self) -> tuple[tarfile.TarFile, IO[Any]]:
    file = (self.out_dir / f'{self._shard_name()}.tmp').open('wb')
    tar = tarfile.open(  # noqa: SIM115 (closed in _close_shard, with the file)
        fileobj=file, mode='w', format=tarfile.USTAR_FORMAT)
    return tar, file

  def _close_shard(self, tar: tarfile.TarFile, file: IO[Any]) -> None:
    tar.close()
    file.close()
    name = self._shard_name()
    (self.out_dir / f'{name}.tmp').rename(self.out_dir / name)
    self.shards.append(name)
    self._shard = None

  def close(self, stats: dict | None = None) -> dict:
    """Flushes the last shard and writes `_stats.json`; returns the stats."""
    if self._shard is not None:
      self._close_shard(*self._shard)
    summary = {'count': self.count, 'shards': len(self.shards), **(stats or {})}
    (self.out_dir / '_stats.json').write_text(json.dumps(summary, indent=2))
    return summary


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), MTIME, 0o444
  tar.addfile(info, io.BytesIO(data))
