"""Streaming webdataset-style tar reading: members grouped by key into samples.

A sample is the run of consecutive members sharing a key (the member path up to the first
dot of its file name): `000123.jpg`, `000123.txt`, `000123.json` -> one sample. Nothing is
extracted to disk and member sizes are checked before they are read.

Bad data never stops the stream: the reader yields `Skip(reason)` markers that the
pipeline counts and drops (`SKIP_REASONS`).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import tarfile
from collections.abc import Iterator

import grain
from etils import epath

from clip_jax.data.specs import parse_spec

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
MAX_MEMBER_BYTES = 64 << 20
SKIP_REASONS = ('unreadable_shard', 'empty_shard', 'truncated_shard', 'oversized_member',
                'missing_image', 'multiple_images', 'empty_image', 'missing_caption',
                'bad_caption', 'bad_image', 'oversized_image')


@dataclasses.dataclass(frozen=True)
class Skip:
  reason: str
  where: str = ''


@dataclasses.dataclass(frozen=True)
class RawSample:
  key: str
  shard: str
  image: bytes
  caption: str
  meta: bytes = b''  # the sample's raw `.json` (labels for evaluation), if any


Record = RawSample | Skip


def split_key(member_name: str) -> tuple[str, str]:
  """'dir/000123.seg.jpg' -> ('dir/000123', 'seg.jpg') (webdataset's rule)."""
  directory, base = posixpath.split(member_name)
  stem, dot, ext = base.partition('.')
  return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ''


class BadJSON(ValueError):
  """A sample's `.json` is not UTF-8, not JSON, not a JSON object, or nested too deep."""


def json_object(data: bytes) -> dict:
  """A sample's `.json` as a dict; any other content raises `BadJSON`.

  Files come from anywhere: valid JSON can still be a list, a string or a number (no
  `.get`), nest deeper than the decoder's recursion limit (RecursionError), or hold an
  integer too long to convert (ValueError). Each of those would otherwise escape as an
  unexpected exception type and stop a data-loader worker.
  """
  try:
    value = json.loads(data.decode('utf-8'))
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError included
    raise BadJSON(f'not UTF-8 JSON ({type(e).__name__})') from None
  if not isinstance(value, dict):
    raise BadJSON(f'a JSON {type(value).__name__}, not an object')
  return value


def _caption(files: dict[str, bytes], caption_key: str) -> str | None:
  """The caption from `txt`, or from field `caption_key` of `json` when no txt exists."""
  if 'txt' in files:
    return files['txt'].decode('utf-8').strip()
  if 'json' in files:
    value = json_object(files['json']).get(caption_key)
    return value.strip() if isinstance(value, str) else None
  return None


def assemble(key: str, shard: str, files: dict[str, bytes], caption_key: str) -> Record:
  images = [ext for ext in files if ext in IMAGE_EXTENSIONS]
  where = f'{shard}:{key}'
  if not images:
    return Skip('missing_image', where)
  if len(images) > 1:
    return Skip('multiple_images', where)
  if not files[images[0]]:
    return Skip('empty_image', where)
  try:
    caption = _caption(files, caption_key)
  except (UnicodeDecodeError, BadJSON):
    return Skip('bad_caption', where)
  if caption is None:
    return Skip('missing_caption', where)
  return RawSample(key, shard, files[images[0]], caption, files.get('json', b''))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
  handle = tar.extractfile(member)
  data = handle.read() if handle else b''
  if len(data) != member.size:
    raise tarfile.ReadError(f'{member.name}: expected {member.size} bytes, got {len(data)}')
  return data


def _groups(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
  """(key, members) for each run of consecutive regular files sharing a key."""
  key, members = '', []  # type: tuple[str, list[tarfile.TarInfo]]
  for member in tar:
    if not member.isfile():
      continue
    member_key = split_key(member.name)[0]
    if members and member_key != key:
      yield key, members
      members = []
    key = member_key
    members.append(member)
  if members:
    yield key, members


def read_groups(path: str, skip: int = 0) -> Iterator[tuple[str, dict[str, bytes]] | Skip]:
  """(key, {extension: bytes}) of each sample of one tar shard in order; problems are Skips.

  Every key group yields exactly one item, so the first `skip` groups are passed over from
  the tar headers alone, without reading their data (fast resume). Readers of other
  layouts (CLIP_benchmark's `.cls` labels) assemble the files themselves.
  """
  try:
    fileobj = epath.Path(path).open('rb')
  except OSError:
    if not skip:
      yield Skip('unreadable_shard', path)
    return
  with fileobj:
    try:
      tar = tarfile.open(fileobj=fileobj, mode='r:')  # noqa: SIM115 (closed with fileobj)
    except tarfile.ReadError:
      if not skip:
        yield Skip('empty_shard', path)
      return
    try:
      for index, (key, members) in enumerate(_groups(tar)):
        if index < skip:
          continue
        oversized = [m.name for m in members if m.size > MAX_MEMBER_BYTES]
        if oversized:
          yield Skip('oversized_member', f'{path}:{oversized[0]}')
          continue
        yield key, {split_key(m.name)[1]: _read_member(tar, m) for m in members}
    except (tarfile.ReadError, OSError, EOFError):
      yield Skip('truncated_shard', path)


def read_shard(path: str, caption_key: str = 'caption', skip: int = 0) -> Iterator[Record]:
  """Yields the records of one tar shard in order; problems become Skip records.

  Every key group yields exactly one record (see `read_groups`, which `skip` is passed to).
  """
  for group in read_groups(path, skip):
    if isinstance(group, Skip):
      yield group
    else:
      key, files = group
      yield assemble(key, path, files, caption_key)


def count_groups(path: str) -> int:
  """How many key groups (samples) one shard holds, from its tar headers alone."""
  with epath.Path(path).open('rb') as fileobj, tarfile.open(fileobj=fileobj, mode='r:') as tar:
    return sum(1 for _ in _groups(tar))


def read_samples(spec: str, caption_key: str = 'caption') -> Iterator[RawSample]:
  """Every good sample of a shard spec, in spec order, once (for evaluation)."""
  for source in parse_spec(spec):
    for shard in source.shards:
      for record in read_shard(shard, caption_key):
        if isinstance(record, RawSample):
          yield record


class _ShardIterator(grain.DatasetIterator):
  """Iterates one shard; its state is the number of records already produced."""

  def __init__(self, path: str, caption_key: str):
    super().__init__()
    self._path, self._caption_key = path, caption_key
    self._records = read_shard(path, caption_key)
    self._position = 0

  def __next__(self) -> Record:
    record = next(self._records)
    self._position += 1
    return record

  def get_state(self) -> dict:
    return {'position': self._position}

  def set_state(self, state: dict) -> None:
    """Re-opens the shard after the records already produced (read from headers only)."""
    self._position = state['position']
    self._records = read_shard(self._path, self._caption_key, skip=self._position)


class ShardDataset(grain.IterDataset):
  """One tar shard as a checkpointable grain IterDataset of records."""

  def __init__(self, path: str, caption_key: str = 'caption'):
    super().__init__()
    self.path, self.caption_key = path, caption_key

  def __iter__(self) -> _ShardIterator:
    return _ShardIterator(self.path, self.caption_key)

  def __str__(self) -> str:
    return f'ShardDataset({self.path})'
