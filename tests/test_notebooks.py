"""The Colab notebooks run top to bottom (nbclient), offline, on a tiny trained model."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from safetensors.numpy import save_file

from tests.reference import open_clip_model, state_dict_numpy

COLABS = pathlib.Path(__file__).resolve().parents[1] / 'colabs'


def _execute(name, monkeypatch, **env):
  # The kernel must import this checkout's clip_jax (never the notebook's network install).
  monkeypatch.setenv('PYTHONPATH', str(COLABS.parent))
  # One JAX device, as on Colab (the test session's 8 fake ones slow the kernel's steps).
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  for key, value in env.items():
    monkeypatch.setenv(key, str(value))
  notebook = nbformat.read(COLABS / f'{name}.ipynb', as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(COLABS)}}).execute()
  return notebook


def _text(notebook):
  return '\n'.join(o.get('text', '') for o in _outputs(notebook))


def _figures(notebook):
  return sum('image/png' in o.get('data', {}) for o in _outputs(notebook))


def _outputs(notebook):
  return [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]


@pytest.mark.slow
def test_zero_shot_demo_notebook_with_a_clip_jax_checkpoint(trained_demo, monkeypatch):
  output = _text(_execute('zero_shot_demo', monkeypatch, CLIP_JAX_CHECKPOINT=trained_demo))
  assert '64 px images' in output and '.jpg' in output


@pytest.mark.slow
def test_zero_shot_demo_notebook_imports_an_open_clip_checkpoint(tmp_path, monkeypatch):
  weights = tmp_path / 'open_clip_tiny.safetensors'
  save_file(state_dict_numpy(open_clip_model('tiny')), str(weights))
  output = _text(_execute('zero_shot_demo', monkeypatch, OPEN_CLIP_WEIGHTS=weights,
                          OPEN_CLIP_MODEL='tiny', CLIP_JAX_CHECKPOINT=tmp_path / 'unused'))
  assert '32 px images' in output


@pytest.mark.slow
def test_train_demo_notebook(demo_data, tmp_path, monkeypatch):
  notebook = _execute('train_demo', monkeypatch, CLIP_JAX_DEMO_STEPS=20,
                      CLIP_JAX_WORKDIR=tmp_path / 'run', CLIP_JAX_DEMO_DIR=demo_data)
  output = _text(notebook)
  assert 'first loss' in output and 'zero-shot top-1' in output
  assert '20/20' in output  # the step bar: a kernel's stderr is no tty, yet it shows there
  assert _figures(notebook) == 1  # the loss and the zero-shot accuracy, side by side
  assert (tmp_path / 'run' / 'checkpoints' / '20').is_dir()
