"""bench/gpu_step.py end to end on CPU (`--smoke`: the tiny preset, 2 steps): every kind of
variant runs in its own process and lands in the table and the JSON; missing packages
and an existing --json stop it before any compute; a variant over its time limit is
killed and its row says so."""

import importlib.util
import json
import math
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / 'bench' / 'gpu_step.py'


def _load():
  spec = importlib.util.spec_from_file_location('gpu_step', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules['gpu_step'] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # no TPU probe in every variant's process
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, timeout=1800, check=False)


def test_smoke_times_every_kind_of_variant(tmp_path):
  out = tmp_path / 'rows.json'
  result = _run('--smoke', '--attention', 'xla', '--budget', '1500', '--json', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [(r['side'], r['mode']) for r in rows] == [
      ('clip_jax', 'xla/unrolled'), ('clip_jax', 'xla/scanned'),
      ('open_clip', 'eager'), ('open_clip', 'compile')]
  for r in rows:
    assert 'error' not in r, r
    assert r['model'] == 'tiny' and r['batch'] == 4 and r['step_s'] > 0
    assert math.isfinite(r['loss']) and r['flops_per_pair'] == rows[0]['flops_per_pair']
  assert all(r['peak_bytes'] > 0 for r in rows if r['side'] == 'clip_jax')
  table = result.stdout[result.stdout.index('| variant |'):].splitlines()
  assert [line.split(' | ')[0] for line in table[2:]] == [
      '| clip_jax tiny xla/unrolled', '| clip_jax tiny xla/scanned', '| open_clip tiny eager',
      '| open_clip tiny compile']
  before = out.read_text()
  again = _run('--smoke', '--json', str(out))
  assert again.returncode == 2 and 'exists; not replaced' in again.stderr
  assert out.read_text() == before


def test_missing_packages_are_named_before_any_compute(monkeypatch, capsys):
  gpu_step = _load()
  monkeypatch.setitem(gpu_step.NEEDS, 'no_such_module_here', 'no-such-dist')
  monkeypatch.setattr(gpu_step, 'launch', lambda *a: (_ for _ in ()).throw(AssertionError))
  monkeypatch.setattr(sys, 'argv', ['gpu_step.py', '--smoke'])
  assert gpu_step.main() == 2
  error = capsys.readouterr().err
  assert 'needs no-such-dist' in error and '--help' in error
  assert 'pip download' in gpu_step.__doc__


def test_a_variant_over_its_time_limit_is_killed_and_says_so():
  gpu_step = _load()
  result = gpu_step.launch(gpu_step.Variant('clip_jax', 'tiny', 4, 'xla/unrolled'), 2, 0.05)
  assert result == {'error': 'over its time limit (0 s)'}
  assert 'over its time limit' in gpu_step.row(gpu_step.Variant('clip_jax', 'tiny', 4), result,
                                                 1.0)


def test_the_default_run_is_the_issue_matrix():
  """ViT-B-32 at 512, B-16 at 256, L-14 at 128 per GPU; auto and xla attention, unrolled
  and scanned; OpenCLIP eager and compiled; the matmul peak first."""
  gpu_step = _load()
  todo = gpu_step.variants(gpu_step.DEFAULT_MODELS, ['auto', 'xla'])
  assert todo[0].side == 'peak' and len(todo) == 1 + 3 * 6
  assert {(v.model, v.batch) for v in todo[1:]} == {('ViT-B-32', 512), ('ViT-B-16', 256),
                                                     ('ViT-L-14', 128)}
  assert {v.mode for v in todo if v.side == 'clip_jax'} == {
      'auto/unrolled', 'auto/scanned', 'xla/unrolled', 'xla/scanned'}
