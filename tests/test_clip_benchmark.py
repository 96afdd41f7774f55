"""CLIP_benchmark datasets: the evaluator's metrics against the real `clip_benchmark eval` CLI.

The demo eval split (400 images, 40 classes) is written in CLIP_benchmark's webdataset
layout twice: as a classification set (.webp + .cls, two shards) and as a retrieval set
(.jpg + two captions per image in .txt; 220 images). The images are upscaled to a
non-square 160x136, so both evaluators resize and center-crop, and a reduced-scale JPEG
decode (PIL's draft) would show: it moves the retrieval recalls by up to 0.9 point here.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from clip_jax.eval import clip_benchmark, skips, zeroshot
from clip_jax.eval.inputs import ImageInput
from clip_jax.evaluate import evaluate, parse_args
from clip_jax.export import export
from clip_jax.models.config import PreprocessConfig

SIZE = (160, 136)
PER_SHARD = 250
TEMPLATES = ('a photo of a {c}.', 'a {c}.')
TOLERANCE = 0.005  # half a point


def _demo_samples(demo_data):
  """(key, PIL image, caption, label) of the demo eval split, in shard order."""
  for shard in sorted((demo_data / 'eval').glob('*.tar')):
    with tarfile.open(shard) as tar:
      for member in tar.getmembers():
        if member.name.endswith('.json'):
          key = member.name[:-5]
          meta = json.loads(tar.extractfile(member).read())
          image = Image.open(io.BytesIO(tar.extractfile(f'{key}.jpg').read())).convert('RGB')
          yield key, image.resize(SIZE, Image.BICUBIC), meta['caption'], meta['label']


def _write_shards(split_dir, samples):
  """CLIP_benchmark's `SPLIT/{i}.tar` and `SPLIT/nshards.txt` from (key, {ext: bytes})."""
  split_dir.mkdir(parents=True)
  shards = [samples[i:i + PER_SHARD] for i in range(0, len(samples), PER_SHARD)]
  for index, shard in enumerate(shards):
    with tarfile.open(split_dir / f'{index}.tar', 'w') as tar:
      for key, files in shard:
        for ext, data in files.items():
          info = tarfile.TarInfo(f'{key}.{ext}')
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  (split_dir / 'nshards.txt').write_text(f'{len(shards)}\n')


def _encoded(image, fmt):
  out = io.BytesIO()
  image.save(out, fmt, quality=90)
  return out.getvalue()


@pytest.fixture(scope='module')
def benchmark_root(demo_data, tmp_path_factory):
  """ROOT/shapes (classification, webp) and ROOT/flickr30k (retrieval, jpg).

  The retrieval set is named like clip_benchmark's flickr30k so that its CLI picks the
  retrieval task by itself. It keeps one image per distinct caption (the demo repeats bare
  ones like 'white triangle'): equal captions of two images tie, and clip_benchmark's topk
  breaks ties arbitrarily where we count the tie as found.
  """
  root = tmp_path_factory.mktemp('clip_benchmark')
  names = (demo_data / 'classnames.txt').read_text().splitlines()
  samples = list(_demo_samples(demo_data))
  shapes = root / 'shapes'
  _write_shards(shapes / 'test', [(key, {'webp': _encoded(image, 'WEBP'), 'cls': b'%d' % label})
                                  for key, image, _, label in samples])
  (shapes / 'classnames.txt').write_text('\n'.join(names) + '\n')
  (shapes / 'zeroshot_classification_templates.txt').write_text('\n'.join(TEMPLATES) + '\n')
  flickr = root / 'flickr30k'
  first_of_caption = {}
  for key, image, caption, _ in samples:
    first_of_caption.setdefault(caption, (key, image))
  _write_shards(flickr / 'test', [
      (key, {'jpg': _encoded(image, 'JPEG'), 'txt': f'{caption}\na picture of {caption}'.encode()})
      for caption, (key, image) in first_of_caption.items()])
  (flickr / 'dataset_type.txt').write_text('retrieval\n')
  return root


def _run(command, env=None):
  done = subprocess.run(command, check=False, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, f'{command[:4]} failed:\n{done.stderr[-3000:]}'


@pytest.fixture(scope='module')
def numpy_before_2_4(tmp_path_factory):
  """A folder holding only numpy<2.4, put first on the CLI's PYTHONPATH.

  clip_benchmark 1.6.2's classification accuracy calls float() on a one-element array
  (metrics/zeroshot_classification.py:82), deprecated since numpy 1.25 and a TypeError
  since 2.4 (LAION-AI/CLIP_benchmark#147, open). Everything else (torch, open_clip,
  webdataset, sklearn) is the shared install: numpy has no dependencies and those wheels
  are built for numpy 2.x, so one numpy wheel (~3 s) replaces a venv with its own torch.
  """
  target = tmp_path_factory.mktemp('numpy_before_2_4')
  _run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--target', str(target),
        'numpy>=2,<2.4'])
  return target


@pytest.fixture(scope='module')
def reference(trained_demo, benchmark_root, numpy_before_2_4, tmp_path_factory):
  """clip_benchmark's metrics of both datasets: its CLI on the exported model, fp32, CPU."""
  out = tmp_path_factory.mktemp('clip_benchmark_out')
  model = export(str(trained_demo), str(out / 'exported'))
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONPATH=str(numpy_before_2_4))
  # `python -m clip_benchmark.cli` is the `clip_benchmark` console script, found without PATH.
  _run([sys.executable, '-m', 'clip_benchmark.cli', 'eval',
        '--dataset', 'wds/shapes', 'wds/flickr30k',
        '--dataset_root', f'{benchmark_root}/{{dataset}}', '--split', 'test',
        '--model_type', 'open_clip', '--model', f'local-dir:{model}', '--pretrained', 'exported',
        '--no_amp', '--num_workers', '0', '--batch_size', '100', '--recall_k', '1', '5',
        '--quiet', '--output', f'{out}/{{dataset}}.json'], env=env)
  return {name: json.loads((out / f'{name}.json').read_text())['metrics']
          for name in ('shapes', 'flickr30k')}


@pytest.mark.slow
def test_metrics_agree_with_the_clip_benchmark_cli(trained_demo, benchmark_root, reference):
  roots = [str(benchmark_root / 'shapes'), str(benchmark_root / 'flickr30k')]
  results = evaluate(parse_args(['--workdir', str(trained_demo), '--clip_benchmark', *roots,
                                 '--batch_size', '64']))['clip_benchmark']
  shapes, flickr = results[roots[0]], results[roots[1]]
  assert shapes['num_images'] == 400 and shapes['num_classes'] == 40
  assert shapes['acc1'] > 3 / 40  # trained: well above chance
  for metric in ('acc1', 'acc5', 'mean_per_class_recall'):
    ours, theirs = shapes[metric], reference['shapes'][metric]
    assert abs(ours - theirs) <= TOLERANCE, f'{metric}: ours {ours}, clip_benchmark {theirs}'
  assert flickr['num_images'] >= 200 and flickr['num_texts'] == 2 * flickr['num_images']
  for k in (1, 5):
    for direction in ('image', 'text'):
      metric = f'{direction}_retrieval_recall@{k}'
      ours, theirs = flickr[metric], reference['flickr30k'][metric]
      assert abs(ours - theirs) <= TOLERANCE, f'{metric}: ours {ours}, clip_benchmark {theirs}'


def test_missing_files_name_their_path(tmp_path):
  """Checked before the checkpoint is loaded (here there is none)."""
  root = tmp_path / 'cars'
  split = root / 'test'
  split.mkdir(parents=True)

  def fails(error, message):
    with pytest.raises(error, match=re.escape(message)):
      evaluate(parse_args(['--checkpoint', str(tmp_path / 'absent'), '--clip_benchmark',
                           str(root)]))

  fails(FileNotFoundError, f'{split / "nshards.txt"} does not exist')
  (split / 'nshards.txt').write_text('2\n')
  _write_shards(tmp_path / 'shards', [('a', {'webp': b'x', 'cls': b'0'})])
  (tmp_path / 'shards' / '0.tar').rename(split / '0.tar')
  fails(FileNotFoundError, f'do not exist: {split / "1.tar"}')
  (split / 'nshards.txt').write_text('1\n')
  fails(FileNotFoundError, f'class names file {root / "classnames.txt"} does not exist')
  (root / 'classnames.txt').write_text('sedan\n')
  templates = root / 'zeroshot_classification_templates.txt'
  fails(FileNotFoundError, f'templates file {templates} does not exist')
  templates.write_text('a photo of a car.\n')
  fails(ValueError, f'Every prompt template in {templates} must contain')
  (root / 'dataset_type.txt').write_text('multilabel\n')
  fails(ValueError, f"{root / 'dataset_type.txt'} says 'multilabel'")


def test_samples_without_image_or_label_are_skipped_counted_and_named(tmp_path, caplog):
  for files, kind, message in (({'cls': b'1'}, 'missing_image', 'no webp, png, jpg, jpeg'),
                               ({'png': b'x'}, 'missing_caption', 'no label (.cls)'),
                               ({'png': b'x', 'cls': b'cat'}, 'bad_caption', 'is not an integer'),
                               ({'png': b'x', 'cls': b'1'}, 'bad_image', 'UnidentifiedImageError')):
    _write_shards(tmp_path / 'test', [('k7', files)])
    dataset = clip_benchmark.Dataset(str(tmp_path), 'classification',
                                     (str(tmp_path / 'test' / '0.tar'),))
    skipped = skips.Skipped()
    caplog.clear()
    assert list(clip_benchmark.examples(dataset, ImageInput(64, PreprocessConfig()),
                                        skipped)) == []
    assert skipped.as_dict() == {kind: 1}
    assert f'{tmp_path / "test" / "0.tar"}:k7 ({kind})' in caplog.text and message in caplog.text
    shutil.rmtree(tmp_path / 'test')


def test_mean_per_class_recall_is_sklearn_balanced_accuracy():
  rng = np.random.default_rng(0)
  labels = rng.choice(7, size=300, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
  logits = rng.normal(size=(300, 9)) + 2 * np.eye(9)[labels]  # predictions include classes 7, 8
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "y_pred contains classes not in y_true"
    expected = balanced_accuracy_score(labels, logits.argmax(1))
  assert zeroshot.accuracy(logits, labels)['mean_per_class_recall'] == pytest.approx(expected)
  few = clip_benchmark.classification_metrics({**zeroshot.accuracy(logits[:, :3], labels % 3),
                                               'num_images': 300, 'num_classes': 3})
  assert few['acc5'] is None  # as clip_benchmark: no top-5 below five classes
