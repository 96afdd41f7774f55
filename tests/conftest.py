"""Test environment: JAX on CPU with 8 fake devices, TensorFlow kept off any GPU."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The train-binary runs of the tests share one persistent JAX compilation cache: most of a
# short run is compiling the same demo step, which later runs then load (a 10-step demo
# run: 28.8 s cold, 11.8 s warm). Same executables, so the same numbers. In-process
# compiles (the TPU topology ones included) do not use it.
JAX_CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': str(ROOT / '.pytest_cache' / 'jax_compilation'),
                 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
  """A small demo dataset (train + eval shards, classnames.txt)."""
  from clip_jax.data.make_demo import make_demo
  root = tmp_path_factory.mktemp('demo_data')
  make_demo(str(root), train_samples=3000, eval_samples=400, samples_per_shard=300)
  return root


@pytest.fixture(scope='session')
def trained_demo(demo_data, tmp_path_factory):
  """A tiny model (`tiny` at 64 px) trained for 120 steps on the demo data by the train binary."""
  from tests import helpers  # imports this module: import it when the fixture runs
  workdir = tmp_path_factory.mktemp('trained_demo')
  helpers.run(helpers.train_cmd(workdir, '--config.total_steps=120', '--config.batch_size=64',
                  '--config.model.name=tiny', '--config.model.vision.image_size=64',
                  '--config.eval.zeroshot_shards=', '--config.checkpoint_every=1000',
                  config=helpers.demo_config(demo_data)), helpers.env(1), timeout=900)
  return workdir


def pytest_collection_modifyitems(items):
  """Slow tests first (stable otherwise). pytest-xdist's `load` scheduler hands each worker
  a block of consecutive tests (~90 of them), so with `-n 2` one worker runs the minutes-long
  end-to-end tests one after another while the other runs the quick ones; none starts last
  and runs alone. Dealing them out to both workers instead (`--maxschedchunk=1`) was slower
  (pytest 65 min against ~47 min on 2 cores): two demo trainings at once lose more to
  contention than one beside the quick tests."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
