"""Bad evaluation input, crafted here, through the real entry points (the evaluate CLI's
`main`/`evaluate` and the trainer's `validate`/periodic evaluation) on a random `tiny`
checkpoint: wrong class names fail before any compute, bad samples are skipped and counted,
results are printed before they are saved and never lost, images are streamed."""

import errno
import io
import json
import logging
import os
import struct
import weakref
import zlib

import jax
import pytest
from etils import epath
from PIL import Image

import clip_jax
from clip_jax import evaluate as evaluate_lib
from clip_jax import sharding
from clip_jax import train as train_lib
from clip_jax.checkpoint import save_model
from clip_jax.cli import EXIT_USER_ERROR
from clip_jax.data.tokenizers import tokenizer_from_spec
from clip_jax.eval import clip_benchmark
from clip_jax.eval import inputs as inputs_lib
from clip_jax.eval.encoder import Encoder
from clip_jax.evaluate import evaluate, main, parse_args
from clip_jax.models.functional import FunctionalModel, get_params
from tests import helpers

CLASSES = 40
STEP = 7


def _png_bomb():
  """A PNG of a few dozen bytes whose header says 20000 x 20000: PIL refuses it on open
  (DecompressionBombError, which is neither an OSError nor a ValueError)."""
  out = io.BytesIO()
  Image.new('RGB', (1, 1)).save(out, 'PNG')
  data = bytearray(out.getvalue())
  data[16:24] = struct.pack('>II', 20000, 20000)
  data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def _sample(key, label, image=None, meta=None, txt=True):
  members = [(f'{key}.jpg', image if image is not None else helpers.jpeg(label, 24, 20))]
  if txt:
    members.append((f'{key}.txt', f'a shape of class {label}'.encode()))
  members.append((f'{key}.json', meta if meta is not None else json.dumps(
      {'caption': f'class {label}', 'label': label}).encode()))
  return members


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A random `tiny` model (32 px) saved as the checkpoint of step STEP."""
  model = clip_jax.create_model('tiny')
  return save_model(tmp_path_factory.mktemp('run') / str(STEP), model.cfg, get_params(model))


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """good/: 40 labelled samples, labels 0..39 over two shards. bad/: 6 good ones and one of
  each bad kind (an undecodable image, a PNG bomb, a .json that is not JSON, one that is a
  JSON list, a label that is no class index)."""
  root = tmp_path_factory.mktemp('shards')
  (root / 'good').mkdir()
  (root / 'bad').mkdir()
  members = [m for i in range(CLASSES) for m in _sample(f'{i:04d}', i)]
  helpers.write_tar(root / 'good' / '0.tar', members[:len(members) // 2])
  helpers.write_tar(root / 'good' / '1.tar', members[len(members) // 2:])
  bad = [m for i in range(6) for m in _sample(f'{i:04d}', i)]
  bad += _sample('notimage', 1, image=b'this is not an image')
  bad += _sample('bomb', 2, image=_png_bomb())
  bad += _sample('notjson', 3, meta=b'{"label": 3,')
  bad += _sample('jsonlist', 4, meta=b'[3]')
  bad += _sample('labelname', 5, meta=b'{"label": "cat", "caption": "a cat"}')
  helpers.write_tar(root / 'bad' / '0.tar', bad)
  (root / 'names40.txt').write_text(''.join(f'class {i}\n' for i in range(CLASSES)))
  (root / 'names3.txt').write_text('class 0\nclass 1\nclass 2\n')
  return root


def _args(checkpoint, *extra):
  return [f'--checkpoint={checkpoint}', '--templates=simple', '--batch_size=8', *extra]


# --- row: class names shorter than the labels ---------------------------------------------

def test_too_few_class_names_fail_before_loading_naming_file_flag_label_and_shard(
    checkpoint, shards, monkeypatch, capsys, tmp_path):
  """3 names for 40 labels scored 0.024 as a result; now one line before the checkpoint is
  read (CLI) and before anything is compiled (the trainer's validate)."""
  def loaded(*args, **kwargs):
    raise AssertionError('the checkpoint was loaded before the class names were checked')

  monkeypatch.setattr(evaluate_lib, 'load_params', loaded)
  names = shards / 'names3.txt'
  with pytest.raises(SystemExit) as exit_info:
    main(_args(checkpoint, f'--zeroshot_shards={shards}/good/{{0..1}}.tar',
               f'--classnames={names}'))
  assert exit_info.value.code == EXIT_USER_ERROR
  lines = capsys.readouterr().err.splitlines()
  assert lines == [f'error: --classnames {names} has 3 class names but label 39 (in '
                   f'{shards}/good/1.tar:0039) needs at least 40: one name per label, in label '
                   'order.']

  config = helpers.synthetic_config(**{'eval.zeroshot_shards': f'{shards}/good/*.tar',
                                       'eval.classnames': str(names)})
  with pytest.raises(ValueError) as error:
    train_lib.validate(config, str(tmp_path / 'work'), 8)
  assert str(error.value) == (
      f'config.eval.classnames={names} has 3 class names but label 39 (in '
      f'{shards}/good/1.tar:0039) needs at least 40: one name per label, in label order.')


# --- row: results printed first, merged, atomic; a read-only folder ------------------------

def test_results_are_merged_per_kind_and_a_read_only_folder_only_costs_the_save(
    checkpoint, shards, monkeypatch, capsys, caplog):
  zero = evaluate(parse_args(_args(checkpoint, f'--zeroshot_shards={shards}/good/*.tar',
                                   f'--classnames={shards}/names40.txt')))
  spec = f'{shards}/good/*.tar'
  first = zero['zeroshot'][spec]
  assert first['step'] == STEP and first['data'] == spec and first['num_images'] == CLASSES
  evaluate(parse_args(_args(checkpoint, f'--retrieval_shards={spec}')))
  results_file = checkpoint / 'eval_results.json'
  saved = json.loads(results_file.read_text())
  assert saved['zeroshot'] == {spec: first}  # the retrieval run kept the zero-shot one
  assert saved['retrieval'][spec]['num_images'] == CLASSES
  assert saved['retrieval'][spec]['step'] == STEP
  assert [p.name for p in checkpoint.iterdir() if p.name.startswith('.')] == []
  capsys.readouterr()

  # The folder turns read-only (EROFS for every write under it).
  before = results_file.read_text()
  path_type = type(epath.Path(checkpoint))
  write_text = path_type.write_text

  def read_only(self, *args, **kwargs):
    if str(self).startswith(str(checkpoint)):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
    return write_text(self, *args, **kwargs)

  load_params = evaluate_lib.load_params
  warned_before_loading = []

  def loading(*args, **kwargs):
    warned_before_loading.append(any('not writable' in r.message for r in caplog.records))
    return load_params(*args, **kwargs)

  monkeypatch.setattr(path_type, 'write_text', read_only)
  monkeypatch.setattr(evaluate_lib, 'load_params', loading)
  with caplog.at_level(logging.WARNING):
    main(_args(checkpoint, f'--retrieval_shards={shards}/good/0.tar'))  # no SystemExit: exit 0
  printed = json.loads(capsys.readouterr().out)
  assert printed['retrieval'][f'{shards}/good/0.tar']['num_images'] == CLASSES // 2
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert warned_before_loading == [True]
  assert warnings == [
      f'{checkpoint} is not writable (Read-only file system): the results will be printed, '
      'not saved.',
      f'Results not saved: {checkpoint} is not writable (Read-only file system); they are '
      'printed above.']
  assert results_file.read_text() == before


# --- row: the CLI streams images -------------------------------------------------------------

def test_cli_zero_shot_and_retrieval_hold_at_most_two_batches_of_decoded_images(
    checkpoint, shards, monkeypatch):
  """Every decoded image is tracked by a weak reference: at most two batches (the one being
  filled, the one being encoded) are ever alive; the old CLI held all 40."""
  alive, most = [], [0]

  def tracking(module):
    decode = module.eval_pixels

    def tracked(*args, **kwargs):
      image = decode(*args, **kwargs)
      alive.append(weakref.ref(image))
      most[0] = max(most[0], sum(ref() is not None for ref in alive))
      return image

    monkeypatch.setattr(module, 'eval_pixels', tracked)

  tracking(inputs_lib)  # every evaluator's rows (zero-shot and retrieval alike)
  spec = f'{shards}/good/*.tar'
  results = evaluate(parse_args(_args(checkpoint, f'--zeroshot_shards={spec}',
                                      f'--classnames={shards}/names40.txt',
                                      f'--retrieval_shards={spec}')))
  assert 0 < most[0] <= 2 * 8
  assert len(alive) == 2 * CLASSES
  assert results['zeroshot'][spec]['num_images'] == results['retrieval'][spec]['num_images'] == 40


# --- row: undecodable images and bad .json are skipped and counted -------------------------

def test_skips_after_the_last_labelled_sample_are_counted(checkpoint, tmp_path):
  """Before: 8 labelled samples filled the last batch of 8 exactly, so the CLI stopped
  reading there and the sample without a caption and the truncated end after them went
  uncounted (the trainer's periodic evaluation, in batches of another size, counted them)."""
  members = [m for i in range(8) for m in _sample(f'{i:04d}', i)]
  members += _sample('nocaption', 1, txt=False, meta=b'{"label": 1}')
  members += [('cut.jpg', helpers.jpeg(9, 64))]
  helpers.write_tar(tmp_path / '0.tar', members)
  data = (tmp_path / '0.tar').read_bytes()
  (tmp_path / '0.tar').write_bytes(data[:data.rindex(b'cut.jpg') + 700])  # inside its image
  (tmp_path / 'names.txt').write_text(''.join(f'class {i}\n' for i in range(8)))
  spec = str(tmp_path / '0.tar')
  results = evaluate(parse_args(_args(checkpoint, f'--zeroshot_shards={spec}',
                                      f'--classnames={tmp_path}/names.txt')))
  assert results['zeroshot'][spec]['num_images'] == 8
  assert results['zeroshot'][spec]['skipped'] == {'truncated_shard': 1, 'missing_caption': 1}


EXPECTED_SKIPS = {'bad_caption': 3, 'bad_image': 1, 'oversized_image': 1}


def test_bad_samples_in_eval_shards_and_folders_are_skipped_counted_and_named(
    checkpoint, shards, tmp_path, caplog):
  spec = f'{shards}/bad/0.tar'
  folder = tmp_path / 'folder'
  for label in range(3):
    (folder / f'class_{label}').mkdir(parents=True)
    (folder / f'class_{label}' / 'good.jpg').write_bytes(helpers.jpeg(label, 24, 20))
  (folder / 'class_1' / 'broken.jpg').write_bytes(b'\xff\xd8\xff truncated')
  with caplog.at_level(logging.WARNING):
    results = evaluate(parse_args(_args(checkpoint, f'--zeroshot_shards={spec}',
                                        f'--classnames={shards}/names40.txt',
                                        f'--retrieval_shards={spec}')))
    folder_result = evaluate(parse_args(_args(checkpoint, f'--image_folder={folder}')))
  shards_result = results['zeroshot'][spec]
  assert shards_result['skipped'] == EXPECTED_SKIPS and shards_result['num_images'] == 6
  # Retrieval reads the captions of the .txt: the label that is no class index is no harm.
  assert results['retrieval'][spec]['skipped'] == {'bad_caption': 2, 'bad_image': 1,
                                                   'oversized_image': 1}
  assert results['retrieval'][spec]['num_images'] == 7
  assert folder_result['zeroshot'][str(folder)]['skipped'] == {'bad_image': 1}
  assert folder_result['zeroshot'][str(folder)]['num_images'] == 3
  saved = json.loads((checkpoint / 'eval_results.json').read_text())
  assert saved['zeroshot'][spec]['skipped'] == EXPECTED_SKIPS
  text = caplog.text
  for key in ('notimage', 'bomb', 'notjson', 'jsonlist', 'labelname'):
    assert f'{spec}:{key}' in text, key
  assert str(folder / 'class_1' / 'broken.jpg') in text


def test_periodic_zero_shot_and_clip_benchmark_skip_and_count_bad_samples(checkpoint, shards,
                                                                           tmp_path):
  """The trainer's evaluation went down at its first periodic evaluation on one bad image."""
  config = helpers.synthetic_config(**{'eval.zeroshot_shards': f'{shards}/bad/0.tar',
                                       'eval.classnames': str(shards / 'names40.txt')})
  cfg = clip_jax.create_model('tiny').cfg
  model, mesh = FunctionalModel.create(cfg), sharding.make_mesh({'data': -1})
  evaluator = train_lib.ZeroShotEval(config, model, mesh, tokenizer_from_spec(
      cfg.text.tokenizer, cfg.text.context_length))
  assert evaluator.total == 8  # labelled samples: the 6 good ones and the 2 bad images
  params = jax.device_put(get_params(clip_jax.create_model('tiny')))
  result = evaluator(params)
  assert {k: v for k, v in result.items() if 'skipped' in k} == {
      f'zeroshot_skipped/{k}': n for k, n in EXPECTED_SKIPS.items()}

  root = tmp_path / 'wds_shapes'
  (root / 'test').mkdir(parents=True)
  helpers.write_tar(root / 'test' / '0.tar', [
      ('a.webp', helpers.jpeg(0, 24, 20)), ('a.cls', b'0'),
      ('b.webp', b'RIFF not webp'), ('b.cls', b'1'),
      ('c.webp', helpers.jpeg(2, 24, 20)), ('c.cls', b'two')])
  (root / 'test' / 'nshards.txt').write_text('1\n')
  (root / 'classnames.txt').write_text('zero\none\ntwo\n')
  (root / 'zeroshot_classification_templates.txt').write_text('a photo of a {c}.\n')
  dataset = clip_benchmark.open_dataset(str(root))
  metrics = evaluate_lib.benchmark_metrics(Encoder(model, params, mesh, 8),
                                           evaluator.tokenizer, dataset)
  assert metrics['skipped'] == {'bad_caption': 1, 'bad_image': 1}
  assert metrics['num_images'] == 1
