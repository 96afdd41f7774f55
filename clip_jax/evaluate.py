"""Evaluates a checkpoint: zero-shot classification and image-text retrieval.

  python -m clip_jax.evaluate --checkpoint DIR --image_folder imagenet/val \
      [--classnames FILE | --imagenet_classnames] [--templates openai|simple|generic|FILE]
  python -m clip_jax.evaluate --workdir RUN --zeroshot_shards 'eval/{00000..00003}.tar' \
      --classnames classnames.txt
  python -m clip_jax.evaluate --checkpoint DIR --tfds imagenet_v2 --tfds_split test
  python -m clip_jax.evaluate --checkpoint DIR --retrieval_shards 'coco_val/{00000..00004}.tar'
  python -m clip_jax.evaluate --checkpoint DIR --clip_benchmark wds_cars gs://b/wds_flickr30k
  python -m clip_jax.evaluate --checkpoint NAFLEX_DIR --zeroshot_shards ... --seq_len 256 1024

`--ema` evaluates the EMA of the params (a run with `config.optim.ema_decay`). A NaFlex
model sees each image at its own aspect ratio with `--seq_len N ...` (a result per length,
`DATA@seq_len=N`); without it, square images as any model.
Prints a JSON summary, then merges it into CHECKPOINT/eval_results.json
(eval_results_ema.json with --ema) per kind (`zeroshot`, `retrieval`, `clip_benchmark`) and
dataset, each entry with the checkpoint step and its data; the file is replaced by a rename,
and a folder that cannot be written only costs the save (a warning). Images are streamed
batch by batch, sharded over all devices, padded to a fixed size and masked, so every
example counts once; bad samples are skipped and counted (`eval/skips.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import cast

import jax
import numpy as np
from etils import epath

from clip_jax import sharding
from clip_jax.checkpoint import load_params, resolve_checkpoint
from clip_jax.cli import naming, positive_int, user_errors
from clip_jax.data.tokenizers import tokenizer_from_spec
from clip_jax.eval import clip_benchmark, retrieval, skips, zeroshot
from clip_jax.eval.encoder import Encoder
from clip_jax.eval.inputs import ImageInput
from clip_jax.models.functional import FunctionalModel

KINDS = ('zeroshot', 'retrieval', 'clip_benchmark')


def image_text_retrieval(encoder: Encoder, tokenizer, examples, total: int | None = None,
                         skipped: skips.Skipped | None = None) -> dict:
  """Recall@k of (image, captions) examples that every process passes alike, streamed."""
  image_features, captions = encoder.image_stream(examples, total, desc='retrieval')
  texts = [c for caps in captions for c in caps]
  owners = np.array([i for i, caps in enumerate(captions) for _ in caps])
  if not len(texts):
    raise ValueError('The retrieval shards hold no captions.')
  text_features = encoder.texts(tokenizer(texts))
  return {**retrieval.recall_at_k(image_features, text_features, owners),
          'num_images': len(captions), 'num_texts': len(texts),
          'skipped': (skipped or skips.Skipped()).as_dict()}


def benchmark_metrics(encoder: Encoder, tokenizer, dataset: clip_benchmark.Dataset) -> dict:
  """Zero-shot classification or retrieval of a CLIP_benchmark dataset, under its names."""
  skipped = skips.Skipped()
  total = clip_benchmark.count(dataset)
  if dataset.kind == 'retrieval':
    examples = clip_benchmark.examples(dataset, encoder.inputs, skipped)
    return clip_benchmark.retrieval_metrics(image_text_retrieval(encoder, tokenizer, examples,
                                                                 total, skipped))
  # A classification set's targets are labels; each process scores its share.
  labelled = cast(Iterator[zeroshot.Example], clip_benchmark.examples(
      dataset, encoder.inputs, skipped, _part()))
  return clip_benchmark.classification_metrics(zeroshot.run(
      encoder, tokenizer, dataset.classnames, dataset.templates, labelled, _share(total),
      skipped))


def _part() -> tuple[int, int]:
  """This process's share of the examples a zero-shot evaluation scores (summed after)."""
  return jax.process_index(), jax.process_count()


def _share(total: int) -> int:
  """The largest share of `total` examples any process gets."""
  return -(-total // jax.process_count())


def numbered_classnames(args) -> list[tuple[int, str]] | None:
  """(line number, name) of --classnames or the shipped ImageNet names; None for neither."""
  if args.imagenet_classnames:
    return list(enumerate(zeroshot.imagenet_classnames(), 1))
  if args.classnames:
    with naming('--classnames'):
      return zeroshot.read_numbered_lines(args.classnames, 'Class names')
  return None


def evaluate(args) -> dict:
  """Checks every input, scores the checkpoint, prints the results, then saves them."""
  if not (args.image_folder or args.zeroshot_shards or args.tfds or args.retrieval_shards
          or args.clip_benchmark):
    raise ValueError('Nothing to evaluate: pass --image_folder, --zeroshot_shards, --tfds, '
                     '--retrieval_shards or --clip_benchmark.')
  if args.zeroshot_shards and not (args.classnames or args.imagenet_classnames):
    raise ValueError('--zeroshot_shards needs --classnames FILE (or --imagenet_classnames).')
  class_lines = numbered_classnames(args)
  source = ('--imagenet_classnames' if args.imagenet_classnames
            else f'--classnames {args.classnames}')
  if args.zeroshot_shards:  # comes with class lines (checked above), one per label
    classnames = zeroshot.label_classnames(class_lines or (), source)
    labels = zeroshot.labelled_shards(args.zeroshot_shards, '--zeroshot_shards', classnames,
                                      source)
  if args.image_folder:  # class folders and their names are checked before any work
    folders, items = zeroshot.folder_dataset(args.image_folder)
    folder_names = zeroshot.folder_classnames(folders, class_lines, source, args.image_folder)
  benchmarks = [clip_benchmark.open_dataset(root, args.clip_benchmark_split)
                for root in args.clip_benchmark or ()]
  with naming('--templates'):
    templates = zeroshot.load_templates(args.templates)
  with naming('--checkpoint' if args.checkpoint else '--workdir'):
    checkpoint = resolve_checkpoint(args.checkpoint or args.workdir)
    results_file = checkpoint / ('eval_results_ema.json' if args.ema else 'eval_results.json')
    if jax.process_index() == 0:
      _warn_unless_writable(results_file)
    cfg, params = load_params(checkpoint, ema=args.ema)
  with naming('--seq_len'):
    inputs = [ImageInput.of(cfg, n) for n in args.seq_len or [None]]
  mesh = sharding.make_mesh({'data': -1})
  model, params = FunctionalModel.create(cfg), jax.device_put(params)
  tokenizer = tokenizer_from_spec(args.tokenizer or cfg.text.tokenizer, cfg.text.context_length)

  def scores(encoder: Encoder) -> dict[str, dict[str, dict]]:
    """Every requested evaluation with `encoder`'s image rows: kind -> dataset -> metrics."""
    rows = encoder.inputs
    found: dict[str, dict[str, dict]] = {kind: {} for kind in KINDS}
    if args.image_folder:
      skipped = skips.Skipped()
      found['zeroshot'][args.image_folder] = zeroshot.run(
          encoder, tokenizer, folder_names, templates,
          zeroshot.folder_images(items, rows, skipped, _part()), _share(len(items)), skipped)
    if args.zeroshot_shards:
      skipped = skips.Skipped()
      found['zeroshot'][args.zeroshot_shards] = zeroshot.run(
          encoder, tokenizer, classnames, templates,
          zeroshot.shard_images(args.zeroshot_shards, rows, part=_part(), skipped=skipped),
          _share(labels.count), skipped)
    if args.tfds:
      names, total, examples = zeroshot.tfds_dataset(args.tfds, args.tfds_split,
                                                     args.tfds_data_dir, rows, _part())
      names = [text for _, text in class_lines or ()] if args.imagenet_classnames else names
      found['zeroshot'][f'tfds:{args.tfds}/{args.tfds_split}'] = zeroshot.run(
          encoder, tokenizer, names, templates, examples, _share(total))
    if args.retrieval_shards:
      skipped = skips.Skipped()
      found['retrieval'][args.retrieval_shards] = image_text_retrieval(
          encoder, tokenizer, retrieval.retrieval_examples(args.retrieval_shards, rows, skipped),
          None, skipped)
    for b in benchmarks:
      found['clip_benchmark'][b.root] = benchmark_metrics(encoder, tokenizer, b)
    return found

  step = int(checkpoint.name) if checkpoint.name.isdigit() else None
  results: dict = {'checkpoint': str(checkpoint), 'ema': args.ema}
  for rows in inputs:  # a NaFlex model: each --seq_len in turn (one compile each)
    length = {} if rows.seq_len is None else {'seq_len': rows.seq_len}
    found = scores(Encoder(model, params, mesh, args.batch_size, rows))
    for kind, entries in ((k, e) for k, e in found.items() if e):
      results.setdefault(kind, {}).update({
          _entry_name(data, rows.seq_len): {**metrics, 'step': step, 'data': data, **length}
          for data, metrics in entries.items()})
  print(json.dumps(results, indent=2), flush=True)  # first: a failed save loses nothing
  if jax.process_index() == 0:
    save_results(results, results_file)
  return results


def _entry_name(data: str, seq_len: int | None) -> str:
  """A result's key: its dataset, and for a NaFlex length `DATA@seq_len=N` (one entry per
  length in the results file)."""
  return data if seq_len is None else f'{data}@seq_len={seq_len}'


def _warn_unless_writable(results_file: epath.Path) -> None:
  """Says before any compute that the results will only be printed (e.g. a read-only
  checkpoint folder), by writing and removing a probe file beside the results file."""
  probe = results_file.with_name(f'.{results_file.name}.{os.getpid()}.probe')
  try:
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    logging.warning('%s is not writable (%s): the results will be printed, not saved.',
                    results_file.parent, e.strerror or e)


def save_results(results: dict, path: epath.Path) -> None:
  """Merges `results` into the results file `path`, per kind and dataset, atomically.

  An earlier evaluation of another dataset or kind stays in the file (a dataset evaluated
  again gets its new entry); the merged file is written beside it and renamed over it, so
  the file is whole or the previous one. A file that is not a results object is left as it
  is, and a folder that cannot be written (read-only) only costs the save: each is one
  warning line, as the results were printed already.
  """
  try:
    saved = json.loads(path.read_text()) if path.exists() else {}
  except (OSError, ValueError) as e:
    saved = e
  if not isinstance(saved, dict):
    logging.warning('Results not saved: %s is not a JSON object of results (%s); it is left as '
                    'it is.', path, saved if isinstance(saved, Exception) else type(saved).__name__)
    return
  for kind in KINDS:
    if kind in results:
      earlier = saved.get(kind)
      saved[kind] = {**(earlier if isinstance(earlier, dict) else {}), **results[kind]}
  saved.update(checkpoint=results['checkpoint'], ema=results['ema'])
  temporary = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  try:
    temporary.write_text(json.dumps(saved, indent=2))
    temporary.replace(path)
  except OSError as e:
    logging.warning('Results not saved: %s is not writable (%s); they are printed above.',
                    path.parent, e.strerror or e)
    with contextlib.suppress(OSError):
      temporary.unlink(missing_ok=True)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--checkpoint', help='clip_jax checkpoint directory')
  where.add_argument('--workdir', help='training workdir (its latest checkpoint)')
  parser.add_argument('--ema', action='store_true',
                      help='evaluate the EMA of the params (runs with config.optim.ema_decay)')
  parser.add_argument('--image_folder', help='one subfolder of images per class')
  parser.add_argument('--zeroshot_shards', help="tar shards whose .json holds 'label'")
  parser.add_argument('--tfds', help='TFDS dataset name (prepared locally), e.g. imagenet2012')
  parser.add_argument('--tfds_split', default='validation')
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--retrieval_shards', help='tar shards with one or more captions each')
  parser.add_argument('--clip_benchmark', nargs='+', metavar='DIR',
                      help="datasets in CLIP_benchmark's webdataset layout (clip-benchmark/wds_*; "
                      'local or gs://), each with its own class names and templates')
  parser.add_argument('--clip_benchmark_split', default='test',
                      help='the split folder of --clip_benchmark datasets')
  names = parser.add_mutually_exclusive_group()
  names.add_argument('--classnames',
                     help='file with one class name per line (folder and shards; TFDS uses its '
                     'own). For --image_folder: the folder names in any order, FOLDER<TAB>NAME '
                     'lines, or names in sorted-folder order')
  names.add_argument('--imagenet_classnames', action='store_true',
                     help='use the shipped ImageNet-1k class names')
  parser.add_argument('--templates', default='openai',
                      help="'openai' (80), 'simple' (7), 'generic' or a file, one per line")
  parser.add_argument('--tokenizer', help="override the model's tokenizer (e.g. a .model file)")
  parser.add_argument('--batch_size', type=positive_int, default=256)
  parser.add_argument('--seq_len', type=positive_int, nargs='+',
                      help='NaFlex models: evaluate each image at its own aspect ratio as a '
                      'sequence of at most N patches, at each N given (default: square images '
                      "at the model's image size)")
  return parser.parse_args(argv)


@user_errors
def main(argv=None) -> None:
  logging.basicConfig(level=logging.WARNING)
  evaluate(parse_args(argv))


if __name__ == '__main__':
  main()
