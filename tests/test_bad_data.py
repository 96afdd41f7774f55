"""Crafted bad input through the data layer: each is skipped and counted under a named kind,
or cut to what matters, and the stream goes on (issue 25's data rows)."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import clip_jax
from clip_jax.data import tokenizers
from clip_jax.data.make_shards import make_shards
from clip_jax.data.pipeline import Loader, PipelineConfig
from clip_jax.data.tar_samples import BadJSON, Skip, json_object, read_shard
from clip_jax.data.transforms import ImageTooLarge, decode_image
from tests import helpers

TOKENIZER = clip_jax.get_tokenizer('clip', context_length=16)


def _png_bomb(width=13000, height=13000):
  """A black 1-bit PNG built chunk by chunk: 20 KB of file, 169 M pixels when decoded."""

  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data)))

  row = bytes(1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
  packer = zlib.compressobj(9)
  pixels = b''.join(packer.compress(row) for _ in range(height)) + packer.flush()
  header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', pixels)
          + chunk(b'IEND', b''))


def _config(spec, **kw):
  defaults = dict(global_batch_size=1, image_size=16, tokenizer=TOKENIZER, train=spec,
                  shuffle_window=1, cycle_length=1, workers=2, num_epochs=1)
  return PipelineConfig(**{**defaults, **kw})


def _drain(loader):
  """Every caption the loader yields until its one epoch ends, and its skip counts."""
  captions = []
  try:
    while True:
      captions += [TOKENIZER.decode(row) for row in next(loader)['text']]
  except StopIteration:
    pass
  finally:
    loader.close()
  return captions, dict(loader.skipped)


def test_caption_json_of_any_shape_is_a_counted_skip_and_the_stream_goes_on(tmp_path):
  image = helpers.jpeg(0)
  bad = {'list': b'[]', 'string': b'"x"', 'number': b'5', 'null': b'null',
         'deep': b'[' * 200_000 + b']' * 200_000, 'long_int': b'1' * 5000,
         'latin1': '{"caption": "caf\xe9"}'.encode('latin-1'), 'broken': b'{"caption": '}
  shards = [tmp_path / '0.tar', tmp_path / '1.tar']
  for index, shard in enumerate(shards):
    members = [(f'good{index}a.jpg', image), (f'good{index}a.txt', f'first {index}'.encode())]
    for key, data in list(bad.items())[index::2]:
      members += [(f'{key}.jpg', image), (f'{key}.json', data)]
    members += [(f'good{index}b.jpg', image),  # a json-only caption
                (f'good{index}b.json', json.dumps({'caption': f'last {index}'}).encode()),
                (f'meta{index}.jpg', image), (f'meta{index}.txt', f'meta {index}'.encode()),
                (f'meta{index}.json', b'[]')]  # a .txt caption: the meta is not needed
    helpers.write_tar(shard, members)

  for index, shard in enumerate(shards):  # each bad one is named by shard and key
    skips = [r for r in read_shard(str(shard)) if isinstance(r, Skip)]
    assert skips == [Skip('bad_caption', f'{shard}:{key}') for key in list(bad)[index::2]]
  # Through the training pipeline, one worker per shard: nothing kills a worker.
  captions, skipped = _drain(Loader(_config(f'{tmp_path}/{{0..1}}.tar')))
  assert sorted(captions) == sorted(f'{kind} {i}' for kind in ('first', 'last', 'meta')
                                    for i in (0, 1))
  assert skipped == {'bad_caption': len(bad)}

  assert json_object(b'{"label": 3}') == {'label': 3}  # the parse evaluation shares
  for data in bad.values():
    with pytest.raises(BadJSON):
      json_object(data)


def test_a_png_bomb_is_refused_from_its_header_and_counted(tmp_path, monkeypatch):
  bomb = _png_bomb()
  assert len(bomb) < 30_000
  loads = []
  load = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, 'load', lambda image: loads.append(image) or load(image))
  with pytest.raises(ImageTooLarge):
    decode_image(bomb, 224)
  assert not loads  # refused before any pixel was decoded

  # PIL's own bomb warning counts as too large too, whatever the cap.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
  with pytest.raises(ImageTooLarge):
    decode_image(_png_bomb(40, 30), None, max_pixels=10**9)
  monkeypatch.undo()

  good = helpers.jpeg(1)
  helpers.write_tar(tmp_path / '0.tar', [('a.jpg', good), ('a.txt', b'before'),
                                         ('bomb.png', bomb), ('bomb.txt', b'bomb'),
                                         ('b.jpg', good), ('b.txt', b'after')])
  helpers.write_tar(tmp_path / '1.tar', [('c.jpg', good), ('c.txt', b'other')])
  # The default cap, in the training pipeline (in-process: a worker runs the same mapper).
  captions, skipped = _drain(Loader(_config(f'{tmp_path}/{{0..1}}.tar', workers=0,
                                            cycle_length=2)))
  assert sorted(captions) == ['after', 'before', 'other']
  assert skipped == {'oversized_image': 1}

  # data.max_image_pixels: a 64x64 image over a cap of 48x48 pixels.
  helpers.write_tar(tmp_path / '2.tar', [('big.jpg', helpers.jpeg(2, 64)), ('big.txt', b'big'),
                                         ('a.jpg', good), ('a.txt', b'small')])
  captions, skipped = _drain(Loader(_config(str(tmp_path / '2.tar'), workers=0,
                                            max_image_pixels=48 * 48)))
  assert captions == ['small'] and skipped == {'oversized_image': 1}
  with pytest.raises(ValueError, match='config.data.max_image_pixels must be positive'):
    _config('x', max_image_pixels=0)


def test_a_huge_caption_and_a_huge_word_are_cut_before_cleaning_and_bpe(monkeypatch):
  tokenizer = tokenizers.CLIPTokenizer()
  cleaned, merged = [], []
  clean, merge = tokenizer.clean, tokenizer._merge
  monkeypatch.setattr(tokenizer, 'clean', lambda text: cleaned.append(len(text)) or clean(text))
  monkeypatch.setattr(tokenizer, '_merge', lambda word: merged.append(len(word)) or merge(word))
  caption = 'A photo of a red fox &amp; a cat on 2 mats. ' * 1_200_000  # 53 MB
  word = ''.join(np.random.default_rng(0).choice(list('abcdefghijklmnopqrstuvwxyz'), 32768))
  ids = tokenizer([caption, word])
  assert max(cleaned) <= tokenizers.max_chars(77)
  assert max(merged) <= tokenizers.MAX_WORD_BYTES
  # The cut kept every token the whole text gives: as from a few times the bound.
  np.testing.assert_array_equal(ids[0], tokenizer([caption[:3 * tokenizers.max_chars(77)]])[0])
  assert ids[1, 0] == tokenizer.sot_id and ids[1, -1] == tokenizer.eot_id
  assert (ids[1] != tokenizer.pad_id).all()  # the word filled the context


def test_make_shards_skips_and_counts_files_that_are_not_images(tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  good = helpers.jpeg(0)
  files = {'good.jpg': good, 'fake.jpg': b'just some text\n', 'trunc.jpg': good[:len(good) // 2],
           'bomb.png': _png_bomb()}
  for name, data in files.items():
    (photos / name).write_bytes(data)
    (photos / name).with_suffix('.txt').write_text(f'caption of {name}')
  (photos / 'latin1.jpg').write_bytes(good)
  (photos / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  stats = make_shards(str(photos), str(tmp_path / 'out'))
  assert stats['count'] == 1
  assert stats['skipped'] == {'bad_image': 2, 'oversized_image': 1, 'bad_caption': 1}
  assert json.loads((tmp_path / 'out' / '_stats.json').read_text()) == stats
  records = list(read_shard(str(tmp_path / 'out' / '00000.tar')))
  assert [(r.caption, r.image) for r in records] == [('caption of good.jpg', good)]
