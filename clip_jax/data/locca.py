"""LocCa training data (SigLIP 2's decoder loss): caption, referring and grounded sequences.

A caption decoder that cross-attends to the image's patch tokens learns three tasks, one
drawn per example with the configured probabilities:

  caption:   [sot, CAP, caption ids..., eot]                targets: caption ids, eot
  referring: [sot, REF, phrase ids..., x0, y0, x1, y1, eot] targets: the 4 box tokens, eot
  grounded:  [sot, GRD, x0, y0, x1, y1, phrase ids..., eot] targets: phrase ids, eot

Every target follows the task's prompt (`prompt`): a sequence's mask is 1 from the end of
the prompt to its eot and 0 elsewhere, so position 0 is never a target. Decoder ids: the
text tokenizer's [0, text_vocab), then `bins` box-coordinate tokens, then CAP, REF, GRD
(`LoccaSpec.vocab_size` in all). A coordinate v in [0, 1] of the image as the model sees it
(after the augmentation's crop) is bin clip(floor(v * bins), 0, bins - 1), read back as the
bin's centre. Boxes come from the sample's json (`objects_from_json`; docs/data.md, 'LocCa
data'); an example without a usable object (none, or each mostly cropped away) captions.

`config.locca` keys (`locca_defaults`):
  weight          the decoder loss's weight in the train step; 0 turns LocCa off.
  context_length  decoder sequence length, sot and eot included (default 32, at least 8:
                  a referring sequence needs 7 tokens besides its phrase). Text that
                  does not fit is cut (the caption, or the phrase: box tokens always fit)
                  and counted (`Loader.cut['locca_sequence']`).
  bins            box-coordinate tokens per axis (default 100, as in LocCa).
  tasks           relative probabilities of 'caption', 'referring', 'grounded' (default
                  1 each; normalised).
  min_visible     an object is used for referring/grounded only when at least this share
                  of its box's area is inside the crop (default 0.5).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from clip_jax.data.make_demo import COLOURS, PLURALS, SHAPES
from clip_jax.data.tar_samples import BadJSON, json_object
from clip_jax.data.tokenizers import CLIPTokenizer, max_chars
from clip_jax.data.transforms import Window

TASKS = ('caption', 'referring', 'grounded')
Box = tuple[float, float, float, float]  # x0, y0, x1, y1, normalised to [0, 1]


class Region(NamedTuple):
  box: Box
  phrase: str


def locca_defaults() -> dict[str, Any]:
  """The `config.locca` section with its defaults (documented in the module docstring)."""
  return {'weight': 0.0, 'context_length': 32, 'bins': 100,
          'tasks': dict.fromkeys(TASKS, 1.0), 'min_visible': 0.5}


@dataclasses.dataclass(frozen=True)
class LoccaSpec:
  """What the pipeline needs to build decoder sequences (`locca_spec` builds it)."""
  tokenizer: CLIPTokenizer
  context_length: int = 32
  bins: int = 100
  task_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # in `TASKS` order
  min_visible: float = 0.5

  @property
  def text_vocab(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def vocab_size(self) -> int:
    """The decoder's vocabulary: text ids, box bins, the three task tokens."""
    return self.text_vocab + self.bins + len(TASKS)

  def task_token(self, task: str) -> int:
    return self.text_vocab + self.bins + TASKS.index(task)


def spec_of_decoder(decoder_vocab: int, context_length: int, tokenizer) -> LoccaSpec:
  """The token layout a trained LocCa decoder uses: its bins are what its vocabulary holds
  beyond the tokenizer's ids and the task tokens (for generation from a checkpoint)."""
  return LoccaSpec(tokenizer, context_length=context_length,
                   bins=decoder_vocab - tokenizer.vocab_size - len(TASKS))


def locca_spec(config: Mapping[str, Any], tokenizer) -> LoccaSpec | None:
  """`config.locca` -> LoccaSpec, or None when `weight` is 0 (LocCa off). Bad values are
  errors naming their key."""
  unknown = set(config) - set(locca_defaults())
  if unknown:
    raise ValueError(f'config.locca.{sorted(unknown)[0]} is not a key; known: '
                     f'{sorted(locca_defaults())}')
  values = {**locca_defaults(), **dict(config)}
  if not _is_number(values['weight']) or values['weight'] < 0:
    raise ValueError(f"config.locca.weight must be >= 0, got {values['weight']}")
  if not values['weight']:
    return None
  if not isinstance(tokenizer, CLIPTokenizer):
    raise ValueError(f'config.locca needs a CLIP BPE tokenizer (start and end of text '
                     f'tokens), the model has a {type(tokenizer).__name__}.')
  return LoccaSpec(tokenizer, _check_int(values, 'context_length', 8),
                   _check_int(values, 'bins', 2), _task_probs(values['tasks']),
                   _check_share(values['min_visible']))


def _check_int(values: Mapping[str, Any], key: str, least: int) -> int:
  value = values[key]
  if not isinstance(value, int) or value < least:
    raise ValueError(f'config.locca.{key} must be an integer >= {least}, got {value!r}')
  return value


def _check_share(value: Any) -> float:
  if not _is_number(value) or not 0 <= value <= 1:
    raise ValueError(f'config.locca.min_visible must be in [0, 1], got {value!r}')
  return float(value)


def _task_probs(tasks: Mapping[str, Any]) -> tuple[float, float, float]:
  unknown = set(tasks) - set(TASKS)
  if unknown:
    raise ValueError(f'config.locca.tasks.{sorted(unknown)[0]} is not a task; tasks: {TASKS}')
  weights = [tasks.get(task, 0.0) for task in TASKS]
  for task, w in zip(TASKS, weights):
    if not _is_number(w) or w < 0:
      raise ValueError(f'config.locca.tasks.{task} must be a finite number >= 0, got {w!r}')
  if not sum(weights):
    raise ValueError('config.locca.tasks are all 0; give at least one task a weight.')
  total = sum(weights)
  return (weights[0] / total, weights[1] / total, weights[2] / total)


# --- boxes -------------------------------------------------------------------------------

def box_tokens(box: Box, spec: LoccaSpec) -> np.ndarray:
  """x0, y0, x1, y1 in [0, 1] -> 4 coordinate token ids (out-of-range values clip)."""
  bins = np.clip(np.floor(np.asarray(box, np.float64) * spec.bins), 0, spec.bins - 1)
  return (spec.text_vocab + bins).astype(np.int32)


def box_from_tokens(tokens: Sequence[int], spec: LoccaSpec) -> Box | None:
  """4 coordinate tokens -> the box of their bins' centres; None when they are not 4
  coordinate tokens or the box is inverted (what a generated answer may be)."""
  values = [int(t) - spec.text_vocab for t in tokens]
  if len(values) != 4 or not all(0 <= v < spec.bins for v in values):
    return None
  x0, y0, x1, y1 = ((v + 0.5) / spec.bins for v in values)
  return (x0, y0, x1, y1) if x0 <= x1 and y0 <= y1 else None


def iou(a: Box, b: Box) -> float:
  """Intersection over union of two boxes (0 when both are empty)."""
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  inter = max(w, 0.0) * max(h, 0.0)
  union = _area(a) + _area(b) - inter
  return inter / union if union > 0 else 0.0


def _area(box: Box) -> float:
  return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def crop_box(box: Box, window: Window, width: int, height: int) -> tuple[Box, float]:
  """A box of the source image (normalised) in the crop `window` (source pixels) shows:
  (the box in the crop's normalised coordinates, clipped to it; the share of its area
  inside the crop)."""
  left, top, right, bottom = window
  x0, x1 = ((box[i] * width - left) / (right - left) for i in (0, 2))
  y0, y1 = ((box[i] * height - top) / (bottom - top) for i in (1, 3))
  full = (x0, y0, x1, y1)
  clip = lambda v: min(max(v, 0.0), 1.0)
  clipped = (clip(x0), clip(y0), clip(x1), clip(y1))
  area = _area(full)
  return clipped, (_area(clipped) / area if area > 0 else 0.0)


def visible_regions(regions: Sequence[Region], window: Window, width: int, height: int,
                    spec: LoccaSpec) -> list[Region]:
  """The regions mostly inside the crop (`min_visible`), with boxes in crop coordinates."""
  out = []
  for region in regions:
    box, visible = crop_box(region.box, window, width, height)
    if visible >= spec.min_visible and visible > 0:
      out.append(Region(box, region.phrase))
  return out


class BadObjects(ValueError):
  """A sample's json is unreadable or its `objects` are not a list of {box, phrase}."""


def objects_from_json(data: bytes) -> list[Region]:
  """The `objects` of a sample's json: [{"box": [x0, y0, x1, y1], "phrase": "..."}, ...],
  boxes normalised to the image, x0 < x1 and y0 < y1. No json or no key: no objects."""
  if not data:
    return []
  try:
    objects = json_object(data).get('objects', [])
  except BadJSON as e:
    raise BadObjects(str(e)) from None
  if not isinstance(objects, list):
    raise BadObjects(f'objects is a JSON {type(objects).__name__}, not a list')
  return [_region(item) for item in objects]


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _region(item: Any) -> Region:
  box = item.get('box') if isinstance(item, dict) else None
  phrase = item.get('phrase') if isinstance(item, dict) else None
  if not (isinstance(box, list) and len(box) == 4
          and all(_is_number(v) for v in box)):
    raise BadObjects(f'object {str(item)[:80]}: box must be 4 finite numbers')
  if not (box[0] < box[2] and box[1] < box[3]):
    raise BadObjects(f'object box {box}: needs x0 < x1 and y0 < y1')
  if not (isinstance(phrase, str) and phrase.strip()):
    raise BadObjects(f'object {str(item)[:80]}: phrase must be a non-empty string')
  return Region(tuple(float(v) for v in box), phrase)  # type: ignore[arg-type]


# --- sequences ---------------------------------------------------------------------------

def _text_ids(text: str, room: int, spec: LoccaSpec) -> tuple[list[int], bool]:
  """The text's ids cut to `room` (reading no more of it than can matter), and whether
  it was cut."""
  ids = spec.tokenizer.encode(text[:max_chars(room + 1)], limit=room + 1)
  return ids[:room], len(ids) > room


def _prompt(task: str, phrase_or_box: str | Box | None, spec: LoccaSpec
            ) -> tuple[list[int], bool]:
  head = [spec.tokenizer.sot_id, spec.task_token(task)]
  if task == 'caption':
    return head, False
  if task == 'referring':
    ids, cut = _text_ids(str(phrase_or_box), spec.context_length - 7, spec)
    return head + ids, cut
  if task == 'grounded':
    return head + box_tokens(phrase_or_box, spec).tolist(), False  # type: ignore[arg-type]
  raise ValueError(f'LocCa task must be one of {TASKS}, got {task!r}')


def prompt(task: str, phrase_or_box: str | Box | None, spec: LoccaSpec) -> np.ndarray:
  """The decoder's prefix for a task, from which it generates the rest (evaluation):
  [sot, CAP]; [sot, REF, phrase ids] (cut as in training); [sot, GRD, box tokens]."""
  return np.asarray(_prompt(task, phrase_or_box, spec)[0], np.int32)


def make_example(caption: str, regions: Sequence[Region], rng: np.random.Generator,
                 spec: LoccaSpec) -> tuple[np.ndarray, np.ndarray, bool]:
  """(decoder tokens, target mask, whether text was cut), each int32 [context_length].

  The task is drawn from `spec.task_probs`, then (referring, grounded) the region; an
  example without regions captions whatever was drawn.
  """
  task = TASKS[rng.choice(len(TASKS), p=spec.task_probs)]
  if task == 'caption' or not regions:
    head = _prompt('caption', None, spec)[0]
    answer, cut = _text_ids(caption, spec.context_length - 3, spec)
  else:
    region = regions[int(rng.integers(len(regions)))]
    if task == 'referring':
      head, cut = _prompt(task, region.phrase, spec)
      answer = box_tokens(region.box, spec).tolist()
    else:
      head = _prompt(task, region.box, spec)[0]
      answer, cut = _text_ids(region.phrase, spec.context_length - 7, spec)
  sequence = head + answer + [spec.tokenizer.eot_id]
  tokens = np.full(spec.context_length, spec.tokenizer.pad_id, np.int32)
  tokens[:len(sequence)] = sequence
  mask = np.zeros(spec.context_length, np.int32)
  mask[len(head):len(sequence)] = 1
  return tokens, mask, cut


# --- the demo's captions -----------------------------------------------------------------

_NOUNS = {**{shape: shape for shape in SHAPES}, **{shape + 's': shape for shape in SHAPES},
          **{plural: shape for shape, plural in PLURALS.items()}}


def shape_classes(text: str) -> set[str]:
  """The demo classes ('colour shape') a demo-style caption names: each colour word
  followed at once by a shape noun ('two small red stars at the top' -> {'red star'})."""
  words = re.findall(r'[a-z]+', text.lower())
  return {f'{colour} {_NOUNS[noun]}' for colour, noun in itertools.pairwise(words)
          if colour in COLOURS and noun in _NOUNS}
