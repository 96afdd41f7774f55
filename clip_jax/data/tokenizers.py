"""Tokenizers that give the same ids as OpenCLIP: CLIP's byte-level BPE and sentencepiece.

Both return int32 numpy arrays [N, context_length], ready to feed `encode_text`.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import string
from collections.abc import Callable, Sequence

import ftfy
import numpy as np
import regex
from etils import epath

Texts = str | Sequence[str]
DEFAULT_BPE = epath.resource_path('clip_jax.data') / 'assets' / 'bpe_simple_vocab_16e6.txt.gz'
SOT, EOT = '<start_of_text>', '<end_of_text>'
_NUM_MERGES = 49152 - 256 - 2
_CACHE_SIZE = 1 << 16  # words, each at most _CACHED_CHARS long: tens of MB at most
_CACHED_CHARS = 64
# Longer words are cut to this many UTF-8 bytes before BPE (a 32 KB word took OpenCLIP's
# BPE 37 s). Words in captions are far shorter, and a word this long already gives >= 128
# tokens (a CLIP token is at most 32 bytes), more than a 77-token context holds.
MAX_WORD_BYTES = 4096
# A CLIP token covers at most this many characters of cleaned text (32 bytes), plus one
# space after it.
_CHARS_PER_TOKEN = 33


def max_chars(context_length: int) -> int:
  """How much of a text can matter for `context_length` tokens: the rest is cut before
  cleaning, so a 50 MB caption costs what a short one does (it took 39 s and 0.8 GB).

  Why the kept tokens cannot change: the first `context_length` tokens cover at most
  `_CHARS_PER_TOKEN` cleaned characters each; the word holding the last of them starts
  before that point, and BPE sees at most `MAX_WORD_BYTES` of it; the pre-tokenizer looks
  ahead at most 15 characters (`<start_of_text>`), less than the two special tokens'
  share. Twice that many raw characters suffice while cleaning (whitespace runs, HTML
  entities) removes at most half of them, as in any real caption (tests/test_tokenizers.py
  checks long captions against OpenCLIP's uncut result). Sentencepiece pieces are at most
  16 characters (its default `max_sentencepiece_length`), so the bound serves it too.
  """
  return 2 * (_CHARS_PER_TOKEN * context_length + MAX_WORD_BYTES)


def basic_clean(text: str) -> str:
  """ftfy repair, doubly HTML-unescaped (captions are often escaped twice), stripped."""
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_lower(text: str) -> str:
  return ' '.join(basic_clean(text).split()).lower()


_NO_PUNCTUATION = str.maketrans('', '', string.punctuation)


def clean_canonicalize(text: str) -> str:
  """SigLIP/big_vision canonical form: no punctuation, lower case, single spaces."""
  text = basic_clean(text).replace('_', ' ').translate(_NO_PUNCTUATION).lower()
  return ' '.join(text.split())


@functools.lru_cache
def byte_alphabet() -> dict[int, str]:
  """Maps each byte to a printable unicode character, so BPE never sees whitespace/control."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  # Vocabulary ids follow this order: printable bytes first, then the remapped rest.
  others = [b for b in range(256) if b not in printable]
  mapping = {b: chr(b) for b in printable}
  mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
  return mapping


def _read_text(path: epath.Path, what: str) -> bytes:
  try:
    return path.read_bytes()
  except (FileNotFoundError, PermissionError, IsADirectoryError, OSError) as e:
    raise FileNotFoundError(f'Cannot read {what} {path}: {e}') from e


def _to_array(sequences: list[list[int]], context_length: int, pad_id: int) -> np.ndarray:
  out = np.full((len(sequences), context_length), pad_id, dtype=np.int32)
  for row, ids in enumerate(sequences):
    out[row, :len(ids)] = ids
  return out


class CLIPTokenizer:
  """OpenAI CLIP's BPE: clean + lowercase, <start_of_text> ids <end_of_text>, pad 0.

  Text longer than the context is cut and its last token set to <end_of_text>, so the
  argmax-pooled text tower always finds the EOT token.
  """

  pad_id = 0

  def __init__(self, vocab_path: str | epath.Path = DEFAULT_BPE, context_length: int = 77,
               clean: Callable[[str], str] = clean_lower):
    lines = gzip.decompress(_read_text(epath.Path(vocab_path), 'BPE vocab file')).decode('utf-8')
    merges = [tuple(line.split()) for line in lines.split('\n')[1:_NUM_MERGES + 1] if line]
    self.merges = merges
    chars = list(byte_alphabet().values())
    vocab = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges] + [SOT, EOT]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.ranks = {merge: i for i, merge in enumerate(merges)}
    self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
    self.vocab_size = len(vocab)
    self.context_length = context_length
    self.clean = clean
    self.pattern = regex.compile(
        rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
        regex.IGNORECASE)
    self._cache: dict[str, tuple[str, ...]] = {}  # a plain dict keeps the tokenizer picklable

  def _bpe(self, token: str) -> tuple[str, ...]:
    pieces = self._cache.get(token)
    if pieces is None:
      pieces = self._merge(token)
      if len(self._cache) < _CACHE_SIZE and len(token) <= _CACHED_CHARS:
        self._cache[token] = pieces
    return pieces

  def _merge(self, token: str, fired: set[int] | None = None) -> tuple[str, ...]:
    """Applies BPE merges to one pre-tokenised word, as OpenCLIP does: every occurrence of
    the lowest-ranked adjacent pair, left to right, then again, until no pair is ranked.

    OpenCLIP rescans the word for each merge, O(n^2) (a 2,000-letter word took 1.2 s);
    here the pairs wait in a heap by (rank, position) over a linked list of symbols. A
    merge never re-forms the pair just merged, so one rank's occurrences are one batch.
    """
    if token in (SOT, EOT):
      return (token,)
    symbols: list[str | None] = [*token[:-1], token[-1] + '</w>']
    right = [*range(1, len(symbols)), -1]  # the next symbol still present; -1: none
    left = list(range(-1, len(symbols) - 1))

    def rank_at(i: int) -> int | None:
      """The rank of the pair starting at symbol i, None when it has no ranked pair."""
      j = right[i]
      return self.ranks.get((symbols[i], symbols[j])) if j >= 0 else None  # type: ignore[arg-type]

    heap = [(rank, i) for i in range(len(symbols)) if (rank := rank_at(i)) is not None]
    heapq.heapify(heap)
    while heap:
      rank, batch = heap[0][0], []
      while heap and heap[0][0] == rank:
        batch.append(heapq.heappop(heap)[1])
      for i in batch:  # positions ascend: left to right
        if symbols[i] is None or rank_at(i) != rank:
          continue  # merged away since it was queued
        j = right[i]
        if fired is not None:
          fired.add(rank)
        symbols[i], symbols[j] = symbols[i] + symbols[j], None
        right[i] = right[j]
        if right[i] >= 0:
          left[right[i]] = i
        for k in (left[i], i):  # the two pairs the merge formed
          if k >= 0 and (new := rank_at(k)) is not None:
            heapq.heappush(heap, (new, k))
    return tuple(s for s in symbols if s is not None)

  def encode(self, text: str, limit: int | None = None) -> list[int]:
    """The ids of `text` (words cut to `MAX_WORD_BYTES`), stopping once `limit` are known."""
    alphabet = byte_alphabet()
    ids: list[int] = []
    for match in self.pattern.finditer(self.clean(text)):
      chars = ''.join(alphabet[b] for b in match.group().encode('utf-8')[:MAX_WORD_BYTES])
      ids.extend(self.encoder[piece] for piece in self._bpe(chars))
      if limit is not None and len(ids) >= limit:
        break
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    inverse = {c: b for b, c in byte_alphabet().items()}
    skip = (self.pad_id, self.sot_id, self.eot_id)
    chars = ''.join(self.decoder[int(i)] for i in ids if int(i) not in skip)
    text = bytearray(inverse[c] for c in chars).decode('utf-8', errors='replace')
    return text.replace('</w>', ' ').strip()

  def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = context_length or self.context_length
    sequences = []
    for text in texts:
      ids = [self.sot_id, *self.encode(text[:max_chars(n)], limit=n), self.eot_id]
      if len(ids) > n:
        ids = ids[:n]
        ids[-1] = self.eot_id
      sequences.append(ids)
    return _to_array(sequences, n, self.pad_id)


class SentencePieceTokenizer:
  """Any sentencepiece `.model` as SigLIP uses it: canonicalised text, ids, then EOS.

  Overlong text keeps its EOS as the last token (as HF's truncation does); padding uses
  the model's pad id, or EOS when the model defines none (SigLIP's T5 vocab pads with EOS).
  """

  def __init__(self, model_path: str | epath.Path, context_length: int = 64,
               clean: Callable[[str], str] = clean_canonicalize):
    import sentencepiece
    model_path = epath.Path(model_path)
    self._proto = _read_text(model_path, 'sentencepiece model')
    self.sp = sentencepiece.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError
      raise ValueError(f'{model_path} is not a valid sentencepiece model: {e}') from e
    self.eos_id = self.sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(f'Sentencepiece model {model_path} defines no EOS token.')
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
    self.vocab_size = self.sp.get_piece_size()
    self.context_length = context_length
    self.clean = clean

  def __getstate__(self):  # pickled into data-loader workers as the model proto bytes
    return {k: v for k, v in self.__dict__.items() if k != 'sp'}

  def __setstate__(self, state):
    import sentencepiece
    self.__dict__.update(state)
    self.sp = sentencepiece.SentencePieceProcessor()
    self.sp.LoadFromSerializedProto(self._proto)

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(self.clean(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)])

  def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = context_length or self.context_length
    sequences = [self.encode(t[:max_chars(n)])[:n - 1] + [self.eos_id] for t in texts]
    return _to_array(sequences, n, self.pad_id)


def write_merges_subset(texts: Sequence[str], out: str | epath.Path,
                        source: str | epath.Path = DEFAULT_BPE) -> int:
  """Writes a BPE merges file (`.txt.gz`) holding only the merges that tokenising `texts`
  with `source` applies, in their order; returns its vocabulary size.

  Those texts get the same pieces as with the full vocabulary (the lowest-ranked merge
  present is always one of the kept ones), under compact ids: a caption decoder over a
  small domain (the demo's shapes, ~620 ids) then computes logits over its own words, not
  over all 49,408 of CLIP's (80x less decoder-head compute on the CPU demo). Other text
  still tokenises, into smaller pieces.
  """
  tokenizer = CLIPTokenizer(source)
  alphabet = byte_alphabet()
  fired: set[int] = set()
  for text in texts:
    for match in tokenizer.pattern.finditer(tokenizer.clean(text)):
      tokenizer._merge(''.join(alphabet[b] for b in match.group().encode('utf-8')), fired)
  lines = ['#version: 0.2'] + [' '.join(tokenizer.merges[rank]) for rank in sorted(fired)]
  epath.Path(out).write_bytes(gzip.compress('\n'.join(lines).encode('utf-8') + b'\n', mtime=0))
  return 2 * len(alphabet) + len(fired) + 2


Tokenizer = CLIPTokenizer | SentencePieceTokenizer


def tokenizer_from_spec(spec: str, context_length: int) -> Tokenizer:
  """'clip' -> the shipped BPE; a `.model` path -> sentencepiece; `.txt.gz` -> BPE merges."""
  if spec == 'clip':
    return CLIPTokenizer(context_length=context_length)
  if spec.endswith('.txt.gz'):
    return CLIPTokenizer(spec, context_length=context_length)
  if spec.endswith('.model'):
    return SentencePieceTokenizer(spec, context_length=context_length)
  raise ValueError(f"Unknown tokenizer {spec!r}: use 'clip', a sentencepiece .model path or a "
                   'BPE merges .txt.gz path.')
