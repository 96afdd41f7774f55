"""Bad evaluation samples are skipped and counted, as in training: one bad file never ends
an evaluation (or a training run at its periodic evaluation), and never goes unnoticed.

Kinds are the training reader's (`tar_samples.SKIP_REASONS`): an image that does not
decode is `bad_image` (`oversized_image` over the pixel cap), a `.json` that is not a JSON
object (or a label that is not a class index) `bad_caption`, a shard problem its own kind.
Each evaluation's counts are printed and saved with its results; the first few of each kind
are named in a warning.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from clip_jax import distributed
from clip_jax.data import tar_samples
from clip_jax.data.specs import parse_spec
from clip_jax.data.tar_samples import SKIP_REASONS, RawSample, Skip, read_shard
from clip_jax.data.transforms import decode_image, skip_kind

NAMED_PER_KIND = 5


class Skipped(collections.Counter):
  """Skipped samples by kind; `add` names the first `NAMED_PER_KIND` of each in a warning."""

  def add(self, kind: str, where: str, why: object = '') -> None:
    if kind not in SKIP_REASONS:
      raise ValueError(f'unknown skip kind {kind!r}; known: {", ".join(SKIP_REASONS)}')
    self[kind] += 1
    if self[kind] <= NAMED_PER_KIND:
      logging.warning('Skipped %s (%s)%s%s', where, kind, f': {why}' if why else '',
                      '; further ones are counted, not named' if self[kind] == NAMED_PER_KIND
                      else '')

  def add_skip(self, skip: Skip) -> None:
    self.add(skip.reason, skip.where)

  def as_dict(self) -> dict[str, int]:
    """This process's counts, in `SKIP_REASONS` order, zeros left out."""
    return {kind: self[kind] for kind in SKIP_REASONS if self[kind]}

  def summed(self) -> dict[str, int]:
    """The counts of all processes (a collective: every process calls it)."""
    total = distributed.sum_over_processes(np.array([self[k] for k in SKIP_REASONS], np.int64))
    return {kind: int(n) for kind, n in zip(SKIP_REASONS, total) if n}


def decoded(data: bytes, min_size: int | None, where: str, skipped: Skipped
            ) -> Image.Image | None:
  """The decoded RGB image, or None (counted and named, as `bad_image` or
  `oversized_image`: `transforms.skip_kind`) when it does not decode."""
  try:
    return decode_image(data, min_size)
  except Exception as e:  # PIL raises many types for corrupt data
    skipped.add(skip_kind(e), where, f'{type(e).__name__}: {e}')
    return None


def json_object(data: bytes, where: str, skipped: Skipped | None) -> dict[str, Any] | None:
  """A sample's `.json` as a dict (`tar_samples.json_object`), or None (counted as
  `bad_caption`) when it is not an object. `skipped=None` leaves the sample uncounted
  (another pass or process counts it)."""
  try:
    return tar_samples.json_object(data)
  except tar_samples.BadJSON as e:
    if skipped is not None:
      skipped.add('bad_caption', where, str(e))
    return None


def samples(spec: str, skipped: Skipped | None) -> Iterator[RawSample]:
  """The samples of a shard spec in order, as `tar_samples.read_samples`, with the reader's
  Skip records counted into `skipped` (None: not counted, another pass or process does)."""
  for source in parse_spec(spec):
    for shard in source.shards:
      for record in read_shard(shard):
        if isinstance(record, RawSample):
          yield record
        elif skipped is not None:
          skipped.add_skip(record)
