"""Real img2dataset output: shards fetched from file:// URLs feed the reader and the train
binary as they are (img2dataset's `KEY.jpg` + `KEY.txt` + `KEY.json`, `_stats.json`,
parquet beside them)."""

import csv
import json

import pytest

from clip_jax.data.tar_samples import RawSample, read_samples, read_shard
from tests import helpers

SAMPLES = 40


def _source_images(demo_shard, folder):
  """SAMPLES demo images as files and a CSV of their file:// URLs and captions."""
  folder.mkdir()
  rows = []
  records = (r for r in read_shard(str(demo_shard)) if isinstance(r, RawSample))
  for i, record in zip(range(SAMPLES), records):
    path = folder / f'{i}.jpg'
    path.write_bytes(record.image)
    rows.append({'url': path.as_uri(), 'caption': record.caption})
  table = folder / 'pairs.csv'
  with table.open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['url', 'caption'])
    writer.writeheader()
    writer.writerows(rows)
  return table, [row['caption'] for row in rows]


@pytest.mark.slow
def test_img2dataset_shards_read_and_train(demo_data, tmp_path):
  from img2dataset import download
  table, captions = _source_images(demo_data / 'train' / '00000.tar', tmp_path / 'images')
  shards = tmp_path / 'shards'
  download(url_list=str(table), input_format='csv', url_col='url', caption_col='caption',
           output_format='webdataset', output_folder=str(shards), image_size=64,
           processes_count=1, thread_count=4, number_sample_per_shard=16, enable_wandb=False)
  stats = [json.loads(p.read_text()) for p in shards.glob('*_stats.json')]
  assert sum(s['successes'] for s in stats) == SAMPLES, stats

  samples = list(read_samples(f'{shards}/*.tar'))
  assert sorted(s.caption for s in samples) == sorted(captions)
  assert all(json.loads(s.meta)['status'] == 'success' for s in samples)

  workdir = tmp_path / 'run'
  helpers.run(helpers.train_cmd(workdir, '--config.total_steps=3', '--config.batch_size=8',
                  f'--config.data.train={shards}/*.tar', '--config.eval.zeroshot_shards=',
                  '--config.log_every=1', config=helpers.demo_config(demo_data)), helpers.env(1))
  assert sorted(helpers.metrics(workdir)) == [1, 2, 3]
