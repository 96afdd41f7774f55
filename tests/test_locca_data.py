"""LocCa data: box tokens, the three tasks' sequences and masks, boxes through the real
augmentation, the demo's boxes, task frequencies, cut counting and exact resume."""

import collections
import hashlib
import io
import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

import clip_jax
from clip_jax.data import locca
from clip_jax.data.make_demo import COLOURS, draw_sample, draw_scene, make_demo
from clip_jax.data.pipeline import (
  ImageTextMapper,
  Loader,
  PipelineConfig,
  caption_tokens,
)
from clip_jax.data.shard_writer import ShardWriter
from clip_jax.data.tar_samples import RawSample

TOKENIZER = clip_jax.get_tokenizer('clip', context_length=8)
SOT, EOT, VOCAB = 49406, 49407, 49408
CAP, REF, GRD = VOCAB + 100, VOCAB + 101, VOCAB + 102
TWO_RED_STARS = [1237, 736, 2895]  # 'two red stars' in the CLIP BPE
A_RED_STAR = [320, 736, 1565]      # 'a red star'


def _spec(**config):
  return locca.locca_spec({'weight': 1.0, **config}, TOKENIZER)


def _only(task, **config):
  return _spec(tasks={task: 1.0}, **config)


# --- config, boxes -----------------------------------------------------------------------

def test_spec_from_config_defaults_and_errors():
  assert locca.locca_spec(locca.locca_defaults(), TOKENIZER) is None  # weight 0: off
  spec = _spec()
  assert (spec.context_length, spec.bins, spec.min_visible) == (32, 100, 0.5)
  assert spec.task_probs == pytest.approx((1 / 3,) * 3)
  assert spec.vocab_size == VOCAB + 100 + 3
  assert [spec.task_token(t) for t in locca.TASKS] == [CAP, REF, GRD]
  assert _spec(tasks={'caption': 1, 'grounded': 3}).task_probs == (0.25, 0.0, 0.75)
  for config, key in (({'bins': 1}, 'bins'), ({'context_length': 7}, 'context_length'),
                      ({'tasks': {'captions': 1}}, 'tasks.captions'),
                      ({'tasks': {'caption': -1}}, 'tasks.caption'),
                      ({'min_visible': 1.5}, 'min_visible'), ({'weight': -1}, 'weight'),
                      ({'bin': 10}, 'bin')):
    with pytest.raises(ValueError, match=f'config.locca.{key}'):
      _spec(**config)
  with pytest.raises(ValueError, match='all 0'):
    _spec(tasks={'caption': 0})


def test_box_tokens_round_trip_to_the_bin_centres():
  spec = _spec(bins=10)
  np.testing.assert_array_equal(locca.box_tokens((0.0, 0.05, 0.99, 1.0), spec),
                                [VOCAB + 0, VOCAB + 0, VOCAB + 9, VOCAB + 9])
  np.testing.assert_array_equal(locca.box_tokens((-0.2, 0.1, 0.35, 1.7), spec),
                                [VOCAB + 0, VOCAB + 1, VOCAB + 3, VOCAB + 9])  # clipped
  rng = np.random.default_rng(0)
  spec = _spec()
  for _ in range(200):
    box = np.sort(rng.random((2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]  # x0 y0 x1 y1
    back = locca.box_from_tokens(locca.box_tokens(tuple(box), spec), spec)
    assert np.abs(np.asarray(back) - box).max() <= 0.5 / spec.bins + 1e-9
  assert locca.box_from_tokens([VOCAB, VOCAB, VOCAB + 5], spec) is None  # 3 tokens
  assert locca.box_from_tokens([VOCAB, 320, VOCAB + 5, VOCAB + 5], spec) is None  # text
  assert locca.box_from_tokens([VOCAB, VOCAB, VOCAB + 100, VOCAB + 5], spec) is None  # CAP
  assert locca.box_from_tokens([VOCAB + 6, VOCAB, VOCAB + 5, VOCAB + 5], spec) is None  # x0>x1


def test_iou():
  assert locca.iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1
  assert locca.iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0
  assert locca.iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)
  assert locca.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0


# --- sequences ---------------------------------------------------------------------------

def _padded(ids, n=32):
  return np.array(ids + [0] * (n - len(ids)), np.int32)


def _mask(start, stop, n=32):
  mask = np.zeros(n, np.int32)
  mask[start:stop] = 1
  return mask


REGION = locca.Region((0.1, 0.25, 0.5, 0.999), 'two red stars')
BOX = [VOCAB + 10, VOCAB + 25, VOCAB + 50, VOCAB + 99]


@pytest.mark.parametrize('task, ids, targets', [
    ('caption', [SOT, CAP, *A_RED_STAR, EOT], (2, 6)),
    ('referring', [SOT, REF, *TWO_RED_STARS, *BOX, EOT], (5, 10)),
    ('grounded', [SOT, GRD, *BOX, *TWO_RED_STARS, EOT], (6, 10)),
])
def test_each_task_builds_its_sequence_and_targets(task, ids, targets):
  spec = _only(task)
  tokens, mask, cut = locca.make_example('a red star', [REGION], np.random.default_rng(0), spec)
  np.testing.assert_array_equal(tokens, _padded(ids))
  np.testing.assert_array_equal(mask, _mask(*targets))
  assert not cut and mask[0] == 0
  # The prompt is what precedes the targets: what a generator is given at evaluation.
  given = {'caption': None, 'referring': REGION.phrase, 'grounded': REGION.box}[task]
  np.testing.assert_array_equal(locca.prompt(task, given, spec), ids[:targets[0]])


def test_examples_without_regions_caption_whatever_task_was_drawn():
  for task in ('referring', 'grounded'):
    tokens, mask, _ = locca.make_example('a red star', [], np.random.default_rng(0),
                                         _only(task))
    np.testing.assert_array_equal(tokens, _padded([SOT, CAP, *A_RED_STAR, EOT]))
    np.testing.assert_array_equal(mask, _mask(2, 6))


def test_long_text_is_cut_keeping_eot_and_box_tokens():
  caption = 'a red star ' * 10  # 30 ids
  tokens, mask, cut = locca.make_example(caption, [], np.random.default_rng(0),
                                         _only('caption', context_length=8))
  np.testing.assert_array_equal(tokens, [SOT, CAP, *A_RED_STAR, *A_RED_STAR[:2], EOT])
  np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 1, 1, 1])
  assert cut
  region = locca.Region(REGION.box, 'two red stars and two red stars')
  spec = _only('referring', context_length=9)  # room for 2 phrase ids
  tokens, mask, cut = locca.make_example('x', [region], np.random.default_rng(0), spec)
  np.testing.assert_array_equal(tokens, [SOT, REF, *TWO_RED_STARS[:2], *BOX, EOT])
  np.testing.assert_array_equal(mask, [0, 0, 0, 0, 1, 1, 1, 1, 1])
  assert cut
  np.testing.assert_array_equal(locca.prompt('referring', region.phrase, spec), tokens[:4])
  tokens, _, cut = locca.make_example('x', [region], np.random.default_rng(0),
                                      _only('grounded', context_length=9))
  np.testing.assert_array_equal(tokens, [SOT, GRD, *BOX, *TWO_RED_STARS[:2], EOT])
  assert cut
  tokens, _, cut = locca.make_example('x', [REGION], np.random.default_rng(0),
                                      _only('grounded', context_length=10))
  assert not cut and tokens[-1] == EOT


def test_task_frequencies_follow_the_probabilities():
  spec = _spec(tasks={'caption': 0.2, 'referring': 0.3, 'grounded': 0.5})
  rng = np.random.default_rng(0)
  regions = [REGION, locca.Region((0, 0, 1, 1), 'a red star')]
  n = 4000
  counts = collections.Counter(int(locca.make_example('a red star', regions, rng, spec)[0][1])
                               for _ in range(n))
  for token, p in ((CAP, 0.2), (REF, 0.3), (GRD, 0.5)):
    assert abs(counts[token] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, counts  # 4 sigma


def test_objects_from_json_reads_valid_objects_and_names_bad_ones():
  data = json.dumps({'objects': [{'box': [0.1, 0.2, 0.3, 0.4], 'phrase': 'a red star',
                                  'class': 'red star'}]}).encode()
  assert locca.objects_from_json(data) == [locca.Region((0.1, 0.2, 0.3, 0.4), 'a red star')]
  assert locca.objects_from_json(b'') == [] and locca.objects_from_json(b'{"a": 1}') == []
  for bad, message in ((b'{', 'not UTF-8 JSON'), (b'[]', 'not an object'),
                       (b'{"objects": {}}', 'not a list'),
                       (b'{"objects": [{"box": [0, 0, 1], "phrase": "x"}]}', '4 finite'),
                       (b'{"objects": [{"box": [0, 0, 1, NaN], "phrase": "x"}]}', '4 finite'),
                       (b'{"objects": [{"box": [0, 0, 1, true], "phrase": "x"}]}', '4 finite'),
                       (b'{"objects": [{"box": [0.5, 0, 0.2, 1], "phrase": "x"}]}', 'x0 < x1'),
                       (b'{"objects": [{"box": [0, 0, 1, 1], "phrase": " "}]}', 'phrase'),
                       (b'{"objects": [7]}', '4 finite')):
    with pytest.raises(locca.BadObjects, match=message):
      locca.objects_from_json(bad)


def test_shape_classes_parses_demo_captions():
  assert locca.shape_classes('two small red stars at the top') == {'red star'}
  assert locca.shape_classes('red star and blue circle') == {'red star', 'blue circle'}
  assert locca.shape_classes('three large green crosses on the left and a white square, '
                             'on a striped background') == {'green cross', 'white square'}
  assert locca.shape_classes('a red and a star') == set()
  assert locca.shape_classes('') == set()


# --- boxes through the augmentation ------------------------------------------------------

def _png(image):
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


def _red_extent(pixels):
  """(x0, y0, x1, y1) in pixels of the strongly red pixels (pixel i spans [i, i + 1])."""
  red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
  ys, xs = np.nonzero(red)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


@pytest.mark.parametrize('augment', ['random_resized_crop', 'center_crop', 'squash'])
def test_box_tokens_cover_the_drawn_pixels_of_the_augmented_image(augment):
  """A red rectangle of known box on a non-square image, through the real mapper: the
  referring answer's box (decoded from its tokens) is where the red pixels ended up."""
  width, height, size = 120, 90, 64
  image = Image.new('RGB', (width, height), (40, 120, 200))
  box_px = (30, 20, 75, 60)  # the rectangle fills pixels [30, 75) x [20, 60)
  ImageDraw.Draw(image).rectangle((box_px[0], box_px[1], box_px[2] - 1, box_px[3] - 1),
                                  fill=(230, 20, 20))
  meta = json.dumps({'objects': [{'box': [box_px[0] / width, box_px[1] / height,
                                          box_px[2] / width, box_px[3] / height],
                                  'phrase': 'a red square'}]}).encode()
  record = RawSample('k', 's', _png(image), 'a red square', meta)
  spec = _only('referring', min_visible=0.0)
  cfg = PipelineConfig(global_batch_size=1, image_size=size, tokenizer=TOKENIZER,
                       augment=augment, crop_scale=(0.25, 1.0), locca=spec)
  for seed in range(8):
    example = ImageTextMapper(cfg)(record, np.random.default_rng(seed))
    drawn = _red_extent(example['image'])
    tokens = example['decoder_tokens']
    assert tokens[1] == REF
    box = locca.box_from_tokens(tokens[5:9], spec)
    # Bin centres are within half a bin (0.32 px) of the box; bicubic edges blur ~1 px.
    np.testing.assert_allclose(np.asarray(box) * size, drawn, atol=1.5)


def test_objects_mostly_outside_the_crop_are_not_used():
  window = (50.0, 0.0, 100.0, 100.0)  # the right half of a 100 x 100 image
  inside, share = locca.crop_box((0.25, 0.0, 0.75, 0.5), window, 100, 100)
  assert inside == (0.0, 0.0, 0.5, 0.5) and share == pytest.approx(0.5)
  spec = _spec(min_visible=0.6)
  regions = [locca.Region((0.25, 0.0, 0.75, 0.5), 'half in'),
             locca.Region((0.6, 0.5, 0.9, 0.9), 'all in'),
             locca.Region((0.0, 0.0, 0.2, 0.2), 'out')]
  assert locca.visible_regions(regions, window, 100, 100, spec) == [
      locca.Region((0.2, 0.5, 0.8, 0.9), 'all in')]


# --- the demo data -----------------------------------------------------------------------

# sha256 of the pixels, captions and labels of `draw_sample` for seeds 0..99, computed with
# make_demo before it wrote boxes: the boxes must not change a single draw.
DEMO_DIGEST = '70676f56d63dd52b3561a62ca795ecf0cbedf0176837f709e3b9e266fce2247e'


def test_demo_images_and_captions_are_unchanged():
  digest = hashlib.sha256()
  for seed in range(100):
    image, caption, label = draw_sample(np.random.default_rng(seed), 64, 1 + seed % 2)
    digest.update(np.asarray(image).tobytes())
    digest.update(caption.encode())
    digest.update(str(label).encode())
  assert digest.hexdigest() == DEMO_DIGEST


def test_demo_boxes_cover_the_drawn_shapes(tmp_path):
  checked = 0
  for seed in range(150):
    scene = draw_scene(np.random.default_rng(seed), 64, 1 + seed % 2)
    colours = [o['class'].split()[0] for o in scene.objects]
    pixels = np.asarray(scene.image).astype(int)
    for obj, colour in zip(scene.objects, colours):
      if colours.count(colour) > 1:
        continue  # two groups of one colour: their pixels cannot be told apart
      ys, xs = np.nonzero(np.abs(pixels - COLOURS[colour]).sum(-1) == 0)
      drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 64
      box, pixel = np.array(obj['box']), 1 / 64
      assert (box[:2] <= drawn[:2] + pixel).all() and (box[2:] >= drawn[2:] - pixel).all()
      if len(colours) == 1:  # tight too (of two groups, the second may hide an edge)
        np.testing.assert_allclose(box, drawn, atol=pixel)
      assert obj['class'] == f'{colour} {obj["class"].split()[1]}'
      assert locca.shape_classes(obj['phrase']) == {obj['class']}
      assert locca.shape_classes(scene.caption) >= {obj['class']}
      checked += 1
  assert checked > 150
  make_demo(str(tmp_path), train_samples=4, eval_samples=2, samples_per_shard=4)
  with tarfile.open(tmp_path / 'train' / '00000.tar') as tar:
    meta = json.loads(tar.extractfile('000000000.json').read())
  assert meta['objects'] and set(meta['objects'][0]) == {'box', 'phrase', 'class'}
  assert locca.objects_from_json(json.dumps(meta).encode())


# --- the pipeline: counts, synthetic data, resume ----------------------------------------

def test_caption_cuts_are_detected_and_ids_unchanged():
  for words in range(1, 10):  # context 8: sot + 6 ids + eot fit
    caption = ' '.join(['star'] * words)
    ids, cut = caption_tokens(TOKENIZER, caption)
    np.testing.assert_array_equal(ids, TOKENIZER([caption])[0])
    assert cut == (words > 6), words


def _write(root, captions, metas):
  writer = ShardWriter(root, samples_per_shard=len(captions) // 2)
  image = Image.new('RGB', (40, 30), (200, 30, 30))
  for caption, meta in zip(captions, metas):
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG')
    writer.write(buffer.getvalue(), 'jpg', caption, meta)
  writer.close()
  return str(root / '{00000..00001}.tar')


def test_loader_counts_cut_texts_and_unreadable_objects(tmp_path):
  good = {'objects': [{'box': [0, 0, 1, 1], 'phrase': 'a red square'}]}
  captions = ['a red star', 'star ' * 7, 'star ' * 20, 'a star']
  metas = [good, good, {'objects': 'none'}, {'objects': [{'box': [1, 1, 0, 0]}]}]
  spec = _only('caption', context_length=9)  # room for 6 caption ids
  cfg = PipelineConfig(global_batch_size=4, image_size=16, tokenizer=TOKENIZER,
                       train=_write(tmp_path, captions, metas), shuffle_window=1, workers=0,
                       locca=spec)
  loader = Loader(cfg)
  batch = next(loader)
  assert batch['decoder_tokens'].shape == batch['decoder_mask'].shape == (4, 9)
  assert loader.cut == {'caption': 2, 'locca_sequence': 2}
  assert loader.locca_fallback == {'bad_objects': 2}
  state = loader.get_state()
  loader.close()
  old = {k: v for k, v in state.items() if k not in ('cut', 'locca_fallback')}
  resumed = Loader(cfg)
  resumed.set_state(old)  # a state saved before these counts existed
  assert resumed.cut == {} and resumed.locca_fallback == {}
  resumed.set_state(state)
  assert resumed.cut == {'caption': 2, 'locca_sequence': 2}
  resumed.close()


def test_synthetic_batches_carry_caption_task_decoder_sequences():
  cfg = PipelineConfig(global_batch_size=4, image_size=16, tokenizer=TOKENIZER,
                       kind='synthetic', workers=0, locca=_spec(context_length=12))
  plain = next(Loader(PipelineConfig(global_batch_size=4, image_size=16, tokenizer=TOKENIZER,
                                     kind='synthetic', workers=0)))
  batch = next(Loader(cfg))
  np.testing.assert_array_equal(batch['image'], plain['image'])  # LocCa changes no image
  tokens, mask = batch['decoder_tokens'], batch['decoder_mask']
  assert tokens.shape == mask.shape == (4, 12)
  for row, targets in zip(tokens, mask):
    length = int((row != 0).sum())
    assert list(row[:2]) == [SOT, CAP] and row[length - 1] == EOT
    np.testing.assert_array_equal(targets, _mask(2, length, 12))


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_with_locca_yields_exactly_the_uninterrupted_batches(tmp_path, workers):
  make_demo(str(tmp_path), train_samples=60, eval_samples=1, samples_per_shard=6)
  cfg = PipelineConfig(global_batch_size=6, image_size=16, tokenizer=TOKENIZER,
                       train=str(tmp_path / 'train' / '{00000..00009}.tar'), shuffle_window=5,
                       cycle_length=3, workers=workers, locca=_spec(context_length=10))
  reference = Loader(cfg)
  expected = [next(reference) for _ in range(14)]
  cut = [dict(reference.cut)]
  reference.close()
  tasks = collections.Counter(int(t) for b in expected for t in b['decoder_tokens'][:, 1])
  assert set(tasks) == {CAP, REF, GRD}
  for stop in random.Random(workers).sample(range(1, 11), 1 if workers else 3):  # workers: slow
    first = Loader(cfg)
    for _ in range(stop):
      next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = Loader(cfg)
    resumed.set_state(state)
    for want in expected[stop:]:
      got = next(resumed)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert [dict(resumed.cut)] == cut
    resumed.close()
