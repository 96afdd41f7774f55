"""The README's main job: its config, its data (generated on first use), its model, the demo.

`configs/demo.py` generates the demo dataset itself (`make_demo.ensure_demo`), safely when
several processes of one launch do it at once; `clip_jax.demo` runs random-init and from a
checkpoint; the demo's model exports to OpenCLIP.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import clip_jax
from clip_jax import demo
from clip_jax.checkpoint import save_model
from clip_jax.data import make_demo as make_demo_module
from clip_jax.data.make_demo import ensure_demo, make_demo
from clip_jax.models.functional import get_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(train_samples=40, eval_samples=10, samples_per_shard=20)

# One process of a launch: waits for the start signal, then generates (slowly, so that both
# processes are generating at the same time and one of them loses the rename).
_RACER = f"""
import pathlib, sys, time
import clip_jax.data.make_demo as md
make_demo = md.make_demo
def slow_make_demo(*args, **kwargs):
  print('generating', flush=True)
  stats = make_demo(*args, **kwargs)
  time.sleep(1.0)
  return stats
md.make_demo = slow_make_demo
data, ready, go = sys.argv[1:]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
  time.sleep(0.005)
md.ensure_demo(data, **{SMALL!r})
"""


def _files(root):
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob('*') if p.is_file()}


def _demo_config():
  spec = importlib.util.spec_from_file_location('demo_config', ROOT / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ensure_demo_from_concurrent_processes_leaves_one_complete_dataset(tmp_path):
  data, go = tmp_path / 'cache' / 'demo_data', tmp_path / 'go'
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, '-c', _RACER, str(data), str(tmp_path / f'ready{i}'),
                             str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(2)]
  deadline = time.time() + 120
  while not all((tmp_path / f'ready{i}').exists() for i in range(2)) and time.time() < deadline:
    time.sleep(0.01)
  go.touch()
  outputs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
  assert all('generating' in out for out, _ in outputs)  # both generated; one rename lost
  assert [p.name for p in data.parent.iterdir()] == ['demo_data']  # no temporary left over
  make_demo(str(tmp_path / 'reference'), **SMALL)
  assert _files(data) == _files(tmp_path / 'reference')


def test_ensure_demo_keeps_an_existing_dataset_and_never_overwrites_other_files(
    tmp_path, monkeypatch):
  data = tmp_path / 'demo_data'
  ensure_demo(str(data), **SMALL)
  files = _files(data)
  mtimes = {p: p.stat().st_mtime_ns for p in data.rglob('*')}

  def fail(*args, **kwargs):
    raise AssertionError('the existing dataset was generated again')

  with monkeypatch.context() as m:
    m.setattr(make_demo_module, 'make_demo', fail)
    ensure_demo(str(data))
  assert _files(data) == files
  assert {p: p.stat().st_mtime_ns for p in data.rglob('*')} == mtimes

  other = tmp_path / 'other'  # something that is not a complete demo dataset
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(RuntimeError, match='no complete demo dataset'):
    ensure_demo(str(other), **SMALL)
  assert _files(other) == {'notes.txt': b'mine'}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['demo_data', 'other']


def test_demo_config_generates_its_data_and_takes_steps_and_data_dir(tmp_path, monkeypatch):
  made = []

  def small(output, **kwargs):
    made.append(output)
    return make_demo(output, **{**SMALL, **kwargs})

  monkeypatch.setattr(make_demo_module, 'make_demo', small)
  demo_config = _demo_config()
  data = tmp_path / 'demo_data'
  config = demo_config.get_config(f'steps=7,data_dir={data}')
  assert len(made) == 1 and (data / 'classnames.txt').exists()
  assert config.total_steps == 7 and config.model.name == 'tiny-demo'
  assert config.data.train == f'{data}/train/*.tar'
  assert config.eval.zeroshot_shards == f'{data}/eval/*.tar'
  assert config.eval.classnames == f'{data}/classnames.txt'
  assert demo_config.get_config(f'data_dir={data}').total_steps == 1000 and len(made) == 1
  naflex = demo_config.get_config(f'model=tiny-naflex,data_dir={data}')
  assert naflex.data.train == f'{data}_wide_and_tall/train/*.tar' and len(made) == 2


def test_the_naflex_demo_data_leaves_the_square_data_dir_free(tmp_path, monkeypatch):
  """`model=tiny-naflex` first, then the square demo on the same data_dir: both generate
  (the NaFlex set beside data_dir, not inside it, where it would block the square set)."""
  monkeypatch.setattr(make_demo_module, 'make_demo',
                      lambda output, **kwargs: make_demo(output, **{**SMALL, **kwargs}))
  demo_config = _demo_config()
  data = tmp_path / 'demo_data'
  demo_config.get_config(f'model=tiny-naflex,data_dir={data}')
  demo_config.get_config(f'data_dir={data}')
  assert (data / 'classnames.txt').exists() and (tmp_path / 'demo_data_wide_and_tall' /
                                                  'classnames.txt').exists()
  # A mistyped key fails naming the valid ones: tests/test_configs.py.


def test_demo_preset_exports_to_open_clip(tmp_path):
  import open_clip  # torch: imported here so the rest of this file stays torch-free

  from clip_jax.export import export
  from tests.jax_reference import jax_features, random_inputs
  from tests.reference import torch_features
  model = clip_jax.create_model('tiny-demo', seed=1)
  save_model(tmp_path / 'ckpt', model.cfg, get_params(model))
  out = export(str(tmp_path / 'ckpt'), str(tmp_path / 'open_clip'))
  torch_model, _, _ = open_clip.create_model_and_transforms(f'local-dir:{out}')
  cfg = model.cfg
  images, tokens = random_inputs(cfg.vision.image_size, cfg.text.context_length,
                                 cfg.text.vocab_size)
  for theirs, ours in zip(torch_features(torch_model.eval(), images, tokens),
                          jax_features(model, images, tokens)):
    assert float(np.abs(theirs - ours).max()) <= 1e-5


def _run_demo(monkeypatch, capsys, *argv):
  """`clip_jax.demo` in-process: (the model it classified with, its printed lines)."""
  used = []
  classify = demo.zero_shot

  def recording(model, *args):
    used.append(model)
    return classify(model, *args)

  monkeypatch.setattr(demo, 'zero_shot', recording)
  demo.main([*argv])
  return used[0], capsys.readouterr().out.strip().splitlines()


def _same_params(a, b):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, get_params(a), get_params(b))))


def test_demo_runs_from_random_init(monkeypatch, capsys):
  model, lines = _run_demo(monkeypatch, capsys, '--images', '6')
  assert len(lines) == 1 + 6 + 1
  assert 'random init' in lines[-1] and 'over 40 classes' in lines[-1]
  assert _same_params(model, clip_jax.create_model('tiny'))  # the preset, freshly initialised


def test_demo_loads_a_checkpoint(tmp_path, monkeypatch, capsys):
  saved = clip_jax.create_model('tiny-quickgelu', seed=3)
  save_model(tmp_path / 'ckpt', saved.cfg, get_params(saved))
  model, lines = _run_demo(monkeypatch, capsys, '--checkpoint', str(tmp_path / 'ckpt'),
                           '--images', '3')
  assert 'trained' in lines[-1]
  assert model.cfg == saved.cfg and _same_params(model, saved)  # the checkpoint's weights
  assert not _same_params(model, clip_jax.create_model('tiny-quickgelu'))
