"""The grain input pipeline: tar shards (or synthetic data) -> global sharded batches.

Per process:  shards (this process's disjoint share, reshuffled every epoch)
  -> interleave `cycle_length` open shards -> weighted mixture of sources
  -> window shuffle -> decode + augment + tokenize (seeded per element)
  -> drop and count bad samples -> batch to the per-process batch
  -> `mp_prefetch` worker processes -> `jax.make_array_from_process_local_data`.

Batches hold `image` (uint8 [B, H, W, 3]; normalise on device with
`transforms.normalize_on_device`, 4x less inter-process traffic than float32) and
`text` (int32 [B, context]); with LocCa on (`PipelineConfig.locca`) also `decoder_tokens`
and `decoder_mask` (int32 [B, locca context], `clip_jax.data.locca`). With NaFlex batching
(`PipelineConfig.naflex`) `image` gives way to `patches`, `coords` and `valid` at each
batch's own sequence length and size (`clip_jax.data.naflex`). Every stage is a
grain dataset with checkpointable state, so `Loader.get_state()` / `set_state()` resume at
the exact next batch, workers included.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from PIL import Image

from clip_jax.data import locca, naflex
from clip_jax.data.specs import Source, parse_spec
from clip_jax.data.tar_samples import SKIP_REASONS, RawSample, ShardDataset, Skip
from clip_jax.data.tokenizers import Tokenizer
from clip_jax.data.transforms import (
  MAX_IMAGE_PIXELS,
  Window,
  decode_or_skip,
  random_crop_window,
  resize_and_crop,
  resize_and_crop_window,
  resize_window,
)

AUGMENTATIONS = ('random_resized_crop', 'center_crop', 'squash')
KINDS = ('tar', 'synthetic')


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything the pipeline needs, and the one place its defaults are declared.

  The trainer sets `TRAINER_FIELDS` from the model and the run (training streams
  endlessly, so `num_epochs` stays 0); every other field is a `config.data` key, which
  `clip_jax.config_base` builds from `data_defaults()`.
  """
  global_batch_size: int
  image_size: int
  tokenizer: Tokenizer
  seed: int = 0
  vocab_size: int = 49408                 # synthetic only
  kind: str = 'tar'                       # 'tar' | 'synthetic'
  train: str = ''                         # shard spec, '::' between mixture sources
  weights: str = ''                       # mixture weights, e.g. '1::2'
  caption_key: str = 'caption'            # json field when a sample has no .txt
  augment: str = 'random_resized_crop'    # or 'center_crop' / 'squash' (eval-style)
  crop_scale: tuple[float, float] = (0.9, 1.0)
  shuffle_window: int = 2048              # samples; <= 1 turns shuffling off
  cycle_length: int = 4                   # shards open at once per worker (at most its share)
  # mp_prefetch processes (0: in-process); 'auto': from the host's cores (`auto_workers`).
  # Never more than this process's shards of any source (`data_workers`).
  workers: int | str = 'auto'
  worker_buffer: int = 2                  # batches buffered per worker
  max_bad_before_first_good: int = 1000
  # Images whose header declares more pixels (width x height) are skipped undecoded and
  # counted as `oversized_image`, as are those over PIL's own bomb limit, the same number
  # by default (clip_jax.data.transforms.MAX_IMAGE_PIXELS says why that number).
  max_image_pixels: int = MAX_IMAGE_PIXELS
  num_epochs: int = 0                     # passes over the shards; 0: endless (training)
  locca: locca.LoccaSpec | None = None    # LocCa decoder sequences (`locca.locca_spec`)
  # NaFlex batches (`clip_jax.data.naflex`): images at their own aspect ratio as patch
  # sequences, the length and batch size chosen per batch. None: square images.
  naflex: naflex.NaFlexBatching | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'config.data.kind must be one of {KINDS}, got {self.kind!r}')
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f'config.data.augment must be one of {AUGMENTATIONS}, '
                       f'got {self.augment!r}')
    if self.max_image_pixels <= 0:
      raise ValueError(f'config.data.max_image_pixels must be positive, '
                       f'got {self.max_image_pixels}')
    if self.workers != 'auto' and not (isinstance(self.workers, int) and self.workers >= 0):
      raise ValueError(f"config.data.workers must be 'auto' or a count >= 0, "
                       f'got {self.workers!r}')


TRAINER_FIELDS = ('global_batch_size', 'image_size', 'tokenizer', 'seed', 'vocab_size',
                  'num_epochs', 'locca', 'naflex')
# What each element counts besides its skips (its `counted` vector): the `Loader` counter
# and key each entry folds into. Texts cut to fit their context ('caption': the text
# tower's, 'locca_sequence': the decoder's), LocCa examples that fell back to captioning
# because their json or `objects` could not be read, and NaFlex images (crops) with a side
# shorter than one patch, upscaled to at least one patch row or column.
COUNTED = (('cut', 'caption'), ('cut', 'locca_sequence'), ('locca_fallback', 'bad_objects'),
           ('upscaled', 'smaller_than_patch'))
# Their places in `counted`.
CAPTION_CUT, LOCCA_CUT, BAD_OBJECTS, SMALLER_THAN_PATCH = range(len(COUNTED))


def data_defaults() -> dict[str, Any]:
  """The `config.data` section: every field a user sets, with its default."""
  return {f.name: f.default for f in dataclasses.fields(PipelineConfig)
          if f.name not in TRAINER_FIELDS}


class ImageTextMapper:
  """RawSample -> {'image': uint8 HWC, 'text': int32 [context], 'counted'} (+ the LocCa
  keys when on), or a Skip ('oversized_image', 'bad_image')."""

  def __init__(self, cfg: PipelineConfig):
    self.cfg = cfg

  def __call__(self, record, rng: np.random.Generator):
    if isinstance(record, Skip):
      return record
    image = decode_or_skip(record.image, self.cfg.image_size, self.cfg.max_image_pixels)
    if isinstance(image, str):
      return Skip(image, f'{record.shard}:{record.key}')
    size = image.size
    image, window = augment(image, self.cfg, rng)
    counted = np.zeros(len(COUNTED), np.int32)
    if self.cfg.naflex is not None:
      counted[SMALLER_THAN_PATCH] = (min(window[2] - window[0], window[3] - window[1])
                                     < self.cfg.naflex.patch_size)
    text, counted[CAPTION_CUT] = caption_tokens(self.cfg.tokenizer, record.caption)
    example = {'image': np.asarray(image, np.uint8), 'text': text, 'counted': counted}
    if self.cfg.locca:
      example.update(locca_keys(record, size, window, rng, self.cfg.locca, counted))
    return example


def caption_tokens(tokenizer: Tokenizer, caption: str) -> tuple[np.ndarray, bool]:
  """The caption's ids and whether they were cut to the context. Tokenised one token
  longer: a caption that fits has a pad or its end token at the context's last place
  (the same ids, plus a pad); one that does not has a text token there, and is tokenised
  again at the context, which cuts it as the tokenizer does."""
  context = tokenizer.context_length
  longer = tokenizer([caption], context + 1)[0]
  end = tokenizer.eot_id if hasattr(tokenizer, 'eot_id') else tokenizer.eos_id
  if longer[context - 1] in (tokenizer.pad_id, end):
    return longer[:context], False
  return tokenizer([caption])[0], True


def locca_keys(record: RawSample, size: tuple[int, int], window: Window,
               rng: np.random.Generator, spec: locca.LoccaSpec, counted: np.ndarray
               ) -> dict[str, np.ndarray]:
  """`decoder_tokens` and `decoder_mask` for a sample whose source image had `size` and
  was cropped to `window`; its counts go into `counted`. Unreadable objects leave the pair
  to the caption task (counted): the image and caption are still good for the contrastive
  loss and for captioning, and dropping the pair would make the contrastive stream depend
  on LocCa being on."""
  try:
    regions = locca.objects_from_json(record.meta)
  except locca.BadObjects:
    regions = []
    counted[BAD_OBJECTS] += 1
  regions = locca.visible_regions(regions, window, *size, spec)
  tokens, mask, counted[LOCCA_CUT] = locca.make_example(record.caption, regions, rng, spec)
  return {'decoder_tokens': tokens, 'decoder_mask': mask}


def augment(image: Image.Image, cfg: PipelineConfig, rng: np.random.Generator
            ) -> tuple[Image.Image, Window]:
  """The augmented image and the source rectangle it shows (which boxes follow)."""
  if cfg.naflex is not None:
    return naflex_augment(image, cfg, rng)
  if cfg.augment == 'random_resized_crop':
    window = random_crop_window(*image.size, rng, scale=cfg.crop_scale)
    return resize_window(image, cfg.image_size, window), window
  mode = 'shortest' if cfg.augment == 'center_crop' else 'squash'
  return (resize_and_crop(image, cfg.image_size, mode, 'bicubic'),
          resize_and_crop_window(*image.size, cfg.image_size, mode))


def naflex_augment(image: Image.Image, cfg: PipelineConfig, rng: np.random.Generator
                   ) -> tuple[Image.Image, Window]:
  """NaFlex keeps each image's aspect ratio: a random crop of `crop_scale` of its area at
  its own aspect ratio times one in [3/4, 4/3] (each side at most the image's; eval-style
  augmentations: the whole image), resized to its grid at the longest sequence length;
  `NaFlexBatches` resizes it to the batch's own length. Unlike torchvision's rectangle
  (`random_crop_window`), which falls back to the central square after 10 misses (6% of a
  2:1 image's draws at scale (0.9, 1)), the crop is drawn once and never turns a wide image
  square."""
  assert cfg.naflex is not None
  width, height = image.size
  window: Window = (0.0, 0.0, float(width), float(height))
  if cfg.augment == 'random_resized_crop':
    area = rng.uniform(*cfg.crop_scale)
    jitter = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = min(width, width * np.sqrt(area * jitter))
    crop_h = min(height, height * np.sqrt(area / jitter))
    left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    window = (left, top, left + crop_w, top + crop_h)
  crop_w, crop_h = window[2] - window[0], window[3] - window[1]
  patch = cfg.naflex.patch_size
  rows, cols = naflex.grid_for_sequence(max(1, round(crop_h)), max(1, round(crop_w)), patch,
                                        max(cfg.naflex.seq_lens))
  return (image.convert('RGB').resize((cols * patch, rows * patch), Image.Resampling.BICUBIC,
                                      box=window), window)


class _DropBadIterator(grain.DatasetIterator):
  """Drops Skip records; each good element carries the skips counted since the last one.

  Summing `skipped` over all batches gives exact totals even across worker processes.
  A stream whose first `limit` records are all bad fails, naming the spec.
  """

  def __init__(self, parent: grain.DatasetIterator, spec: str, limit: int):
    super().__init__(parent)
    self._spec, self._limit = spec, limit
    self._seen_good = False

  def __next__(self):
    counts = np.zeros(len(SKIP_REASONS), np.int32)
    while True:
      record = next(self._parent)
      if not isinstance(record, Skip):
        self._seen_good = True
        return {**record, 'skipped': counts}
      counts[SKIP_REASONS.index(record.reason)] += 1
      if not self._seen_good and counts.sum() >= self._limit:
        summary = {r: int(c) for r, c in zip(SKIP_REASONS, counts) if c}
        raise ValueError(f'Data spec {self._spec!r}: the first {counts.sum()} samples are all '
                         f'bad ({summary}, last: {record.reason} at {record.where}).')

  def get_state(self):
    return {'parent': self._parent.get_state(), 'seen_good': self._seen_good}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._seen_good = state['seen_good']


class DropBad(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, spec: str, limit: int):
    super().__init__(parent)
    self._spec, self._limit = spec, limit

  def __iter__(self):
    return _DropBadIterator(self._parent.__iter__(), self._spec, self._limit)


def process_shards(source: Source, process_index: int, process_count: int) -> list[str]:
  """This process's disjoint share of a source's shards (round-robin)."""
  if len(source.shards) < process_count:  # checked on every process, so all fail alike
    raise ValueError(f'Shard spec {source.spec!r} has {len(source.shards)} shards, fewer than '
                     f'the {process_count} processes; write more, smaller shards.')
  return list(source.shards[process_index::process_count])


def source_records(source: Source, cfg: PipelineConfig, process_index: int,
                   process_count: int, index: int) -> grain.IterDataset:
  """Records of one source: shards reshuffled each epoch, several open at once.

  The shard list repeats before interleaving, so in endless mode every worker of
  `mp_prefetch` always has shards to read (no webdataset-style hang); with `num_epochs`, a
  worker without shards simply ends. A worker keeps at most as many shards open as its
  share holds: more would open the same shard twice and put its samples next to their
  own copies, duplicates in one batch (false negatives for a contrastive loss).
  """
  shards = process_shards(source, process_index, process_count)
  paths = grain.MapDataset.source(shards).shuffle(seed=cfg.seed + 7919 * index)
  paths = paths.repeat(cfg.num_epochs or None)
  datasets = paths.map(lambda path: ShardDataset(path, cfg.caption_key))
  per_worker = len(shards) // max(int(cfg.workers), 1)
  return grain.experimental.InterleaveIterDataset(
      datasets, cycle_length=max(1, min(cfg.cycle_length, per_worker)))


def tar_dataset(cfg: PipelineConfig, sources: Sequence[Source], process_index: int,
                process_count: int) -> grain.IterDataset:
  if process_index == 0:
    for line in missing_shard_warnings(sources):
      logging.warning(line)
  streams = [source_records(s, cfg, process_index, process_count, i)
             for i, s in enumerate(sources)]
  ds = (streams[0] if len(streams) == 1
        else grain.IterDataset.mix(streams, [s.weight for s in sources]))
  if cfg.shuffle_window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=cfg.shuffle_window,
                                                     seed=cfg.seed)
  ds = ds.random_map(ImageTextMapper(cfg), seed=cfg.seed + process_index)
  return DropBad(ds, str(cfg.train), cfg.max_bad_before_first_good)


def missing_shard_warnings(sources: Sequence[Source]) -> list[str]:
  """One line per source with missing shards. The run goes on without them (each counts as
  `skipped/unreadable_shard` in metrics.jsonl), but a typo in a range or an unfinished copy
  should be seen on the console at start, not found in the metrics later."""
  lines = []
  for source in sources:
    if source.missing:
      name = 'data.train' if len(sources) == 1 else f'data.train source {source.spec!r}'
      present = len(source.shards) - len(source.missing)
      lines.append(f'{name}: {len(source.missing)} of {len(source.shards)} shards are missing '
                   f'(first: {source.missing[0]}); training on the {present} present')
  return lines


class SyntheticSample:
  """Global sample index -> random image and token ids ending in an EOT-like max id (with
  LocCa on, a caption-task decoder sequence of random text ids too).

  Samples depend only on (seed, global index), and each process generates the rows it
  owns in the global batch, so any process layout sees the same global batches.
  """

  def __init__(self, cfg: PipelineConfig, process_index: int, process_count: int):
    self.cfg = cfg
    self.local_batch = cfg.global_batch_size // process_count
    self.offset = process_index * self.local_batch
    self.context = len(cfg.tokenizer(['']).reshape(-1))

  def __call__(self, local_index: int):
    batch, row = divmod(local_index, self.local_batch)
    rng = np.random.default_rng([self.cfg.seed, batch * self.cfg.global_batch_size
                                 + self.offset + row])
    size, context = self.cfg.image_size, self.context
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    length = rng.integers(2, context + 1)
    text = np.zeros(context, np.int32)
    text[:length - 1] = rng.integers(1, self.cfg.vocab_size - 1, length - 1)
    text[length - 1] = self.cfg.vocab_size - 1
    sample = {'image': image, 'text': text, 'skipped': np.zeros(len(SKIP_REASONS), np.int32),
              'counted': np.zeros(len(COUNTED), np.int32)}
    if self.cfg.locca:
      sample['decoder_tokens'], sample['decoder_mask'] = synthetic_decoder(rng, self.cfg.locca)
    return sample


def synthetic_decoder(rng: np.random.Generator, spec: locca.LoccaSpec
                      ) -> tuple[np.ndarray, np.ndarray]:
  """[sot, CAP, random text ids..., eot], padded, and its caption-task mask."""
  length = rng.integers(3, spec.context_length + 1)
  sequence = [spec.tokenizer.sot_id, spec.task_token('caption'),
              *rng.integers(1, spec.tokenizer.sot_id, length - 3), spec.tokenizer.eot_id]
  tokens = np.full(spec.context_length, spec.tokenizer.pad_id, np.int32)
  tokens[:length] = sequence
  mask = np.zeros(spec.context_length, np.int32)
  mask[2:length] = 1
  return tokens, mask


def synthetic_dataset(cfg: PipelineConfig, process_index: int, process_count: int
                      ) -> grain.IterDataset:
  sample = SyntheticSample(cfg, process_index, process_count)
  return grain.MapDataset.range(1 << 62).map(sample).to_iter_dataset()


class Built(NamedTuple):
  dataset: grain.IterDataset  # per-process numpy batches
  workers: int                # the worker processes it runs in (`data_workers`)


def build_dataset(cfg: PipelineConfig, process_index: int = 0, process_count: int = 1
                  ) -> Built:
  """The per-process dataset of numpy batches (before device transfer)."""
  if cfg.global_batch_size % process_count:
    raise ValueError(f'Global batch {cfg.global_batch_size} is not divisible by the '
                     f'{process_count} processes.')
  if cfg.kind == 'tar':
    sources = parse_spec(cfg.train, cfg.weights or None)
    cfg = dataclasses.replace(cfg, workers=data_workers(cfg, sources, process_count))
    ds = tar_dataset(cfg, sources, process_index, process_count)
  else:
    if cfg.naflex is not None:
      raise ValueError('NaFlex batches (data.naflex) need tar shards (data.kind=tar): '
                       'synthetic samples are laid out for a fixed batch')
    cfg = dataclasses.replace(cfg, workers=data_workers(cfg, None, process_count))
    ds = synthetic_dataset(cfg, process_index, process_count)
  if cfg.naflex is not None:
    ds = naflex.NaFlexBatches(ds, cfg.naflex, process_count)
  else:
    ds = ds.batch(cfg.global_batch_size // process_count, drop_remainder=True)
  if cfg.workers:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.workers),
                                                     per_worker_buffer_size=cfg.worker_buffer),
                        worker_init_fn=init_worker)
  return Built(ds, int(cfg.workers))


# `data.workers='auto'` gives each accelerator of the host up to this many workers. One
# worker decodes, crops and tokenises 300-450 samples/s at 224 px from 256-512 px JPEGs
# (one core, bench/data.py, bench/RESULTS.md 2026-11-23 and 2026-12-05), and one H200
# trained ViT-B-32 at 5,622 pairs/s (the fastest recipe; ViT-B-16 needs ~8 workers,
# ViT-L-14 2): ~16 cores at 366 samples/s. The cap keeps the workers' buffers
# (`worker_buffer` batches each, in shared memory) bounded on hosts with hundreds of cores.
WORKERS_PER_ACCELERATOR = 16


def auto_workers(cores: int, accelerators: int) -> int:
  """`data.workers='auto'`: every core of the host but one (the training loop's), at most
  `WORKERS_PER_ACCELERATOR` per accelerator (a CPU backend counts as one), at least one."""
  return max(1, min(cores - 1, WORKERS_PER_ACCELERATOR * accelerators))


def data_workers(cfg: PipelineConfig, sources: Sequence[Source] | None,
                 process_count: int) -> int:
  """The worker processes the pipeline runs in: `cfg.workers` ('auto': `auto_workers`), but
  no more than this process's shards of the smallest source. Each worker reads its own
  slice of the (repeated) shard list, so with fewer shards than workers several workers
  read the same shard in the same order, and their batches come out as copies."""
  if cfg.workers == 'auto':
    accelerators = jax.local_device_count() if jax.default_backend() != 'cpu' else 1
    workers = auto_workers(len(os.sched_getaffinity(0)), accelerators)
  else:
    workers = int(cfg.workers)
  if sources and workers:
    shards = min(len(s.shards) for s in sources) // process_count
    if 0 < shards < workers:
      logging.warning('data.train gives each process %d shard(s) of its smallest source: %d '
                      'data worker(s) instead of %d, as more would read the same shards and '
                      'yield copies of the same batches; write more, smaller shards to use '
                      'more.', shards, shards, workers)
      workers = shards
  return workers


def init_worker(worker_index: int, worker_count: int) -> None:
  """Run in each `mp_prefetch` worker: tells NaFlex batching which worker this is (its
  batches' global indices), and makes the worker exit once the process that started it
  is gone. A trainer killed outright (SIGKILL, the OOM killer) cannot stop its workers, and
  grain's then lived on, holding their memory, until the machine went down."""
  naflex.set_worker(worker_index, worker_count)
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name='exit-with-parent').start()


class Loader:
  """Iterates batches: global `jax.Array`s laid out by `sharding` (the batch sharding of
  the mesh, `clip_jax.sharding.batch_sharding`), or per-process numpy without it.

  Also counts skipped samples by reason (`skipped`), texts cut to their context (`cut`:
  'caption', 'locca_sequence'), LocCa examples that fell back to captioning
  (`locca_fallback`: 'bad_objects') and NaFlex images smaller than a patch on a side
  (`upscaled`: 'smaller_than_patch'). Its state (`get_state`) is a JSON-serialisable dict:
  store it with the checkpoint.
  """

  def __init__(self, cfg: PipelineConfig, sharding: NamedSharding | None = None):
    self.cfg = cfg
    self.dataset, self.workers = build_dataset(cfg, jax.process_index(), jax.process_count())
    self._iterator = iter(self.dataset)
    self.skipped: collections.Counter = collections.Counter()
    self.cut: collections.Counter = collections.Counter()
    self.locca_fallback: collections.Counter = collections.Counter()
    self.upscaled: collections.Counter = collections.Counter()
    self._sharding = sharding
    # On CPU devices a jax array may alias the numpy batch, which lives in the shared memory
    # grain's workers hand it over in: the segment is unlinked only when the last reference
    # goes, and a traceback (Ctrl-C) keeping the loop's arrays until exit then showed as
    # 'leaked shared_memory objects'. There the batch is copied out first (the copy an
    # accelerator's host-to-device transfer makes anyway).
    self._host_memory = sharding is not None and all(
        device.platform == 'cpu' for device in sharding.mesh.devices.flat)

  def next_numpy(self) -> dict[str, np.ndarray]:
    """The next per-process batch as numpy, its counts folded into `skipped` and the
    `COUNTED` counters."""
    batch = next(self._iterator)
    for reason, count in zip(SKIP_REASONS, batch.pop('skipped').sum(0)):
      if count:
        self.skipped[reason] += int(count)
    for (counter, key), count in zip(COUNTED, batch.pop('counted').sum(0)):
      if count:
        getattr(self, counter)[key] += int(count)
    return batch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:  # jax.Array, or numpy without a sharding
    batch = self.next_numpy()
    if self._sharding is None:
      return batch
    if self._host_memory:  # see __init__
      batch = {k: np.array(v) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(self._sharding, v)
            for k, v in batch.items()}

  def get_state(self) -> dict:
    return {'iterator': self._iterator.get_state(), 'skipped': dict(self.skipped),
            **{counter: dict(getattr(self, counter)) for counter in dict(COUNTED)}}

  def set_state(self, state: dict) -> None:
    """Restores a `get_state`; states saved before a `COUNTED` counter existed restart its
    counts at 0."""
    self._iterator.set_state(state['iterator'])
    self.skipped = collections.Counter(state['skipped'])
    for counter in dict(COUNTED):
      setattr(self, counter, collections.Counter(state.get(counter, {})))

  def close(self) -> None:
    close = getattr(self._iterator, 'close', None)
    if close:
      close()
