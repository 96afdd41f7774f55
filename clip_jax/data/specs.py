"""Shard specs: brace expansion, globs, lists and weighted mixtures.

  'dir/{00000..01023}.tar'                 -> 1024 paths (zero padding kept)
  'dir/part-{a,b}/*.tar'                   -> lists and globs
  'laion/{0..9}.tar::cc12m/{0..3}.tar'     -> two sources, mixed by `weights` ('1::2')

Paths go through `etils.epath`, so `gs://bucket/...` works like a local path.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
from collections.abc import Sequence

from etils import epath

Spec = str | Sequence[str]
_BRACE = re.compile(r'\{([^{}]*)\}')
_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)$')


@dataclasses.dataclass(frozen=True)
class Source:
  """One mixture component: its spec text, its expanded shard paths, its weight, and which
  of those shards did not exist when the spec was parsed."""
  spec: str
  shards: tuple[str, ...]
  weight: float
  missing: tuple[str, ...] = ()


def expand_braces(pattern: str) -> list[str]:
  """`a{0..2}b{x,y}` -> a0bx a0by a1bx ...; `{007..010}` keeps the zero padding."""
  match = _BRACE.search(pattern)
  if not match:
    return [pattern]
  body = match.group(1)
  range_match = _RANGE.match(body)
  if range_match:
    lo_text, hi_text = range_match.groups()
    lo, hi = int(lo_text), int(hi_text)
    if hi < lo:
      raise ValueError(f'Empty brace range {{{body}}} in {pattern!r}')
    width = len(lo_text) if lo_text.startswith('0') and len(lo_text) > 1 else 0
    options = [str(i).zfill(width) for i in range(lo, hi + 1)]
  else:
    options = body.split(',')
  head, tail = pattern[:match.start()], pattern[match.end():]
  return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in options))


def _expand_glob(path: str) -> list[str]:
  """Glob patterns -> matching files; a plain path is kept even if missing (see below)."""
  if not any(c in path for c in '*?['):
    return [path]
  parent = epath.Path(path).parent
  if any(c in str(parent) for c in '*?['):
    raise ValueError(f'Globs are only supported in the file name: {path!r}')
  return sorted(str(p) for p in parent.glob(epath.Path(path).name)) if parent.exists() else []


def expand_component(spec: Spec) -> list[str]:
  """All existing shard paths of one component, in spec order, without duplicates."""
  patterns = [spec] if isinstance(spec, str) else list(spec)
  paths = []
  for pattern in patterns:
    for candidate in expand_braces(pattern.strip()):
      paths.extend(_expand_glob(candidate))
  return list(dict.fromkeys(paths))


def missing_paths(paths: Sequence[str]) -> list[str]:
  """The paths that do not exist, in order. Each parent directory is listed once, so a
  range of 10,000 shards on gs:// costs a listing, not 10,000 requests."""
  by_parent = collections.defaultdict(list)
  for path in paths:
    by_parent[str(epath.Path(path).parent)].append(path)
  missing: set[str] = set()
  for parent, children in by_parent.items():
    parent_path = epath.Path(parent)
    present = {p.name for p in parent_path.iterdir()} if parent_path.is_dir() else set()
    missing.update(c for c in children if epath.Path(c).name not in present)
  return [p for p in paths if p in missing]


def parse_weights(weights: str | Sequence[float] | None, n: int) -> list[float]:
  if weights is None or weights == '':
    return [1.0] * n
  values = [float(w) for w in (weights.split('::') if isinstance(weights, str) else weights)]
  if len(values) != n or any(w <= 0 for w in values):
    raise ValueError(f'data.weights {weights!r} must give {n} positive weights, one per '
                     '"::"-separated source.')
  return values


def parse_spec(spec: Spec, weights: str | Sequence[float] | None = None) -> list[Source]:
  """Spec -> sources; a component that matches no existing file is an error naming it.

  Individually missing shards stay in the list (and in `Source.missing`): the reader counts
  them as `unreadable_shard` (as it does a shard that vanishes mid-run) instead of failing.
  """
  components = spec.split('::') if isinstance(spec, str) else [spec]
  sources = []
  for component, weight in zip(components, parse_weights(weights, len(components))):
    shards = expand_component(component)
    missing = missing_paths(shards)
    if len(missing) == len(shards):
      raise FileNotFoundError(f'Shard spec {component!r} matches no file.')
    sources.append(Source(str(component), tuple(shards), weight, tuple(missing)))
  return sources
