"""What several test modules share: running the train binary, reading its metrics, building
a config and its train program in-process, random batches."""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import jax
import ml_collections
import numpy as np
from PIL import Image

from clip_jax import run_config, sharding
from clip_jax import step as step_lib
from clip_jax.checkpoint import load_params
from clip_jax.config_base import base_config
from tests.conftest import JAX_CACHE_ENV, ROOT

DEMO_CONFIG = str(ROOT / 'configs' / 'demo.py')
# Library noise that used to reach the console of the project's own commands.
LIBRARY_NOISE = ('Metadata file does not exist',  # orbax, asked for a step's metadata in an item
                 'Event loop is closed',  # an async GCS client's session closed after its loop
                 'leaked shared_memory')  # multiprocessing's resource tracker at exit


# --- the train binary as a subprocess -------------------------------------------------------

def env(devices=8, **extra):
  """The binaries' environment: JAX on CPU with `devices` fake devices, the shared cache."""
  environment = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT),
                     XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                     **JAX_CACHE_ENV)
  environment.update(extra)
  return environment


def demo_config(demo_dir):
  """The demo config on the test's small demo dataset (it generates none when it exists)."""
  return f'{DEMO_CONFIG}:data_dir={demo_dir}'


def train_cmd(workdir, *overrides, config):
  """The train binary's command line. TensorBoard is off unless an override turns it on: its
  writer imports TensorFlow (~4 s a process); test_demo_config_learns checks it."""
  return [sys.executable, '-m', 'clip_jax.train', '--config', config, '--workdir', str(workdir),
          '--config.tensorboard=False', *overrides]


def overrides(steps, *extra):
  return [f'--config.total_steps={steps}', *extra]


def run(cmd, environment, timeout=600):
  """Runs `cmd`; fails the test with the end of its stderr unless it exits 0."""
  result = subprocess.run(cmd, env=environment, capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def metrics(workdir):
  """step -> its logged record: the lines of one step (train, eval) merged. Each step is in the
  file once: a resumed run drops the lines it replays (MetricLogger's start_step)."""
  return parse_metrics((pathlib.Path(workdir) / 'metrics.jsonl').read_text())


def parse_metrics(text):
  records = {}
  for line in text.splitlines():
    record = json.loads(line)
    records.setdefault(record['step'], {}).update(record)
  return records


def wait_for_step(workdir, step, timeout=300):
  """Polls metrics.jsonl until a running training process has logged `step`."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (workdir / 'metrics.jsonl').exists() and max(metrics(workdir), default=0) >= step:
      return
    time.sleep(0.2)
  raise TimeoutError(f'{workdir} never reached step {step}')


def killed_and_restarted(tmp_path, common, config, steps, kill_at):
  """The train binary with `common` overrides twice: straight into tmp_path/'straight', and
  into tmp_path/'killed' SIGKILLed once step `kill_at` is logged, then restarted with the
  same command. Checks that both logged steps 1..`steps` with the same losses and end with
  the same params (BatchNorm statistics included); returns their metrics."""
  run(train_cmd(tmp_path / 'straight', *common, config=config), env())
  workdir = tmp_path / 'killed'
  process = subprocess.Popen(train_cmd(workdir, *common, config=config), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_step(workdir, kill_at)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert max(metrics(workdir)) < steps, 'the run finished before it could be killed'
  run(train_cmd(workdir, *common, config=config), env())
  straight, resumed = metrics(tmp_path / 'straight'), metrics(workdir)
  assert sorted(straight) == sorted(resumed) == list(range(1, steps + 1))
  for step in straight:
    assert resumed[step]['loss'] == straight[step]['loss'], step
  (_, a), (_, b) = load_params(tmp_path / 'straight'), load_params(workdir)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  return straight, resumed


def jpeg(seed, height=48, width=None):
  """JPEG bytes of a random `height` x `width` (default square) image."""
  pixels = np.random.default_rng(seed).integers(0, 255, (height, width or height, 3),
                                                dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG')
  return buffer.getvalue()


def write_tar(path, members):
  """A tar file of (member name, bytes) in order, as webdataset shards hold samples."""
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


# --- in-process configs and steps ---------------------------------------------------------

def synthetic_config(**flat) -> ml_collections.ConfigDict:
  """`base_config()` on synthetic data with `flat` ('optim.lr': ...) set."""
  c = base_config()
  c.data.kind = 'synthetic'
  c.update_from_flattened_dict(flat)
  return c


def program(config, mesh=None, tx=None) -> step_lib.Program:
  """`config`'s train program (model, fresh state, jitted step), on all devices by default;
  `tx` replaces the config's optimizer."""
  mesh = mesh or sharding.make_mesh({'data': -1})
  return step_lib.build(run_config.resolve(config, mesh.size), mesh, tx=tx)


def random_batch(size, cfg, seed=0):
  """Random uint8 images and tokens ending in the EOT token (the highest id: argmax pooling
  reads it)."""
  rng = np.random.default_rng(seed)
  size_px, context, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
  text = rng.integers(1, vocab - 1, (size, context)).astype(np.int32)
  text[:, -1] = vocab - 1
  return {'image': rng.integers(0, 255, (size, size_px, size_px, 3), dtype=np.uint8),
          'text': text}



class FakeLoader:
  """The input pipeline's checkpoint interface (`Loader`'s): a position to save and
  restore, and the data workers a checkpoint records."""

  workers = 0

  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = state['position']
