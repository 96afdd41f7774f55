"""The command-line tools: a user error is one `error:` line and exit 2; success says what next.

Each binary is run as a subprocess, as a user runs it, on a mistake it can meet: the line
must name the flag or file to change, and no traceback may show (those are for bugs).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import clip_jax
from clip_jax import cli
from clip_jax.checkpoint import save_model
from clip_jax.export import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from clip_jax.models.functional import get_params


def _run(module: str, *args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
  environ = {k: v for k, v in os.environ.items() if k != 'CLIP_JAX_TRACEBACK'}
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        check=False, cwd=cwd, env={**environ, 'JAX_PLATFORMS': 'cpu', **env})


def _assert_user_error(result: subprocess.CompletedProcess, *names: str) -> None:
  """Exit 2 and exactly one stderr line, `error: ...`, naming every one of `names`."""
  assert 'Traceback' not in result.stderr, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  for name in names:
    assert name in lines[0], (name, lines[0])
  assert result.returncode == cli.EXIT_USER_ERROR, result.stderr


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  model = clip_jax.create_model('tiny')
  return save_model(tmp_path_factory.mktemp('cli') / 'tiny', model.cfg, get_params(model))


# (module, args, names the error line must hold); `{tmp}` is the test's tmp_path.
CASES = {
    'make_shards: no such --input': (
        'clip_jax.data.make_shards', ['--input', '{tmp}/photos', '--output', '{tmp}/o'],
        ['--input', 'photos']),
    'make_shards: csv without the --path_column': (
        'clip_jax.data.make_shards', ['--input', '{tmp}/pairs.csv', '--output', '{tmp}/o'],
        ['--path_column', 'pairs.csv']),
    'import: unknown --model': (
        'clip_jax.import_open_clip',
        ['--model', 'ViT-B-33', '--checkpoint', '{tmp}/w.safetensors', '--out', '{tmp}/o'],
        ['--model', 'ViT-B-33', 'ViT-B-32']),
    'import: unknown --override key': (
        'clip_jax.import_open_clip', ['--model', 'tiny', '--override', 'vison.layers=1',
                                      '--checkpoint', '{tmp}/w.safetensors', '--out', '{tmp}/o'],
        ['--override', 'vison']),
    'import: --checkpoint is no weights file': (
        'clip_jax.import_open_clip',
        ['--model', 'tiny', '--checkpoint', '{tmp}/garbage.safetensors', '--out', '{tmp}/o'],
        ['--checkpoint', 'garbage.safetensors']),
    'export: no checkpoint in --checkpoint': (
        'clip_jax.export', ['--checkpoint', '{tmp}/absent', '--out', '{tmp}/o'],
        ['--checkpoint', 'absent', 'holds no clip_jax checkpoint']),
    'evaluate: no such --classnames file': (
        'clip_jax.evaluate', ['--checkpoint', '{tmp}/absent', '--image_folder', '{tmp}',
                              '--classnames', '{tmp}/names.txt'],
        ['--classnames', 'names.txt']),
    'embed: --shards match nothing': (
        'clip_jax.embed', ['--checkpoint', '{tmp}/absent', '--shards', '{tmp}/s/{0..3}.tar',
                           '--out', '{tmp}/o'],
        ['--shards', '{tmp}/s/{0..3}.tar', 'matches no file']),
    'demo: unknown --model': ('clip_jax.demo', ['--model', 'tinyy'], ['--model', 'tinyy']),
    'train_tokenizer: no such --captions file': (
        'clip_jax.data.train_tokenizer', ['--captions', '{tmp}/caps.txt', '--vocab_size', '50',
                                          '--out', '{tmp}/t.model'],
        ['caps.txt']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_user_error_is_one_line_naming_the_flag_and_exit_2(case, tmp_path):
  module, args, names = CASES[case]
  save_file({'x': np.zeros(2, np.float32)}, str(tmp_path / 'w.safetensors'))
  (tmp_path / 'garbage.safetensors').write_text('not a safetensors file')
  (tmp_path / 'pairs.csv').write_text('path,caption\na.jpg,a cat\n')
  fill = lambda text: text.replace('{tmp}', str(tmp_path))
  _assert_user_error(_run(module, *map(fill, args)), *map(fill, names))


def test_a_bad_flag_value_is_refused_by_argparse_with_exit_2(tmp_path):
  result = _run('clip_jax.data.make_shards', '--input', str(tmp_path), '--output',
                str(tmp_path / 'o'), '--samples_per_shard', '0')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert "--samples_per_shard: expected a positive integer, got '0'" in result.stderr


def test_clip_jax_traceback_shows_the_traceback_of_a_user_error(tmp_path):
  result = _run('clip_jax.export', '--checkpoint', str(tmp_path / 'absent'), '--out',
                str(tmp_path / 'o'), CLIP_JAX_TRACEBACK='1')
  assert result.returncode == 1
  assert 'Traceback' in result.stderr and 'FileNotFoundError' in result.stderr


def test_export_then_import_print_what_they_wrote_and_the_next_command(tiny_checkpoint,
                                                                        tmp_path):
  exported = tmp_path / 'exported'
  result = _run('clip_jax.export', '--checkpoint', str(tiny_checkpoint), '--out', str(exported))
  assert result.returncode == 0, result.stderr
  count = sum(x.size for x in jax.tree.leaves(get_params(clip_jax.create_model('tiny'))))
  assert f'Exported {tiny_checkpoint} ({count:,} parameters) to {exported}' in result.stdout
  for name in (SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME):
    assert f'  {exported / name}\n' in result.stdout
  assert f"open_clip.create_model_and_transforms('local-dir:{exported}')" in result.stdout

  imported = tmp_path / 'imported'
  result = _run('clip_jax.import_open_clip', '--model', 'tiny', '--checkpoint',
                str(exported / SAFETENSORS_NAME), '--out', str(imported))
  assert result.returncode == 0, result.stderr
  assert (f'Imported {exported / SAFETENSORS_NAME} as tiny ({count:,} parameters) into the '
          f'clip_jax checkpoint {imported}') in result.stdout
  assert f'python -m clip_jax.evaluate --checkpoint {imported}' in result.stdout
  assert f'--config.init_from={imported}' in result.stdout

  again = _run('clip_jax.import_open_clip', '--model', 'tiny', '--checkpoint',
               str(exported / SAFETENSORS_NAME), '--out', str(imported))
  _assert_user_error(again, '--out', str(imported), 'already exists')


# --- the helpers, in process --------------------------------------------------------------

def test_user_errors_turns_a_user_error_into_one_line_and_keeps_bugs(capsys, monkeypatch):
  monkeypatch.delenv('CLIP_JAX_TRACEBACK', raising=False)

  @cli.user_errors
  def main(error):
    raise error

  with pytest.raises(SystemExit) as exit_:
    main(ValueError('--foo: bad\nsecond line'))
  assert exit_.value.code == 2
  assert capsys.readouterr().err == 'error: --foo: bad (second line)\n'
  with pytest.raises(SystemExit):
    main(FileNotFoundError(2, 'No such file or directory', 'x.txt'))
  assert capsys.readouterr().err == 'error: x.txt: No such file or directory\n'
  with pytest.raises(RuntimeError):  # a bug keeps its traceback
    main(RuntimeError('bug'))


def test_naming_prefixes_the_flag_and_keeps_the_kind():
  from clip_jax.convert.open_clip import CheckpointMismatchError

  def raised(flag, error):
    try:
      with cli.naming(flag):
        raise error
    except Exception as e:
      return e

  found = raised('--checkpoint', FileNotFoundError('/x holds nothing'))
  assert type(found) is FileNotFoundError and str(found) == '--checkpoint: /x holds nothing'
  found = raised('--checkpoint', CheckpointMismatchError('bad keys'))  # to its built-in base
  assert type(found) is ValueError and str(found) == '--checkpoint: bad keys'
  found = raised('--shards', ValueError('--shards_per_part must be positive'))
  assert str(found) == '--shards_per_part must be positive'  # holds the flag already
  error = KeyError('k')
  assert raised('--checkpoint', error) is error  # not a user error: untouched
