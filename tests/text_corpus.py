"""A seeded corpus of varied strings for tokenizer parity (>= 2,000 strings)."""

from __future__ import annotations

import random

_WORDS = ['a', 'photo', 'of', 'the', 'cat', 'dog', 'car', 'tree', 'person', 'bird', 'plane', 'boat', 'red', 'green', 'blue', 'small', 'big', 'two', 'three', 'many', 'old', 'new', 'bright', 'dark', 'sunny', 'rainy', 'city', 'street', 'beach', 'mountain', 'river', 'playing', 'running', 'sitting', 'standing', 'with', 'on', 'in', 'under', 'over', 'near', 'café', 'naïve', 'résumé', 'jalapeño', 'Zürich', 'São', 'Paulo']
_TEMPLATES = ('a photo of a {}.', 'a bad photo of the {}.', 'itap of my {}.', 'a {} in a video game.',
              'art of the {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
              'a toy {}.', 'a rendition of the {}.', "it's a {}!", "I'm looking at the {}, aren't you?",
              'A PHOTO OF A {}', 'the {} (cropped)', 'a {} -- 50% off!!!', '{}: 1st place, 2nd place')
_SCRIPTS = [(0x00C0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x05FF),
            (0x0600, 0x06FF), (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x3040, 0x30FF),
            (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F),
            (0x1F900, 0x1F9FF), (0x0300, 0x036F), (0x2000, 0x206F), (0x20A0, 0x20CF)]
_ENTITIES = ('&amp;', '&lt;', '&gt;', '&quot;', '&#39;', '&nbsp;', '&#x1F600;', '&eacute;',
             '&amp;amp;', '&amp;lt;b&amp;gt;', '&copy;', '&hellip;', '&mdash;', '&#8217;')
_MOJIBAKE = ('cafÃ©', 'â€œquotedâ€\x9d', 'Ã¼ber', 'donâ€™t', 'Ã±andÃº', 'naÃ¯ve')
_PUNCT = '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»“”‘’…·•—–'
_FIXED = ['', ' ', '\t\n  \r', 'a', 'A', '1', '!', '...', "'", "'s", "don't", 'WE\'RE', "y'all'd've",
          '<start_of_text>', '<end_of_text>', 'hello <end_of_text> world', '😀', '👩‍👩‍👧‍👦', '🇯🇵🇫🇷',
          'ﬁ ligature', 'Ｆｕｌｌｗｉｄｔｈ', 'e\u0301 combining', '\u200bzero\u200bwidth', 'x' * 1000,
          ' '.join(['word'] * 400), '1234567890' * 20, 'https://example.com/a?b=c&d=e#f',
          '#hashtag @mention $100.00 €50 ¥1000', 'def f(x):\n    return x ** 2', '2024-01-31T12:00:00Z']


def _random_unicode(rng: random.Random) -> str:
  lo, hi = rng.choice(_SCRIPTS)
  return ''.join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))


def _random_number(rng: random.Random) -> str:
  return rng.choice([str(rng.randint(0, 10**9)), f'{rng.uniform(-1e4, 1e4):.3f}',
                     f'{rng.randint(1, 999)},{rng.randint(0, 999):03d}', f'{rng.randint(1, 99)}%',
                     f'+1 ({rng.randint(100, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}'])


def _piece(rng: random.Random) -> str:
  kind = rng.randrange(7)
  if kind == 0:
    return rng.choice(_TEMPLATES).format(' '.join(rng.choices(_WORDS, k=rng.randint(1, 3))))
  if kind == 1:
    return _random_unicode(rng)
  if kind == 2:
    return rng.choice(_ENTITIES)
  if kind == 3:
    return rng.choice(_MOJIBAKE)
  if kind == 4:
    return _random_number(rng)
  if kind == 5:
    return ''.join(rng.choices(_PUNCT, k=rng.randint(1, 6)))
  return ' '.join(rng.choices(_WORDS, k=rng.randint(1, 8)))


def corpus(n: int = 2200, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  out = list(_FIXED)
  while len(out) < n:
    sep = rng.choice([' ', '', '  ', '\n', '\t'])
    out.append(sep.join(_piece(rng) for _ in range(rng.randint(1, 6))))
  long_text = ' '.join(_piece(rng) for _ in range(200))
  return out + [long_text, long_text.upper()]
