"""Turns an image folder or a (filepath, caption) table into webdataset tar shards.

  python -m clip_jax.data.make_shards --input photos/ --output shards/ [--samples_per_shard N]
  python -m clip_jax.data.make_shards --input pairs.csv --output shards/
  python -m clip_jax.data.make_shards --input pairs.parquet --output shards/ \
      --path_column filepath --caption_column caption

A folder holds images with caption sidecars (`x.jpg` + `x.txt`). In a table, relative
paths are taken relative to the table's folder. Images are stored as their original
bytes once they decode; pairs whose image or caption is missing, whose caption is not
text, or whose image does not decode or is over the pixel cap, are skipped and counted in
`_stats.json` (under the training pipeline's names: `missing_caption`, `bad_caption`,
`missing_image`, `bad_image`, `oversized_image`).
"""

from __future__ import annotations

import argparse
import collections
import csv
from collections.abc import Iterator

from etils import epath
from tqdm import tqdm

from clip_jax.cli import positive_int, user_errors
from clip_jax.data.shard_writer import ShardWriter
from clip_jax.data.tar_samples import IMAGE_EXTENSIONS
from clip_jax.data.transforms import decode_or_skip

Pair = tuple[epath.Path, object]  # the caption as stored: sidecar bytes, a table cell, None


def folder_pairs(folder: epath.Path) -> Iterator[Pair]:
  """Images (in sorted order, subfolders included) with their `.txt` sidecar captions."""
  for path in sorted(folder.iterdir()):
    if path.is_dir():
      yield from folder_pairs(path)
    elif path.suffix.lower().lstrip('.') in IMAGE_EXTENSIONS:
      sidecar = path.with_suffix('.txt')
      yield path, sidecar.read_bytes() if sidecar.exists() else None


def caption_text(value: object) -> str | None:
  """A stored caption as text ('' when there is none); None when it is not text: a
  sidecar that is not UTF-8, a table cell holding a number."""
  if value is None:
    return ''
  if isinstance(value, bytes):
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError:
      return None
  return value.strip() if isinstance(value, str) else None


def table_pairs(table: epath.Path, path_column: str, caption_column: str) -> Iterator[Pair]:
  if table.suffix == '.parquet':
    import pyarrow.parquet as pq
    data = pq.read_table(str(table))
    columns, rows = data.column_names, data.to_pylist()
  else:
    try:
      with table.open() as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames or [], list(reader)
    except UnicodeDecodeError as e:
      raise ValueError(f'--input {table} is not UTF-8 text: {e}') from e
  if path_column not in columns or caption_column not in columns:
    raise ValueError(f'{table} needs columns {path_column!r} (--path_column) and '
                     f'{caption_column!r} (--caption_column); it has {sorted(columns)}.')
  for row in rows:
    path = epath.Path(row[path_column])
    yield (path if path.is_absolute() else table.parent / path), row[caption_column]


def make_shards(input_path: str, output: str, samples_per_shard: int = 10000,
                path_column: str = 'filepath', caption_column: str = 'caption') -> dict:
  source = epath.Path(input_path)
  if source.is_dir():
    pairs = list(folder_pairs(source))
  elif source.suffix in ('.csv', '.parquet') and source.exists():
    pairs = list(table_pairs(source, path_column, caption_column))
  else:
    raise FileNotFoundError(f'--input {source} is neither a folder nor a .csv/.parquet file.')
  writer = ShardWriter(output, samples_per_shard)
  skipped: collections.Counter[str] = collections.Counter()
  for path, stored in tqdm(pairs, desc='make_shards', unit='pair'):
    caption = caption_text(stored)
    if not caption:
      skipped['missing_caption' if caption == '' else 'bad_caption'] += 1
      continue
    try:
      image = path.read_bytes()
    except OSError:
      skipped['missing_image'] += 1
      continue
    # A file named `.jpg` can hold anything: it is decoded as training will (JPEGs at 1/8
    # scale: every byte still read, a fraction of the work) and skipped as training would.
    decoded = decode_or_skip(image, min_size=1)
    if isinstance(decoded, str):
      skipped[decoded] += 1
      continue
    writer.write(image, path.suffix.lower().lstrip('.'), caption, {'source': str(path)})
  return writer.close({'skipped': dict(skipped)})


@user_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--input', required=True, help='image folder, .csv or .parquet')
  parser.add_argument('--output', required=True, help='output folder for the shards')
  parser.add_argument('--samples_per_shard', type=positive_int, default=10000)
  parser.add_argument('--path_column', default='filepath')
  parser.add_argument('--caption_column', default='caption')
  args = parser.parse_args(argv)
  stats = make_shards(args.input, args.output, args.samples_per_shard, args.path_column,
                      args.caption_column)
  print(f'Wrote {stats["count"]} samples in {stats["shards"]} shards to {args.output} '
        f'(skipped: {stats["skipped"] or "none"})')


if __name__ == '__main__':
  main()
