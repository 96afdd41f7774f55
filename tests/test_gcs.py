"""gs:// end to end against a local GCS emulator: shards, checkpoints, metrics, export,
evaluation results, embed.

Every client clip_jax writes through is pointed at the emulator by the environment of the
subprocesses (`_gcs_env`): etils.epath through gcsfs, orbax's arrays through tensorstore.
TensorFlow's own GCS client has no endpoint setting, so TensorBoard is off here
(docs/reliability.md, "Google Cloud Storage").
"""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from clip_jax.checkpoint import load_params
from clip_jax.convert.open_clip import params_to_open_clip
from clip_jax.export import SAFETENSORS_NAME
from tests import helpers

BUCKET = 'clip-jax-test'
# Constant lr: a run killed at any step and resumed with another total_steps matches a
# straight run of that length (as in tests/test_reliability.py).
COMMON = ['--config.log_every=1', '--config.batch_size=32', '--config.checkpoint_every=5',
          '--config.keep_checkpoints=100', '--config.optim.schedule=constant',
          f'--config.data.train=gs://{BUCKET}/train/*.tar',
          f'--config.eval.zeroshot_shards=gs://{BUCKET}/eval/*.tar',
          f'--config.eval.classnames=gs://{BUCKET}/classnames.txt', '--config.eval_every=1000']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _gcs_env(url):
  """Every GCS client of a clip_jax process pointed at the emulator, with no credentials
  and nothing that waits on Google's metadata server."""
  return helpers.env(1, EPATH_USE_TF='false',  # etils.epath: gcsfs (TF's gfile has no endpoint)
              STORAGE_EMULATOR_HOST=url,  # gcsfs
              GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',  # no gRPC bucket-layout lookup
              TENSORSTORE_GCS_HTTP_URL=url,  # orbax's array data
              GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator',  # tensorstore: no credential search
              NO_GCE_CHECK='true')  # google-auth: no metadata server probe


@pytest.fixture(scope='module')
def gcs(demo_data):
  """(url, gcsfs filesystem) of an in-memory emulator whose bucket holds the demo data."""
  # The plain client: gcsfs's default one asks a gRPC service for each bucket's layout.
  from gcsfs.core import GCSFileSystem
  port = _free_port()
  server = subprocess.Popen([sys.executable, '-m', 'tests.gcs_emulator', 'start', '--host',
                             '127.0.0.1', '--port', str(port), '--in-memory',
                             '--default-bucket', BUCKET],
                            env=helpers.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  for _ in range(100):
    try:
      urllib.request.urlopen(url, timeout=1).close()
      break
    except OSError:
      time.sleep(0.1)
  fs = GCSFileSystem(endpoint_url=url, token='anon')
  fs.put([str(p) for p in sorted((demo_data / 'train').glob('*.tar'))[:3]], f'{BUCKET}/train/')
  fs.put([str(p) for p in sorted((demo_data / 'eval').glob('*.tar'))[:1]], f'{BUCKET}/eval/')
  fs.put(str(demo_data / 'classnames.txt'), f'{BUCKET}/classnames.txt')
  yield url, fs
  server.kill()
  server.wait()


def _wait_for_checkpoint(fs, workdir, process, log, timeout=300):
  """The first finalized step under gs://workdir/checkpoints (orbax writes
  commit_success.txt into a step directory last on GCS)."""
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    fs.invalidate_cache()
    done = fs.glob(f'{workdir}/checkpoints/*/commit_success.txt')
    if done:
      return
    time.sleep(0.2)
  raise TimeoutError(f'no checkpoint in gs://{workdir} (exit code {process.poll()}): '
                     f'{log.read_text()[-3000:]}')


def _logged(consoles, cmd, env):
  result = helpers.run(cmd, env)
  consoles.append(result.stderr)
  return result


@pytest.mark.slow
def test_train_on_gcs_killed_resumes_and_exports(gcs, demo_data, tmp_path):
  """Shards, checkpoints and metrics on gs://: SIGKILL after a checkpoint, resume, losses
  of a straight run, then export from (and to) gs://."""
  url, fs = gcs
  consoles = []  # stderr of every command that finished
  env, config, workdir = _gcs_env(url), helpers.demo_config(demo_data), f'{BUCKET}/run'
  with (tmp_path / 'killed.log').open('w') as log:
    process = subprocess.Popen(
        helpers.train_cmd(f'gs://{workdir}', '--config.total_steps=10000', *COMMON, config=config),
        env=env, stdout=subprocess.DEVNULL, stderr=log)
  _wait_for_checkpoint(fs, workdir, process, tmp_path / 'killed.log')
  process.send_signal(signal.SIGKILL)
  process.wait()
  fs.invalidate_cache()
  saved = max(int(p.rsplit('/', 2)[-2]) for p in
              fs.glob(f'{workdir}/checkpoints/*/commit_success.txt'))
  # Steps after `saved` may be in metrics.jsonl already (it is uploaded at each save); the
  # resumed run replays them and goes 4 steps further.
  logged = helpers.parse_metrics(fs.cat(f'{workdir}/metrics.jsonl').decode())
  total = max(saved, *logged) + 4

  result = _logged(consoles, helpers.train_cmd(f'gs://{workdir}', f'--config.total_steps={total}',
                                         *COMMON, config=config), env)
  assert 'Resuming from' in result.stderr and f'step {saved}' in result.stderr
  straight = tmp_path / 'straight'
  _logged(consoles, helpers.train_cmd(straight, f'--config.total_steps={total}', *COMMON,
                                config=config), env)
  fs.invalidate_cache()
  resumed = helpers.parse_metrics(fs.cat(f'{workdir}/metrics.jsonl').decode())
  expected = helpers.metrics(straight)
  assert sorted(resumed) == sorted(expected) == list(range(1, total + 1))
  for step in expected:
    assert resumed[step]['loss'] == expected[step]['loss'], step
  assert resumed[total]['zeroshot_top1'] == expected[total]['zeroshot_top1']
  assert fs.exists(f'{workdir}/config.json')

  _logged(consoles, [sys.executable, '-m', 'clip_jax.export', '--checkpoint', f'gs://{workdir}',
        '--out', f'gs://{BUCKET}/export'], env)
  fs.get(f'{BUCKET}/export/{SAFETENSORS_NAME}', str(tmp_path / SAFETENSORS_NAME))
  from safetensors.numpy import load_file
  exported = load_file(tmp_path / SAFETENSORS_NAME)
  cfg, params = load_params(straight)
  for key, value in params_to_open_clip(cfg, params).items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)

  # The evaluator reads gs:// shards and class names and writes its results into gs://.
  evaluate = [sys.executable, '-m', 'clip_jax.evaluate', '--templates', 'simple',
              '--zeroshot_shards', f'gs://{BUCKET}/eval/*.tar',
              '--classnames', f'gs://{BUCKET}/classnames.txt']
  _logged(consoles, [*evaluate, '--workdir', f'gs://{workdir}'], env)
  _logged(consoles, [*evaluate, '--workdir', str(straight)], env)
  fs.invalidate_cache()
  results = fs.glob(f'{workdir}/checkpoints/{total}/eval_results.json')
  assert results, fs.ls(f'{workdir}/checkpoints/{total}')
  local = next(straight.glob(f'checkpoints/{total}/eval_results.json')).read_text()
  assert json.loads(fs.cat(results[0]))['zeroshot'] == json.loads(local)['zeroshot']

  # Embeddings from gs:// shards and checkpoint into gs://, as a local run of the straight one.
  embed = [sys.executable, '-m', 'clip_jax.embed', '--shards', f'gs://{BUCKET}/eval/*.tar']
  _logged(consoles, [*embed, '--checkpoint', f'gs://{workdir}', '--out', f'gs://{BUCKET}/emb'], env)
  _logged(consoles, [*embed, '--checkpoint', str(straight), '--out', str(tmp_path / 'emb')], env)
  for name in ('img_emb/img_emb_0.npy', 'text_emb/text_emb_0.npy'):
    local = np.load(tmp_path / 'emb' / name)
    assert len(local) > 0
    np.testing.assert_array_equal(np.load(fs.open(f'{BUCKET}/emb/{name}')), local, err_msg=name)
  assert fs.cat(f'{BUCKET}/emb/metadata/metadata_0.parquet') == (
      tmp_path / 'emb' / 'metadata' / 'metadata_0.parquet').read_bytes()
  for noise in helpers.LIBRARY_NOISE:  # gcsfs's async sessions, orbax's metadata on gs://
    assert not [console for console in consoles if noise in console], noise
