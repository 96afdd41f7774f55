"""Embeds tar shards into clip-retrieval's layout, resumably, part by part.

  python -m clip_jax.embed --checkpoint DIR --shards 'data/{00000..00999}.tar' --out OUT \
      [--modalities image,text] [--batch_size 256] [--shards_per_part 1] [--ema] \
      [--decode_threads 4] [--seq_len N]

Part i holds the samples of the i-th group of `--shards_per_part` shards (sorted paths):
`OUT/img_emb/img_emb_{i}.npy`, `OUT/text_emb/text_emb_{i}.npy` (float16, L2-normalised
rows) and `OUT/metadata/metadata_{i}.parquet` (image_path, key, caption, url, shard), rows
in the same order. `i` is zero padded to the digits of the part count, as clip-retrieval's
inference writes it, so the files sort in part order for its `index` step.

A part's files are written whole (locally: `.tmp` names renamed into place), the parquet
last: a part is done when its parquet exists, and a rerun skips it. A part is written only
when every shard of it was read whole: a missing, unreadable or truncated shard leaves its
part unwritten (a warning names the shard, the summary counts `parts_incomplete` and the
command exits 1), so a rerun once the shard is restored embeds the part in full. Bad
samples inside a whole shard are skipped and counted; they do not hold a part back.
`OUT/embed_info.json` records the model (a fingerprint of its config and params), the
modalities, the shard groups and a NaFlex model's `--seq_len`; a rerun with another of these
is refused. With several processes, process p embeds parts i with i % process_count == p,
all in lockstep over the device mesh. `--decode_threads` images are decoded at once (each
within the pixel cap).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import sys
import time
from collections.abc import Iterator

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath
from tqdm import tqdm

from clip_jax import distributed, sharding
from clip_jax.checkpoint import load_params, resolve_checkpoint
from clip_jax.cli import naming, positive_int, user_errors
from clip_jax.data import tar_samples
from clip_jax.data.specs import parse_spec
from clip_jax.data.tar_samples import SKIP_REASONS, RawSample, Skip, read_shard
from clip_jax.data.tokenizers import tokenizer_from_spec
from clip_jax.data.transforms import decode_or_skip
from clip_jax.eval.encoder import Encoder
from clip_jax.eval.inputs import ImageInput, Row
from clip_jax.models.functional import FunctionalModel

MODALITIES = ('image', 'text')
FOLDERS = {'image': 'img_emb', 'text': 'text_emb', 'metadata': 'metadata'}
SUFFIX = {'image': '.npy', 'text': '.npy', 'metadata': '.parquet'}
INFO_NAME = 'embed_info.json'
EXIT_INCOMPLETE = 1  # the exit status when a part was left unwritten (a user error is 2)
# What must match for a rerun to add parts to an existing folder (checkpoint is a record).
IDENTITY = ('fingerprint', 'modalities', 'embed_dim', 'tokenizer', 'parts', 'seq_len')
# Skip reasons that mean a shard was not read whole: its part must not be marked done.
SHARD_FAILURES = ('unreadable_shard', 'empty_shard', 'truncated_shard')
METADATA_SCHEMA = pa.schema([('image_path', pa.string()), ('key', pa.string()),
                             ('caption', pa.string()), ('url', pa.string()),
                             ('shard', pa.string())])


@dataclasses.dataclass(frozen=True)
class Part:
  """One output part: its index, its shards and its final files (metadata last)."""
  index: int
  shards: tuple[str, ...]
  files: dict[str, epath.Path]


@dataclasses.dataclass(frozen=True)
class PartEnd:
  """Marks, in the sample stream, that every sample of `part` has been read; `failures`
  are the Skips of its shards that were not read whole (the part is then not written)."""
  part: Part
  failures: tuple[Skip, ...] = ()


def plan_parts(spec: str, shards_per_part: int, out: epath.Path,
               modalities: tuple[str, ...]) -> list[Part]:
  """The sorted shards of `spec` in groups of `shards_per_part`, one Part per group."""
  if shards_per_part < 1:
    raise ValueError(f'--shards_per_part must be positive, got {shards_per_part}')
  shards = sorted({s for source in parse_spec(spec) for s in source.shards})
  groups = [tuple(shards[i:i + shards_per_part]) for i in range(0, len(shards), shards_per_part)]
  width = len(str(len(groups)))  # clip-retrieval: int(log10(count)) + 1 digits
  kinds = (*modalities, 'metadata')  # the metadata parquet last: it marks the part done
  return [Part(i, group, {kind: out / FOLDERS[kind] / f'{FOLDERS[kind]}_{i:0{width}d}{SUFFIX[kind]}'
                          for kind in kinds}) for i, group in enumerate(groups)]


def _temp(path: epath.Path) -> epath.Path:
  return path.parent / f'{path.name}.tmp'


def write_whole(path: epath.Path, data: bytes) -> None:
  """Writes `path` so that no reader ever sees it half-written.

  Locally: a temp file renamed into place. On an object store (gs://) an object becomes
  visible only once its upload has completed, and a rename is a copy plus a delete of the
  whole object: the object is written directly.
  """
  if '://' in str(path):
    path.write_bytes(data)
  else:
    _temp(path).write_bytes(data)
    _temp(path).replace(path)


def pending_parts(parts: list[Part]) -> list[Part]:
  """This process's parts without a metadata parquet; their stale temp files are removed."""
  mine = [p for p in parts if p.index % jax.process_count() == jax.process_index()]
  pending = [p for p in mine if not p.files['metadata'].exists()]
  for part in pending:
    for path in part.files.values():
      path.parent.mkdir(parents=True, exist_ok=True)
      if _temp(path).exists():
        _temp(path).unlink()
  return pending


def fingerprint(cfg, params) -> str:
  """sha256 of the model config and the first values of every param: tells models apart."""
  digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.asarray(leaf).ravel()[:256].tobytes())
  return digest.hexdigest()[:16]


def check_info(out: epath.Path, info: dict) -> None:
  """Refuses an output folder made by another model, modalities or shard groups; else
  records `info` there (process 0), so that later reruns can check theirs."""
  path = out / INFO_NAME
  if path.exists():
    old = json.loads(path.read_text())
    for key in IDENTITY:
      if old.get(key) != info[key]:
        shown = ('' if key == 'parts' else f': {old.get(key)!r} there, {info[key]!r} now')
        raise ValueError(
            f'Embedding output folder {out} holds parts of another run ({key} differs{shown}; '
            f'it was made from {old.get("checkpoint")}). Use a new --out or empty this one.')
  elif jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(info, indent=2).encode())


def stream(parts: list[Part]) -> Iterator[tuple[Part, RawSample] | Skip | PartEnd]:
  """(part, sample) for every record of the parts' shards, Skip records, and PartEnd markers
  carrying the part's shard failures."""
  for part in parts:
    failures = []
    for shard in part.shards:
      for record in read_shard(shard):
        if isinstance(record, Skip) and record.reason in SHARD_FAILURES:
          failures.append(record)
        yield record if isinstance(record, Skip) else (part, record)
    yield PartEnd(part, tuple(failures))


def chunks(items: Iterator, size: int, skipped: collections.Counter) -> Iterator[list]:
  """Lists of at most `size` samples (with the PartEnd markers among them, in order).

  Skip records are counted by reason into `skipped` and dropped.
  """
  chunk, samples = [], 0
  for item in items:
    if isinstance(item, Skip):
      skipped[item.reason] += 1
      continue
    chunk.append(item)
    samples += not isinstance(item, PartEnd)
    if samples == size:
      yield chunk
      chunk, samples = [], 0
  if chunk:
    yield chunk


def url_of(sample: RawSample) -> str | None:
  """The `url` of the sample's json (img2dataset writes it), None when there is none."""
  try:
    url = tar_samples.json_object(sample.meta).get('url') if sample.meta else None
  except tar_samples.BadJSON:
    return None
  return url if isinstance(url, str) else None


def _npy_bytes(features: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, features.astype(np.float16))
  return buffer.getvalue()


def _parquet_bytes(rows: list[dict]) -> bytes:
  buffer = io.BytesIO()
  pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), buffer)
  return buffer.getvalue()


def write_part(part: Part, features: dict[str, list[np.ndarray]], rows: list[dict]) -> None:
  """Writes a part's files whole (`write_whole`), the metadata parquet last: a part is done
  when its parquet exists.

  A part without samples writes only its (empty) parquet, and drops any embedding file of
  an earlier attempt, since autofaiss has no use for zero-row arrays.
  """
  payload = {}
  for kind, path in part.files.items():
    if kind == 'metadata':
      payload[kind] = _parquet_bytes(rows)
    elif rows:
      payload[kind] = _npy_bytes(np.concatenate(features[kind]))
    elif path.exists():
      path.unlink()
  for kind, data in payload.items():  # dicts keep order: the metadata parquet last
    write_whole(part.files[kind], data)


class Embedder:
  """Features of one chunk of samples per modality, and the parts they complete."""

  def __init__(self, encoder: Encoder, tokenizer, modalities: tuple[str, ...],
               skipped: collections.Counter, pool: concurrent.futures.Executor):
    self.encoder, self.tokenizer, self.modalities = encoder, tokenizer, modalities
    self.skipped = skipped
    # Per part index: feature blocks by modality, and metadata rows, until the part ends.
    self.features: dict[int, dict[str, list[np.ndarray]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    self.rows: dict[int, list[dict]] = collections.defaultdict(list)
    self._pool = pool  # decodes images (PIL frees the GIL); its threads bound the memory
    self.incomplete = 0  # parts left unwritten: a shard of theirs was not read whole
    self.dropped = 0  # the samples embedded for those parts

  def _row(self, sample: RawSample) -> Row | Skip:
    image = decode_or_skip(sample.image, self.encoder.inputs.decode_size)
    if isinstance(image, str):  # the skip kind: bad_image, oversized_image
      return Skip(image, f'{sample.shard}:{sample.key}')
    return self.encoder.inputs(image)

  def _decoded(self, samples: list) -> tuple[list, list[Row]]:
    """The samples whose image decodes, and their image rows; bad images are counted."""
    rows = list(self._pool.map(self._row, [s for _, s in samples]))
    for bad in (r for r in rows if isinstance(r, Skip)):
      self.skipped[bad.reason] += 1
    good = [(s, r) for s, r in zip(samples, rows) if not isinstance(r, Skip)]
    return [s for s, _ in good], [r for _, r in good]

  def step(self, chunk: list) -> int:
    """Embeds a chunk (a collective: every process calls it, maybe with an empty chunk),
    writes the parts it completes and returns how many samples it embedded."""
    samples = [item for item in chunk if not isinstance(item, PartEnd)]
    features = {}
    if 'image' in self.modalities:
      samples, images = self._decoded(samples)
      features['image'] = self.encoder.local_images(images)
    if 'text' in self.modalities:
      features['text'] = self.encoder.local_texts(
          self.tokenizer([s.caption for _, s in samples]))
    owners = np.array([part.index for part, _ in samples])
    for index in dict.fromkeys(owners.tolist()):
      for kind, values in features.items():
        self.features[index][kind].append(values[owners == index])
    for part, sample in samples:
      self.rows[part.index].append({'image_path': sample.key, 'key': sample.key,
                                    'caption': sample.caption, 'url': url_of(sample),
                                    'shard': sample.shard})
    for end in (item for item in chunk if isinstance(item, PartEnd)):
      self._finish(end)
    return len(samples)

  def _finish(self, end: PartEnd) -> None:
    """Writes a part whose shards were all read whole; otherwise drops it, saying why, so
    that a rerun embeds it once its shards are restored."""
    features, rows = self.features.pop(end.part.index, {}), self.rows.pop(end.part.index, [])
    if not end.failures:
      write_part(end.part, features, rows)
      return
    self.incomplete += 1
    self.dropped += len(rows)
    for failure in end.failures:
      logging.warning('part %d (%s) not written: shard %s was not read whole (%s); rerun '
                      'embed once it is whole to embed the part', end.part.index,
                      end.part.files['metadata'].name, failure.where, failure.reason)


def parse_modalities(text: str) -> tuple[str, ...]:
  """'text,image' -> ('image', 'text'): one order whatever the flag's, for the record."""
  names = set(text.split(','))
  if not names <= set(MODALITIES):
    raise ValueError(f'--modalities takes image and/or text, got {text!r}')
  return tuple(m for m in MODALITIES if m in names)


def embed(args) -> dict:
  """Embeds every pending part of `args.shards` into `args.out`; returns a summary."""
  modalities = parse_modalities(args.modalities)
  out = epath.Path(args.out)
  with naming('--shards'):  # before the slow load
    parts = plan_parts(args.shards, args.shards_per_part, out, modalities)
  with naming('--checkpoint'):
    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg, params = load_params(checkpoint, ema=args.ema)
  with naming('--seq_len'):
    inputs = ImageInput.of(cfg, args.seq_len)
  tokenizer_spec = args.tokenizer or cfg.text.tokenizer
  check_info(out, {'checkpoint': str(checkpoint), 'ema': args.ema,
                   'fingerprint': fingerprint(cfg, params), 'modalities': list(modalities),
                   'embed_dim': cfg.embed_dim, 'tokenizer': tokenizer_spec,
                   'parts': [list(p.shards) for p in parts], 'seq_len': args.seq_len})
  pending = pending_parts(parts)
  encoder = Encoder(FunctionalModel.create(cfg), jax.device_put(params),
                    sharding.make_mesh({'data': -1}), args.batch_size, inputs)
  skipped: collections.Counter[str] = collections.Counter()
  tokenizer = (tokenizer_from_spec(tokenizer_spec, cfg.text.context_length)
               if 'text' in modalities else None)
  batches = chunks(stream(pending), encoder.batch_size // jax.process_count(), skipped)
  start, embedded = time.perf_counter(), 0
  with (concurrent.futures.ThreadPoolExecutor(args.decode_threads) as pool,
        tqdm(desc='embed', unit='sample', disable=jax.process_index() != 0) as bar):
    embedder = Embedder(encoder, tokenizer, modalities, skipped, pool)
    while not distributed.on_all_processes((chunk := next(batches, None)) is None):
      bar.update(count := embedder.step(chunk or []))
      embedded += count
  seconds = time.perf_counter() - start
  totals = distributed.sum_over_processes(np.array([
      len(pending) - embedder.incomplete, embedder.incomplete, embedded - embedder.dropped,
      *(skipped[r] for r in SKIP_REASONS)]))
  return {'out': str(out), 'parts': len(parts), 'parts_embedded': int(totals[0]),
          'parts_incomplete': int(totals[1]), 'samples': int(totals[2]),
          'seconds': round(seconds, 2),
          'samples_per_s': round(int(totals[2]) / max(seconds, 1e-9), 1),
          'skipped': {r: int(c) for r, c in zip(SKIP_REASONS, totals[3:]) if c}}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='clip_jax checkpoint directory or training workdir (its latest step)')
  parser.add_argument('--shards', required=True, help="tar shard spec, e.g. 'd/{00000..00099}.tar'")
  parser.add_argument('--out', required=True, help='output folder (clip-retrieval layout)')
  parser.add_argument('--modalities', default='image,text', help="'image,text', 'image' or 'text'")
  parser.add_argument('--batch_size', type=positive_int, default=256)
  parser.add_argument('--shards_per_part', type=positive_int, default=1)
  parser.add_argument('--ema', action='store_true',
                      help='embed with the EMA of the params (runs with config.optim.ema_decay)')
  parser.add_argument('--tokenizer', help="override the model's tokenizer (e.g. a .model file)")
  parser.add_argument('--decode_threads', type=positive_int, default=4,
                      help='images decoded at once; each may take up to ~256 MiB while it '
                           'decodes (larger ones are skipped as oversized_image)')
  parser.add_argument('--seq_len', type=positive_int,
                      help='NaFlex models: embed each image at its own aspect ratio as a '
                      "sequence of at most N patches (default: square, at the model's size)")
  return parser.parse_args(argv)


@user_errors
def main(argv=None) -> None:
  logging.basicConfig(level=logging.WARNING)
  distributed.initialize()
  summary = embed(parse_args(argv))
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))
  if summary['parts_incomplete']:  # every process: the count is summed over them
    sys.exit(EXIT_INCOMPLETE)


if __name__ == '__main__':
  main()
