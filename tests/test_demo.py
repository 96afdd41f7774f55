"""The README's main-job command runs end to end, random-init and from a checkpoint."""

import subprocess
import sys

import clip_jax
from clip_jax.checkpoint import save_model
from clip_jax.models.functional import get_params


def test_demo_runs_from_random_init():
  result = subprocess.run([sys.executable, '-m', 'clip_jax.demo', '--images', '6'],
                          capture_output=True, text=True, check=True)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 + 6 + 1
  assert 'random init' in lines[-1] and 'over 40 classes' in lines[-1]


def test_demo_loads_a_checkpoint(tmp_path):
  model = clip_jax.create_model('tiny-quickgelu', seed=3)
  save_model(tmp_path / 'ckpt', model.cfg, get_params(model))
  result = subprocess.run([sys.executable, '-m', 'clip_jax.demo', '--checkpoint',
                           str(tmp_path / 'ckpt'), '--images', '3'],
                          capture_output=True, text=True, check=True)
  assert 'trained' in result.stdout.splitlines()[-1]
