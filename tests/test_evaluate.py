"""The evaluator: zero-shot (folder, shards, TFDS), retrieval, and OpenCLIP agreement."""

import io
import json
import logging
import random
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_jax.eval import zeroshot
from clip_jax.eval.retrieval import recall_at_k
from clip_jax.evaluate import evaluate, parse_args
from clip_jax.export import export

TEMPLATES = ('a photo of a {}.', 'a {}.')


def _write_class_folders(demo_data, root, folder_name):
  """The demo eval split's images in one folder per class; returns the label-order names."""
  names = (demo_data / 'classnames.txt').read_text().split('\n')[:-1]
  with tarfile.open(demo_data / 'eval' / '00000.tar') as tar:
    for member in tar.getmembers():
      if member.name.endswith('.json'):
        key = member.name[:-5]
        label = json.loads(tar.extractfile(member).read())['label']
        folder = root / folder_name(label, names[label])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'{key}.jpg').write_bytes(tar.extractfile(f'{key}.jpg').read())
  return names


@pytest.fixture(scope='module')
def eval_folder(demo_data, tmp_path_factory):
  """The demo eval split as an image folder: one subfolder per class, named by class."""
  root = tmp_path_factory.mktemp('folder')
  names = _write_class_folders(demo_data, root,
                               lambda label, name: f'{label:02d}_{name.replace(" ", "_")}')
  (root.parent / 'classnames_sorted.txt').write_text(
      '\n'.join(names[int(p.name[:2])] for p in sorted(root.iterdir())) + '\n')
  return root


@pytest.fixture(scope='module')
def named_folder(demo_data, tmp_path_factory):
  """The demo eval split with one folder per class named by its class ('red_circle').

  Sorted folder order is not label order, so demo_data/classnames.txt (label order) lists
  the folder names (`_` as space) in another order.
  """
  root = tmp_path_factory.mktemp('named') / 'images'
  names = _write_class_folders(demo_data, root, lambda label, name: name.replace(' ', '_'))
  folders = sorted(p.name for p in root.iterdir())
  assert [f.replace('_', ' ') for f in folders] != names  # really another order
  return root


@pytest.fixture(scope='module')
def templates_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('templates') / 'templates.txt'
  path.write_text('\n'.join(TEMPLATES) + '\n')
  return path


@pytest.mark.slow
def test_folder_zero_shot_agrees_with_open_clip(trained_demo, eval_folder, templates_file,
                                                tmp_path):
  args = parse_args(['--workdir', str(trained_demo), '--image_folder', str(eval_folder),
                     '--classnames', str(eval_folder.parent / 'classnames_sorted.txt'),
                     '--templates', str(templates_file), '--batch_size', '64'])
  ours = evaluate(args)['zeroshot'][str(eval_folder)]
  assert ours['num_images'] == 300 and ours['num_classes'] == 40
  assert ours['top1'] > 3 / 40  # trained: well above chance

  # OpenCLIP's own zero-shot path on the exported weights and the same image files.
  out = export(str(trained_demo), str(tmp_path / 'open_clip'))
  model, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{out}')
  tokenizer = open_clip.get_tokenizer(f'local-dir:{out}')
  classnames = (eval_folder.parent / 'classnames_sorted.txt').read_text().split('\n')[:-1]
  with torch.no_grad():
    classifier = open_clip.build_zero_shot_classifier(model.eval(), tokenizer, classnames,
                                                      TEMPLATES)
    paths = sorted(eval_folder.glob('*/*.jpg'))
    labels = torch.tensor([sorted(eval_folder.iterdir()).index(p.parent) for p in paths])
    images = torch.stack([preprocess(Image.open(p)) for p in paths])
    logits = model.encode_image(images, normalize=True) @ classifier
  top1 = float((logits.argmax(1) == labels).float().mean())
  assert abs(top1 - ours['top1']) <= 1 / 300  # at most one borderline image may flip


@pytest.mark.slow
def test_shards_tfds_and_retrieval_and_summary_file(trained_demo, demo_data, tmp_path):
  retrieval = tmp_path / 'retrieval'
  retrieval.mkdir()
  with tarfile.open(demo_data / 'eval' / '00000.tar') as source, \
       tarfile.open(retrieval / '00000.tar', 'w') as target:
    for member in source.getmembers()[:60]:
      data = source.extractfile(member).read()
      if member.name.endswith('.json'):
        meta = json.loads(data)
        meta['captions'] = [meta['caption'], meta['caption'].upper()]
        data = json.dumps(meta).encode()
      member.size = len(data)
      target.addfile(member, io.BytesIO(data))
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    results = evaluate(parse_args([
        '--workdir', str(trained_demo), '--zeroshot_shards', str(demo_data / 'eval' / '00000.tar'),
        '--classnames', str(demo_data / 'classnames.txt'), '--templates', 'generic',
        '--tfds', 'cifar10', '--tfds_split', 'test',
        '--retrieval_shards', str(retrieval / '00000.tar'), '--batch_size', '32']))
  shards = results['zeroshot'][str(demo_data / 'eval' / '00000.tar')]
  assert shards['num_images'] == 300 and shards['step'] == 120
  assert shards['top1'] > 3 / 40
  cifar = results['zeroshot']['tfds:cifar10/test']
  assert cifar['num_images'] == 12 and cifar['num_classes'] == 10
  r = results['retrieval'][str(retrieval / '00000.tar')]
  assert r['num_images'] == 20 and r['num_texts'] == 40 and r['skipped'] == {}
  assert r['image_to_text_R@10'] >= r['image_to_text_R@5'] >= r['image_to_text_R@1'] > 0.1
  summary = json.loads((trained_demo / 'checkpoints' / '120' / 'eval_results.json').read_text())
  assert summary['retrieval'][str(retrieval / '00000.tar')] == r


def test_recall_at_k_counts_any_matching_caption():
  images = np.eye(3)
  texts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0.9, 0.1, 0]])
  owners = np.array([0, 1, 2, 0])  # text 1 belongs to image 1 but looks like image 2
  r = recall_at_k(images, texts / np.linalg.norm(texts, axis=1, keepdims=True), owners)
  assert r['image_to_text_R@1'] == pytest.approx(1 / 3)  # only image 0 finds its caption first
  assert r['text_to_image_R@1'] == pytest.approx(2 / 4)
  assert r['text_to_image_R@5'] == 1.0


def test_recall_at_k_gives_ties_to_the_true_match_in_both_directions():
  """Two images captioned alike (the demo repeats captions): each caption ties with the other
  image's, and each image with the other. A tie counts for the true match, whatever order the
  texts come in (a sort would rank one of each tied pair second)."""
  images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
    r = recall_at_k(images, texts[order], np.array(order))
    assert r['image_to_text_R@1'] == r['text_to_image_R@1'] == 1.0, order


def test_bad_evaluator_inputs_name_the_path(trained_demo, tmp_path):
  empty = tmp_path / 'empty'
  (empty / 'cat').mkdir(parents=True)
  with pytest.raises(ValueError, match='holds no images'):
    evaluate(parse_args(['--workdir', str(trained_demo), '--image_folder', str(empty)]))
  (empty / 'cat' / 'a.jpg').write_bytes(b'')
  names = tmp_path / 'names.txt'
  names.write_text('cat\ndog\n')
  with pytest.raises(ValueError, match='has 2 names but .* has 1 class folders'):
    evaluate(parse_args(['--workdir', str(trained_demo), '--image_folder', str(empty),
                         '--classnames', str(names)]))
  with pytest.raises(FileNotFoundError, match='holds no clip_jax checkpoint'):
    evaluate(parse_args(['--checkpoint', str(tmp_path), '--image_folder', str(empty)]))
  bad_templates = tmp_path / 't.txt'
  bad_templates.write_text('a photo of a cat\n')
  with pytest.raises(ValueError, match='must contain {}'):
    evaluate(parse_args(['--workdir', str(trained_demo), '--image_folder', str(empty),
                         '--templates', str(bad_templates)]))


def test_shards_without_class_names_fail_before_loading_anything(tmp_path):
  with pytest.raises(ValueError, match='--zeroshot_shards needs --classnames'):
    evaluate(parse_args(['--checkpoint', str(tmp_path / 'absent'), '--zeroshot_shards', 'x.tar']))


def test_samples_without_captions_are_left_out_of_retrieval(tmp_path):
  from clip_jax.data.shard_writer import ShardWriter
  from clip_jax.eval.inputs import ImageInput
  from clip_jax.eval.retrieval import retrieval_examples
  from clip_jax.eval.skips import Skipped
  from clip_jax.models.config import PreprocessConfig
  buffer = io.BytesIO()
  Image.new('RGB', (20, 20), 'red').save(buffer, 'JPEG')
  writer = ShardWriter(tmp_path, 10)
  writer.write(buffer.getvalue(), 'jpg', 'a red square')
  writer.write(buffer.getvalue(), 'jpg', '\n')  # whitespace only: no caption
  writer.close()
  examples = list(retrieval_examples(str(tmp_path / '00000.tar'),
                                     ImageInput(16, PreprocessConfig()), Skipped()))
  assert [captions for _, captions in examples] == [['a red square']]


# --- class names for an image folder ------------------------------------------------------

def _write(path, lines):
  path.write_text(''.join(f'{line}\n' for line in lines))
  return str(path)


def test_permuted_or_tab_separated_class_names_score_like_the_sorted_ones(
    trained_demo, demo_data, named_folder, templates_file, tmp_path):
  folders = sorted(p.name for p in named_folder.iterdir())
  shuffled = random.Random(0).sample(folders, len(folders))
  files = {
      'sorted': _write(tmp_path / 'sorted.txt', [f.replace('_', ' ') for f in folders]),
      'label_order': str(demo_data / 'classnames.txt'),  # the folder names, another order
      'tab': _write(tmp_path / 'tab.tsv', [f'{f}\t{f.replace("_", " ")}' for f in shuffled]),
  }
  results = {what: evaluate(parse_args([
      '--workdir', str(trained_demo), '--image_folder', str(named_folder), '--classnames', path,
      '--templates', str(templates_file), '--batch_size', '64']))['zeroshot'][str(named_folder)]
             for what, path in files.items()}
  assert results['sorted']['top1'] > 3 / 40  # trained: well above chance
  assert results['label_order'] == results['sorted']
  assert results['tab'] == results['sorted']


FOLDERS = ['eight', 'five', 'four', 'nine', 'one', 'seven', 'six', 'three', 'two', 'zero']
DIGITS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']


def _names(lines, path='names.txt'):
  return zeroshot.folder_classnames(FOLDERS, list(enumerate(lines, 1)), f'--classnames {path}',
                                    'digits/')


def test_class_names_in_another_order_are_matched_by_name(caplog):
  with caplog.at_level(logging.INFO):
    assert _names(DIGITS) == FOLDERS
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  # '_' in a folder name matches a space in the file; the file's spelling is the prompt name.
  assert zeroshot.folder_classnames(['golden_retriever', 'tabby_cat'],
                                    [(1, 'tabby cat'), (2, 'golden retriever')], 'f', 'd') == [
                                        'golden retriever', 'tabby cat']


def test_tab_separated_lines_map_folders_to_prompt_names():
  lines = [f'{d}\tthe digit {d}' for d in DIGITS]
  assert _names(lines) == [f'the digit {f}' for f in FOLDERS]
  # Any order, blank lines skipped, whitespace around the fields ignored.
  numbered = [(n, f' {f} \t {f.upper()} ') for n, f in zip(range(3, 30, 2), reversed(FOLDERS))]
  assert zeroshot.folder_classnames(FOLDERS, numbered, 'f', 'd') == [f.upper() for f in FOLDERS]


@pytest.mark.parametrize('lines, message', [
    (['zero\tnought', 'one'] + [f'{d}\t{d}' for d in DIGITS[2:]],
     r"--classnames names.txt line 2: expected FOLDER<TAB>NAME .*'one'"),
    (['zero\t'] + [f'{d}\t{d}' for d in DIGITS[1:]],
     r"--classnames names.txt line 1: expected FOLDER<TAB>NAME .*'zero\\t'"),
    ([f'{d}\t{d}' for d in DIGITS] + ['ten\tten'],
     r"--classnames names.txt line 11: 'ten' is not a class folder of digits/"),
    ([f'{d}\t{d}' for d in DIGITS] + ['three\tdrei'],
     r"--classnames names.txt line 11: folder 'three' is already named on line 4"),
    ([f'{d}\t{d}' for d in DIGITS if d != 'six'],
     r"--classnames names.txt names no class for folder\(s\) 'six' of digits/"),
])
def test_bad_tab_separated_files_name_the_file_and_line(lines, message):
  with pytest.raises(ValueError, match=message):
    _names(lines)


def test_other_names_map_by_sorted_position_and_the_mapping_is_logged(caplog):
  names = [f'class {i}' for i in range(10)]
  with caplog.at_level(logging.WARNING):
    assert _names(names) == names
  text = caplog.text
  assert '--classnames names.txt' in text and 'sorted' in text
  assert "eight -> 'class 0', five -> 'class 1', four -> 'class 2'" in text
  assert 'two' not in text  # only the first classes are listed


def test_positional_names_that_are_also_folder_names_are_flagged(caplog):
  names = ['zero', 'one'] + [f'class {i}' for i in range(8)]  # 'zero', 'one' are folders too
  with caplog.at_level(logging.WARNING):
    assert _names(names) == names
  assert "line 1 'zero' is the name of folder 'zero' but names folder 'eight'" in caplog.text


def test_wrong_number_of_positional_names_is_an_error():
  with pytest.raises(ValueError, match=r'--classnames names.txt has 9 names but digits/ has 10 '
                                       r'class folders'):
    _names(DIGITS[:9])
  with pytest.raises(ValueError, match="names no class for folder"):
    _names([f'{d}\t{d}' for d in DIGITS[:9]])


def test_tab_separated_names_are_refused_for_shards(tmp_path):
  names = _write(tmp_path / 'n.tsv', ['cat\tcat', 'dog\tdog'])
  with pytest.raises(ValueError, match=r'--classnames .*n.tsv line 1: FOLDER<TAB>NAME lines are '
                                       r'for --image_folder'):
    evaluate(parse_args(['--checkpoint', str(tmp_path / 'absent'), '--zeroshot_shards', 'x.tar',
                         '--classnames', names]))
