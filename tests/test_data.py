"""Input pipeline: specs, tar grouping, coverage across processes, exact resume, bad data."""

import json
import logging
import random
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import clip_jax
from clip_jax.data import tar_samples
from clip_jax.data.make_demo import CLASSNAMES, make_demo
from clip_jax.data.make_shards import make_shards
from clip_jax.data.pipeline import (
  WORKERS_PER_ACCELERATOR,
  Loader,
  PipelineConfig,
  auto_workers,
  build_dataset,
)
from clip_jax.data.shard_writer import ShardWriter
from clip_jax.data.specs import expand_braces, parse_spec
from clip_jax.data.tar_samples import RawSample, Skip, read_shard, split_key
from clip_jax.data.transforms import decode_image, random_resized_crop
from tests import helpers

TOKENIZER = clip_jax.get_tokenizer('clip', context_length=16)


def _name(i):
  """A caption per index that the CLIP tokenizer decodes back verbatim (letters only)."""
  return 'sample ' + chr(97 + i // 26) + chr(97 + i % 26)


def _write_shards(root, name, n_shards, per_shard, caption=_name):
  writer = ShardWriter(root / name, per_shard)
  for i in range(n_shards * per_shard):
    writer.write(helpers.jpeg(i % 7), 'jpg', caption(i))
  writer.close()
  return str(root / name / f'{{00000..{n_shards - 1:05d}}}.tar')


def _config(spec, **kw):
  defaults = dict(global_batch_size=4, image_size=16, tokenizer=TOKENIZER, train=spec,
                  shuffle_window=8, cycle_length=2, workers=0)
  return PipelineConfig(**{**defaults, **kw})


def _captions(batch):
  return [TOKENIZER.decode(row) for row in batch['text']]


# --- specs -------------------------------------------------------------------------------

def test_brace_expansion_keeps_padding_and_lists():
  assert expand_braces('d/{008..011}.tar') == ['d/008.tar', 'd/009.tar', 'd/010.tar', 'd/011.tar']
  assert expand_braces('{a,b}/{0..1}') == ['a/0', 'a/1', 'b/0', 'b/1']
  assert expand_braces('plain.tar') == ['plain.tar']


def test_mixture_spec_and_weights(tmp_path):
  a = _write_shards(tmp_path, 'a', 2, 2)
  b = _write_shards(tmp_path, 'b', 3, 2)
  sources = parse_spec(f'{a}::{b}', '1::2.5')
  assert [len(s.shards) for s in sources] == [2, 3] and [s.weight for s in sources] == [1, 2.5]
  with pytest.raises(ValueError, match='must give 2 positive weights'):
    parse_spec(f'{a}::{b}', '1')
  with pytest.raises(FileNotFoundError, match='nothing/{0..3}.tar'):
    parse_spec(f'{a}::{tmp_path}/nothing/{{0..3}}.tar')


def test_glob_specs(tmp_path):
  _write_shards(tmp_path, 'g', 3, 1)
  assert len(parse_spec(str(tmp_path / 'g' / '*.tar'))[0].shards) == 3


# --- tar reading -------------------------------------------------------------------------

def test_webdataset_key_rules():
  assert split_key('dir/000123.seg.JPG') == ('dir/000123', 'seg.jpg')
  assert split_key('000123.txt') == ('000123', 'txt')


def test_members_are_grouped_by_key_with_caption_from_txt_or_json(tmp_path):
  image = helpers.jpeg(0)
  helpers.write_tar(tmp_path / 's.tar', [
      ('x/a.jpg', image), ('x/a.txt', b' cat '), ('x/a.json', b'{}'),
      ('b.png', image), ('b.json', json.dumps({'caption': 'dog'}).encode()),
      ('c.webp', image), ('c.json', json.dumps({'alt': 'cow'}).encode())])
  records = list(read_shard(str(tmp_path / 's.tar'), caption_key='caption'))
  assert records[0] == RawSample('x/a', str(tmp_path / 's.tar'), image, 'cat', b'{}')
  assert records[1].caption == 'dog' and records[1].key == 'b'
  assert isinstance(records[2], Skip) and records[2].reason == 'missing_caption'
  assert list(read_shard(str(tmp_path / 's.tar'), caption_key='alt'))[2].caption == 'cow'


# --- coverage, mixtures, resume ----------------------------------------------------------

@pytest.mark.parametrize('processes', [2, 4])
def test_processes_read_disjoint_and_complete_shares(tmp_path, processes):
  spec = _write_shards(tmp_path, 'cov', 8, 4)
  seen = []
  for index in range(processes):
    cfg = _config(spec, global_batch_size=4 * processes, shuffle_window=4)
    iterator = iter(build_dataset(cfg, index, processes).dataset)
    per_process = 32 // processes
    captions = [c for _ in range(per_process // 4) for c in _captions(next(iterator))]
    assert len(set(captions)) == per_process  # no repeats inside the first epoch
    seen.append(set(captions))
  assert set().union(*seen) == {_name(i) for i in range(32)}
  assert sum(len(s) for s in seen) == 32  # disjoint


def test_fewer_shards_than_processes_is_a_clear_error(tmp_path):
  spec = _write_shards(tmp_path, 'few', 2, 2)
  with pytest.raises(ValueError, match='fewer than the 4 processes'):
    build_dataset(_config(spec, global_batch_size=8), 0, 4)


def test_fewer_shards_than_workers_yields_no_copies(tmp_path, caplog):
  """Before: with one shard and 3 workers each worker read the shard in the same order, so
  every batch came three times in a row; and 4 copies of the shard open in one worker put
  each sample beside itself in a batch. Now: one worker, the shard open once, said so."""
  spec = _write_shards(tmp_path, 'w', 1, 8)
  with caplog.at_level(logging.WARNING):
    loader = Loader(_config(spec, workers=3, global_batch_size=2, cycle_length=4,
                            shuffle_window=1))
  try:
    batches = [_captions(next(loader)) for _ in range(8)]
  finally:
    loader.close()
  assert loader.workers == 1
  assert '1 shard(s) of its smallest source: 1 data worker(s) instead of 3' in caplog.text
  for one_pass in (batches[:4], batches[4:]):  # two passes, every sample once in each
    assert sorted(c for batch in one_pass for c in batch) == [_name(i) for i in range(8)]


def test_auto_workers_follow_the_cores_and_accelerators():
  assert auto_workers(cores=2, accelerators=1) == 1      # this CI machine
  assert auto_workers(cores=1, accelerators=1) == 1      # never none
  assert auto_workers(cores=32, accelerators=1) == WORKERS_PER_ACCELERATOR
  assert auto_workers(cores=224, accelerators=8) == 8 * WORKERS_PER_ACCELERATOR  # 8x H100
  assert auto_workers(cores=64, accelerators=8) == 63
  assert auto_workers(cores=8, accelerators=0) == 1  # never none, whatever the count
  with pytest.raises(ValueError, match='config.data.workers'):
    PipelineConfig(global_batch_size=1, image_size=16, tokenizer=TOKENIZER, workers='eight')


def test_mixture_proportions_follow_the_weights(tmp_path):
  a = _write_shards(tmp_path, 'ma', 2, 10, caption=lambda i: 'alpha')
  b = _write_shards(tmp_path, 'mb', 2, 10, caption=lambda i: 'beta')
  loader = Loader(_config(f'{a}::{b}', weights='1::3', global_batch_size=20, shuffle_window=20))
  captions = [c for _ in range(20) for c in _captions(next(loader))]
  share = captions.count('beta') / len(captions)
  # 400 draws at p = 0.75: 4 standard deviations is +-0.087
  assert abs(share - 0.75) < 0.087


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path, workers):
  spec = _write_shards(tmp_path, 'r', 5, 7)  # uneven sizes across epochs and cycles
  cfg = _config(spec, workers=workers, global_batch_size=6, shuffle_window=5, cycle_length=3)
  reference = Loader(cfg)
  expected = [next(reference) for _ in range(14)]
  reference.close()
  for stop in random.Random(workers).sample(range(1, 12), 3):
    first = Loader(cfg)
    for _ in range(stop):
      next(first)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    first.close()
    resumed = Loader(cfg)
    resumed.set_state(state)
    for want in expected[stop:stop + 3]:
      got = next(resumed)
      np.testing.assert_array_equal(got['text'], want['text'])
      np.testing.assert_array_equal(got['image'], want['image'])
    resumed.close()


def test_loader_assembles_global_arrays_on_the_mesh(tmp_path):
  import jax
  from jax.sharding import Mesh

  from clip_jax.sharding import batch_sharding
  spec = _write_shards(tmp_path, 'm', 2, 8)
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
  batch = next(Loader(_config(spec, global_batch_size=8), batch_sharding(mesh)))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert len(batch['text'].sharding.device_set) == 8
  assert batch['text'].addressable_shards[0].data.shape == (1, 16)


def test_synthetic_source_is_deterministic_and_well_formed():
  cfg = _config('', kind='synthetic', global_batch_size=4, vocab_size=1000)
  a, b = next(Loader(cfg)), next(Loader(cfg))
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image'].shape == (4, 16, 16, 3) and a['text'].shape == (4, 16)
  assert all(row.max() == 999 for row in a['text'])  # every row has an EOT-like max id


# --- bad data ----------------------------------------------------------------------------

def _bad_data_shards(tmp_path, monkeypatch):
  good = helpers.jpeg(1)
  shards = tmp_path / 'bad'
  shards.mkdir()
  helpers.write_tar(shards / '00000.tar', [
      ('ok1.jpg', good), ('ok1.txt', b'good one'),
      ('corrupt.jpg', b'\xff\xd8 not really a jpeg'), ('corrupt.txt', b'x'),
      ('trunc.jpg', good[:len(good) // 2]), ('trunc.txt', b'x'),
      ('zero.jpg', b''), ('zero.txt', b'x'),
      ('nocap.jpg', good),
      ('latin1.jpg', good), ('latin1.txt', 'caf\xe9'.encode('latin-1')),
      ('two.jpg', good), ('two.png', good), ('two.txt', b'x'),
      ('big.jpg', b'x' * 200_000), ('big.txt', b'x'),
      ('ok2.jpg', good), ('ok2.txt', b'good two')])
  (shards / '00001.tar').write_bytes(b'')  # empty shard
  helpers.write_tar(shards / '00002.tar', [('ok3.jpg', good), ('ok3.txt', b'good three'),
                                           ('ok4.jpg', good), ('ok4.txt', b'good four')])
  with tarfile.open(shards / '00002.tar') as tar:
    cut = tar.getmember('ok4.jpg').offset_data + 100
  data = (shards / '00002.tar').read_bytes()
  (shards / '00002.tar').write_bytes(data[:cut])  # truncated inside ok4.jpg
  monkeypatch.setattr(tar_samples, 'MAX_MEMBER_BYTES', 100_000)
  return str(shards / '{00000..00003}.tar')  # 00003.tar is missing


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path, monkeypatch):
  spec = _bad_data_shards(tmp_path, monkeypatch)
  # One epoch, all four shards open at once: the longest shard (ending in a good sample)
  # finishes last, so every skip of the epoch is counted by the time its 3 goods arrive.
  loader = Loader(_config(spec, global_batch_size=3, shuffle_window=1, cycle_length=4,
                          num_epochs=1))
  captions = _captions(next(loader))
  assert sorted(captions) == ['good one', 'good three', 'good two']
  with pytest.raises(StopIteration):
    next(loader)
  assert dict(loader.skipped) == {
      'bad_image': 2, 'empty_image': 1, 'missing_caption': 1, 'bad_caption': 1,
      'multiple_images': 1, 'oversized_member': 1, 'empty_shard': 1, 'truncated_shard': 1,
      'unreadable_shard': 1}


@pytest.mark.parametrize('captioned, reason', [(False, 'missing_caption'), (True, 'bad_image')])
def test_all_bad_data_fails_naming_the_spec(tmp_path, captioned, reason):
  shards = tmp_path / 'allbad'
  shards.mkdir()
  caption = [('{}.txt', b'a caption')] if captioned else []
  helpers.write_tar(shards / '0.tar', [(name.format(i), data) for i in range(5)
                                       for name, data in [('{}.jpg', b'garbage')] + caption])
  spec = str(shards / '0.tar')
  # The whole message: spec, counts by reason, the last bad sample's reason and shard:key
  # (any of the shuffled keys 0-4); grain may append a note on a new line.
  expected = re.escape(f"Data spec '{spec}': the first 4 samples are all bad "
                       f"({{'{reason}': 4}}, last: {reason} at {spec}:") + r'[0-4]\)\.(\n|$)'
  with pytest.raises(ValueError, match=expected):
    next(Loader(_config(spec, max_bad_before_first_good=4, global_batch_size=1)))


# --- images ------------------------------------------------------------------------------

def test_jpeg_decodes_at_reduced_size_but_never_below_target():
  data = helpers.jpeg(0, 512)
  image = decode_image(data, 64)
  assert 64 <= min(image.size) <= 128  # libjpeg scaled by 1/4 or 1/8 at decode time
  crop = random_resized_crop(image, 32, np.random.default_rng(0))
  assert crop.size == (32, 32)


# --- tools -------------------------------------------------------------------------------

def test_make_shards_round_trip_from_folder_csv_and_parquet(tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  for i in range(5):
    (photos / f'p{i}.jpg').write_bytes(helpers.jpeg(i))
    if i != 3:
      (photos / f'p{i}.txt').write_text(f'photo number {i}')
  result = subprocess.run([sys.executable, '-m', 'clip_jax.data.make_shards', '--input',
                           str(photos), '--output', str(tmp_path / 'out'),
                           '--samples_per_shard', '3'], capture_output=True, text=True, check=True)
  assert 'Wrote 4 samples in 2 shards' in result.stdout
  stats = json.loads((tmp_path / 'out' / '_stats.json').read_text())
  assert stats['skipped'] == {'missing_caption': 1}
  records = [r for s in ('00000', '00001') for r in read_shard(str(tmp_path / 'out' / f'{s}.tar'))]
  assert [r.caption for r in records] == ['photo number 0', 'photo number 1', 'photo number 2',
                                          'photo number 4']
  assert records[3].image == (photos / 'p4.jpg').read_bytes()

  (tmp_path / 'pairs.csv').write_text('filepath,caption\nphotos/p0.jpg,first\nphotos/p9.jpg,gone\n')
  stats = make_shards(str(tmp_path / 'pairs.csv'), str(tmp_path / 'csv_out'))
  assert stats['count'] == 1 and stats['skipped'] == {'missing_image': 1}

  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'path': [str(photos / 'p1.jpg')], 'text': ['second']}),
                 str(tmp_path / 'pairs.parquet'))
  make_shards(str(tmp_path / 'pairs.parquet'), str(tmp_path / 'pq_out'), path_column='path',
              caption_column='text')
  assert next(read_shard(str(tmp_path / 'pq_out' / '00000.tar'))).caption == 'second'
  with pytest.raises(ValueError, match="needs columns 'filepath' \\(--path_column\\)"):
    make_shards(str(tmp_path / 'pairs.parquet'), str(tmp_path / 'bad_out'))


def test_make_demo_is_deterministic_and_labelled(tmp_path):
  import time
  make_demo(str(tmp_path / 'a'), train_samples=30, eval_samples=10, samples_per_shard=20)
  time.sleep(1.1)  # a member mtime taken from the clock would now differ
  make_demo(str(tmp_path / 'b'), train_samples=30, eval_samples=10, samples_per_shard=20)
  files = {run: sorted(p.relative_to(tmp_path / run).as_posix()
                       for p in (tmp_path / run).rglob('*') if p.is_file())
           for run in ('a', 'b')}
  assert files['a'] == files['b']
  assert {'train/00000.tar', 'train/00001.tar', 'eval/00000.tar', 'train/_stats.json',
          'eval/_stats.json', 'classnames.txt'} <= set(files['a'])
  for name in files['a']:  # every file, byte for byte
    assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes(), name
  assert (tmp_path / 'a' / 'classnames.txt').read_text().split('\n')[:-1] == CLASSNAMES
  with tarfile.open(tmp_path / 'a' / 'eval' / '00000.tar') as tar:
    meta = json.loads(tar.extractfile('000000000.json').read())
    caption = tar.extractfile('000000000.txt').read().decode()
  colour, shape = CLASSNAMES[meta['label']].split()
  assert colour in caption and shape in caption and ' and ' not in caption
