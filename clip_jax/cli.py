"""What every command-line tool does with a user's mistake: one line on stderr, exit status 2.

A user error is a bad flag, file, key or value: the library raises it as one of
`USER_ERRORS` with a message that names what to change. The binaries' `main` functions are
wrapped in `user_errors`, so such an error ends the process with `error: MESSAGE` instead of
a traceback; tracebacks are kept for bugs (any other exception type).
`CLIP_JAX_TRACEBACK=1` shows the traceback of a user error too.

absl binaries (`train`, `aot`) also parse `--config` and `--config.KEY=VALUE` flags:
`absl_flags_parser` turns a bad flag or config key into the same one line, naming the full
key path and the nearest valid key (`optim.lrr: did you mean optim.lr?`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError)
EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
  """Ends the process as a user error: `error: message` on stderr, exit status 2."""
  first, *rest = str(message).strip().splitlines() or ['']
  print(f'error: {first}' + (f' ({" ".join(r.strip() for r in rest)})' if rest else ''),
        file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def positive_int(text: str) -> int:
  """argparse `type=` for counts and sizes: 0 or -1 is refused at parse time, with usage."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
  return value


def user_errors(main: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates a binary's `main`: a `USER_ERRORS` exception becomes one line and exit 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except USER_ERRORS as e:
      if os.environ.get('CLIP_JAX_TRACEBACK'):
        raise
      fail(_message(e))

  return wrapped


@contextlib.contextmanager
def naming(flag: str) -> Iterator[None]:
  """Prefixes `flag` to a user error raised inside (`--checkpoint: MESSAGE`), so that the line
  says which flag to change even where the library's message only names a path.

  The error keeps its built-in kind (a subclass becomes its `USER_ERRORS` base); a message
  that already names the flag is left as it is.
  """
  try:
    yield
  except USER_ERRORS as e:
    message = _message(e)
    if flag in message:
      raise
    kind = next(k for k in USER_ERRORS if isinstance(e, k))
    raise kind(f'{flag}: {message}') from e


def _message(e: BaseException) -> str:
  # FileNotFoundError from open() carries (errno, strerror, filename): say the file.
  if isinstance(e, OSError) and e.filename and e.strerror:
    return f'{e.filename}: {e.strerror}'
  return str(e)


def absl_flags_parser(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=absl_flags_parser)`: flag and config-key errors as one line.

  ml_collections reports an unknown `--config.KEY` as an unknown flag or as a nested
  KeyError/AttributeError; here it names the key path as typed and the closest valid path.
  """
  from absl import flags

  config_file = _flag_value(argv, 'config').split(':', 1)[0]
  if config_file and not os.path.isfile(config_file):  # ml_collections defers this error
    fail(f'--config {config_file}: no such config file (the recipes are configs/*.py)')
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    key, valid = _bad_config_key(argv, flags.FLAGS)
    if key is not None:
      fail(_unknown_key_message(key, valid))
    if isinstance(e, flags.Error):
      cause = _config_file_error(e)
      if cause is not None:  # a config file's get_config rejected its :ARGS
        fail(f'--config {_flag_value(argv, "config")}: {_message(cause)}')
      fail(f'{e} (--help lists the flags)')
    raise


def _config_file_error(error: BaseException) -> BaseException | None:
  """The user error a config file's `get_config` raised, under the wrappers: absl wraps
  ml_collections' re-raise, which carries the original's traceback as text."""
  e: BaseException | None = error
  while e is not None:
    if isinstance(e, USER_ERRORS) and not str(e).startswith('Error whilst parsing config'):
      return e
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  return None


def _flag_value(argv: list[str], name: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _load_config_file(spec: str) -> Any:
  """`get_config(ARGS)` of the config file `PATH[:ARGS]`; None when it does not load."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('clip_jax_config_file', path)
  if module_spec is None or module_spec.loader is None:
    return None
  try:
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # a broken file: the caller re-raises the parse error
    return None


def _bad_config_key(argv: list[str], flag_values) -> tuple[str | None, list[str]]:
  """The first `--config.KEY=...` whose KEY the loaded config does not have, and its keys."""
  config = flag_values['config'].value if 'config' in flag_values else None
  if config is None and _flag_value(argv, 'config'):
    # ml_collections reads the overrides from sys.argv while it parses --config itself: a
    # bad key fails that parse, and the flag has no value. Load the file (with :ARGS) alone.
    config = _load_config_file(_flag_value(argv, 'config'))
  if config is None:
    return None, []
  valid = flatten_keys(config)
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in valid:
        return key, valid
  return None, valid


def flatten_keys(config: Any, prefix: str = '') -> list[str]:
  """Every leaf and node key of a ConfigDict as a dotted path (`optim.lr`, `model.vision`)."""
  keys = []
  for name, value in config.items():
    path = f'{prefix}{name}'
    keys.append(path)
    if hasattr(value, 'items') and not isinstance(value, dict):
      keys.extend(flatten_keys(value, f'{path}.'))
  return keys


def _unknown_key_message(key: str, valid: list[str]) -> str:
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
  if close:
    return f'--config.{key}: no such key; did you mean {close[0]}?'
  parent = key.rpartition('.')[0]
  siblings = sorted(k.rpartition('.')[2] for k in valid
                    if k.rpartition('.')[0] == parent and k != parent)
  return f'--config.{key}: no such key; {parent or "the config"} has: {", ".join(siblings)}'


def config_flag():
  """The `--config` flag of the binaries that take a training config (`train`, `aot`):
  `configs/NAME.py[:ARGS]`, locked, with `--config.KEY=VALUE` overrides. Defined on first
  use, as both binaries take the same flag and one process may import both (tests do)."""
  from absl import flags
  from ml_collections import config_flags

  if 'config' in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS['config'])
  return config_flags.DEFINE_config_file(
      'config', None, 'Training config file, configs/NAME.py[:ARGS].', lock_config=True)
