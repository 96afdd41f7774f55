"""Tokenizers: CLIP BPE ids identical to OpenCLIP's; sentencepiece as SigLIP uses it."""

import subprocess
import sys

import numpy as np
import pytest
from open_clip import tokenizer as oc_tokenizer

import clip_jax
from clip_jax.data.tokenizers import (
  CLIPTokenizer,
  SentencePieceTokenizer,
  clean_canonicalize,
  clean_lower,
  max_chars,
)
from tests.text_corpus import corpus

CORPUS = corpus()


def test_corpus_is_large_and_varied():
  assert len(CORPUS) >= 2000
  assert '' in CORPUS and any(len(s) > 1000 for s in CORPUS)
  assert any('&amp;' in s for s in CORPUS) and any(ord(c) > 0x1F000 for s in CORPUS for c in s)


@pytest.mark.parametrize('context_length', [77, 16])
def test_clip_bpe_ids_match_open_clip(context_length):
  ours = CLIPTokenizer(context_length=context_length)(CORPUS)
  reference = oc_tokenizer.SimpleTokenizer(context_length=context_length)(CORPUS).numpy()
  mismatched = [CORPUS[i] for i in np.nonzero((ours != reference).any(-1))[0]]
  assert not mismatched, f'{len(mismatched)} strings differ, e.g. {mismatched[:3]!r}'
  assert ours.dtype == np.int32 and ours.shape == (len(CORPUS), context_length)


def _long_captions(length):
  """Captions of real-looking text (the corpus, joined) of at least `length` characters."""
  joined = ' '.join(CORPUS)
  return [(joined[start:] + joined)[:length] for start in range(0, len(joined), len(joined) // 7)]


@pytest.mark.parametrize('context_length', [77, 16])
def test_text_cut_to_max_chars_keeps_open_clips_ids_for_the_whole_text(context_length):
  """The cut before cleaning (`max_chars`) never changes the ids of real-looking text."""
  captions = _long_captions(3 * max_chars(context_length))
  ours = CLIPTokenizer(context_length=context_length)(captions)
  reference = oc_tokenizer.SimpleTokenizer(context_length=context_length)(captions).numpy()
  np.testing.assert_array_equal(ours, reference)


def test_overlong_text_ends_with_eot():
  ids = clip_jax.get_tokenizer('ViT-B-32')(['word ' * 200])[0]
  assert ids[0] == 49406 and ids[-1] == 49407 and (ids != 0).all()


def test_cleaning_matches_open_clip():
  for text in CORPUS:
    assert clean_lower(text) == oc_tokenizer._clean_lower(text)
    assert clean_canonicalize(text) == oc_tokenizer._clean_canonicalize(text)


def test_decode_inverts_encode():
  tok = CLIPTokenizer()
  assert tok.decode(tok(['A Photo of 2 cats!'])[0]) == 'a photo of 2 cats !'


def test_get_tokenizer_uses_the_preset_context_length():
  assert clip_jax.get_tokenizer('tiny')(['a cat']).shape == (1, 32)
  assert clip_jax.get_tokenizer('ViT-B-16')(['a cat']).shape == (1, 77)
  assert clip_jax.get_tokenizer('clip', context_length=5)(['a cat']).shape == (1, 5)


def test_siglip_presets_explain_how_to_get_their_tokenizer():
  with pytest.raises(ValueError, match='spiece.model'):
    clip_jax.get_tokenizer('ViT-B-16-SigLIP')


def test_missing_vocab_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.txt.gz'):
    CLIPTokenizer(tmp_path / 'nope.txt.gz')


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
  """A small sentencepiece model trained by the project's own CLI on generated captions."""
  root = tmp_path_factory.mktemp('spm')
  captions = root / 'captions.txt'
  captions.write_text('\n'.join(CORPUS[:1500]))
  out = root / 'tok.model'
  subprocess.run([sys.executable, '-m', 'clip_jax.data.train_tokenizer', '--captions',
                  str(captions), '--vocab_size', '2000', '--character_coverage', '0.98',
                  '--out', str(out)], check=True)
  return out


def test_sentencepiece_tokenizer_appends_eos_and_pads(spm_model):
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
  tok = clip_jax.get_tokenizer(str(spm_model), context_length=16)
  assert (tok.pad_id, tok.eos_id) == (0, 1)  # SigLIP's T5 layout, set by train_tokenizer
  texts = ['A Red CIRCLE, on the left!', '', 'word ' * 50]
  ids = tok(texts)
  for text, row in zip(texts, ids):
    expected = sp.encode(clean_canonicalize(text))[:15] + [1]
    assert row[:len(expected)].tolist() == expected
    assert (row[len(expected):] == 0).all()
  assert ids[2, -1] == 1  # truncated text keeps EOS last


def test_sentencepiece_cuts_long_text_before_cleaning_and_keeps_its_ids(spm_model, monkeypatch):
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
  tok = clip_jax.get_tokenizer(str(spm_model), context_length=16)
  cleaned = []
  monkeypatch.setattr(tok, 'clean', lambda text: cleaned.append(len(text)) or
                      clean_canonicalize(text))
  captions = _long_captions(3 * max_chars(16))
  ids = tok(captions)
  assert max(cleaned) <= max_chars(16)  # not the whole text
  for text, row in zip(captions, ids):  # the ids of the whole text
    assert row.tolist() == sp.encode(clean_canonicalize(text))[:15] + [1]


def test_train_tokenizer_reports_bad_input(tmp_path):
  from clip_jax.data.train_tokenizer import train_tokenizer
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    train_tokenizer(str(tmp_path / 'missing.txt'), 100, str(tmp_path / 'x.model'))
  captions = tmp_path / 'c.txt'
  captions.write_text('a b c\n' * 10)
  with pytest.raises(ValueError, match='vocab_size=5000'):
    train_tokenizer(str(captions), 5000, str(tmp_path / 'x.model'))


def test_unreadable_sentencepiece_file_names_the_path(tmp_path):
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='bad.model'):
    SentencePieceTokenizer(bad)
  with pytest.raises(FileNotFoundError, match='absent.model'):
    clip_jax.get_tokenizer(str(tmp_path / 'absent.model'))
