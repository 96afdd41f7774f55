"""Pod-scale faults rehearsed on one machine: preemption of one process, damaged
checkpoints, a changed process count, bad shards in a real run."""

import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time
import weakref

import numpy as np
import pytest

from clip_jax import sharding
from clip_jax import train as train_lib
from clip_jax.checkpoint import load_params
from clip_jax.config_base import base_config
from clip_jax.data.tokenizers import tokenizer_from_spec
from clip_jax.eval import inputs as inputs_lib
from clip_jax.eval import zeroshot
from clip_jax.eval.encoder import Encoder
from clip_jax.models.functional import FunctionalModel
from tests import helpers
from tests.conftest import ROOT

# A constant schedule makes the learning rate of a step independent of `total_steps`, so a
# run stopped early and resumed with another `total_steps` can match an uninterrupted one.
COMMON = ['--config.log_every=1', '--config.eval.zeroshot_shards=', '--config.batch_size=32',
          '--config.checkpoint_every=1000', '--config.optim.schedule=constant']


def _launch(workdir, nproc, devices, *overrides, demo_dir, log_dir):
  """`launch/local.sh NPROC DEVICES -- train args` as a running process."""
  env = helpers.env(PYTHON=sys.executable, CLIP_JAX_LOG_DIR=str(log_dir))
  env.pop('XLA_FLAGS')
  cmd = helpers.train_cmd(workdir, *overrides, config=helpers.demo_config(demo_dir))[3:]
  return subprocess.Popen([str(ROOT / 'launch' / 'local.sh'), str(nproc), str(devices), '--',
                           *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(process, log_dir, timeout=600):
  """Waits for a launch; returns (returncode, process 0's stderr, process 1's log)."""
  _, stderr = process.communicate(timeout=timeout)
  log_1 = pathlib.Path(log_dir) / 'clip_jax_proc_1.log'
  return process.returncode, stderr, log_1.read_text() if log_1.exists() else ''


def _launched(*args, **kwargs):
  returncode, stderr, log_1 = _finish(_launch(*args, **kwargs), kwargs['log_dir'])
  assert returncode == 0, stderr[-2000:] + log_1[-2000:]
  return stderr, log_1


def _train_process(workdir, process_id):
  """The pid of the training process `process_id` that writes to `workdir`."""
  for proc in pathlib.Path('/proc').iterdir():
    try:
      cmdline = (proc / 'cmdline').read_bytes().split(b'\0')
      environ = (proc / 'environ').read_bytes().split(b'\0')
    except OSError:
      continue
    if (b'clip_jax.train' in cmdline and str(workdir).encode() in cmdline
        and f'CLIP_JAX_PROCESS_ID={process_id}'.encode() in environ):
      return int(proc.name)
  raise LookupError(f'no training process {process_id} for {workdir}')


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir()
                if p.name.isdigit())


def _assert_same_losses(resumed, straight, rtol=1e-5):
  assert sorted(resumed) == sorted(straight)
  for step in straight:
    np.testing.assert_allclose(resumed[step]['loss'], straight[step]['loss'], rtol=rtol,
                               err_msg=f'step {step}')


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step(demo_data, tmp_path):
  """Only process 1 is told: both checkpoint the same step and exit 0; a restart continues
  with the losses of an uninterrupted two-process run."""
  total = 20
  _launched(tmp_path / 'straight', 2, 2, *helpers.overrides(total, *COMMON), demo_dir=demo_data,
            log_dir=tmp_path / 'logs_straight')

  workdir, logs = tmp_path / 'run', tmp_path / 'logs_run'
  process = _launch(workdir, 2, 2, *helpers.overrides(10_000, *COMMON), demo_dir=demo_data,
                    log_dir=logs)
  helpers.wait_for_step(workdir, 3)
  os.kill(_train_process(workdir, 1), signal.SIGTERM)
  start = time.monotonic()
  returncode, stderr, log_1 = _finish(process, logs, timeout=180)
  assert returncode == 0, stderr[-2000:] + log_1[-2000:]
  assert time.monotonic() - start < 120
  assert 'Preemption notice' in stderr and 'Preemption notice' in log_1
  stopped = max(helpers.metrics(workdir))
  assert _checkpoint_steps(workdir) == [stopped] and stopped < total
  for process_id in (0, 1):  # both processes stored their input position for that step
    assert (workdir / 'checkpoints' / str(stopped) / 'data' /
            f'process_{process_id}-of-2.json').is_file()

  _launched(workdir, 2, 2, *helpers.overrides(total, *COMMON), demo_dir=demo_data, log_dir=logs)
  _assert_same_losses(helpers.metrics(workdir), helpers.metrics(tmp_path / 'straight'), rtol=1e-4)


def _damage(checkpoint: pathlib.Path) -> pathlib.Path:
  """Cuts the largest data file of a checkpoint's params in half (a torn upload)."""
  victim = max((p for p in (checkpoint / 'params').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = victim.read_bytes()
  victim.write_bytes(data[:len(data) // 2])
  return victim


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(
    demo_data, tmp_path):
  common = [*COMMON, '--config.checkpoint_every=5']
  config = helpers.demo_config(demo_data)
  helpers.run(helpers.train_cmd(tmp_path / 'straight', *helpers.overrides(15, *common),
                                config=config), helpers.env(1))
  workdir = tmp_path / 'run'
  helpers.run(helpers.train_cmd(workdir, *helpers.overrides(10, *common), config=config),
              helpers.env(1))
  assert _checkpoint_steps(workdir) == [5, 10]
  _damage(workdir / 'checkpoints' / '10')

  result = helpers.run(helpers.train_cmd(workdir, *helpers.overrides(15, *common),
                                         config=config), helpers.env(1))
  assert f'CHECKPOINT {workdir}/checkpoints/10 DOES NOT RESTORE' in result.stderr
  assert (workdir / 'checkpoints' / '10.unreadable' / 'params').is_dir()  # kept, not deleted
  assert 'Resuming from' in result.stderr and 'step 5' in result.stderr
  assert _checkpoint_steps(workdir) == [5, 10, 15]
  _assert_same_losses(helpers.metrics(workdir), helpers.metrics(tmp_path / 'straight'))

  for step in (5, 10, 15):  # nothing restores: stop, never restart from scratch over them
    _damage(workdir / 'checkpoints' / str(step))
  result = subprocess.run(helpers.train_cmd(workdir, *helpers.overrides(20, *common),
                                            config=config),
                          env=helpers.env(1), capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode != 0
  assert f'No checkpoint in {workdir}/checkpoints restores' in result.stderr
  assert _checkpoint_steps(workdir) == [5, 10, 15]  # nothing moved when nothing restores


@pytest.mark.slow
def test_a_changed_process_count_restores_the_model_and_reshuffles_the_data(demo_data,
                                                                           tmp_path):
  """1 process x 4 devices -> 2 x 2 -> 1 x 4: same mesh, so params and optimizer restore;
  the per-process input position cannot, and the run says so instead of crashing."""
  workdir, config = tmp_path / 'run', helpers.demo_config(demo_data)
  common = [*COMMON, '--config.optim.warmup_steps=0']
  helpers.run(helpers.train_cmd(workdir, *helpers.overrides(6, *common), config=config),
              helpers.env(4))
  stderr, _ = _launched(workdir, 2, 2, *helpers.overrides(12, *common), demo_dir=demo_data,
                        log_dir=tmp_path / 'logs')
  changed = 'written by a different number of processes or data workers'
  assert changed in stderr and 'seed 6' in stderr
  result = helpers.run(helpers.train_cmd(workdir, *helpers.overrides(18, *common),
                                         config=config), helpers.env(4))
  assert changed in result.stderr
  assert 'Resuming from' in result.stderr and 'step 12' in result.stderr
  metrics = helpers.metrics(workdir)
  assert sorted(metrics) == list(range(1, 19))
  # Restored, not restarted: each leg starts below where the run started.
  assert max(metrics[7]['loss'], metrics[13]['loss']) < metrics[1]['loss'] - 0.2, metrics


def _bad_shards(root: pathlib.Path, good_shard: pathlib.Path) -> None:
  """One shard per kind of damage, each beside good samples from a real demo shard."""
  with tarfile.open(good_shard) as tar:
    good = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()[:42]]  # 14 samples
  image = next(data for name, data in good if name.endswith(('.jpg', '.png')))
  bad = {
      'bad_image': [('a.jpg', b'\xff\xd8 not a jpeg'), ('a.txt', b'x'),
                    ('b.jpg', image[:len(image) // 2]), ('b.txt', b'x')],
      'empty_image': [('c.jpg', b''), ('c.txt', b'x')],
      'missing_caption': [('d.jpg', image)],
      'bad_caption': [('e.jpg', image), ('e.txt', 'caf\xe9'.encode('latin-1'))],
      'oversized_member': [('f.jpg', bytes(65 << 20)), ('f.txt', b'x')],
  }
  for i, members in enumerate(bad.values()):
    helpers.write_tar(root / f'{i:05d}.tar', [*good[:21], *members, *good[21:]])
  n = len(bad)
  (root / f'{n:05d}.tar').write_bytes(b'')  # empty
  helpers.write_tar(root / f'{n + 1:05d}.tar', good)
  data = (root / f'{n + 1:05d}.tar').read_bytes()
  (root / f'{n + 1:05d}.tar').write_bytes(data[:len(data) * 2 // 3])  # truncated


@pytest.mark.slow
def test_a_run_over_every_kind_of_bad_shard_counts_each_and_finishes(demo_data, tmp_path):
  shards = tmp_path / 'bad'
  shards.mkdir()
  _bad_shards(shards, demo_data / 'train' / '00000.tar')
  workdir = tmp_path / 'run'
  helpers.run(helpers.train_cmd(workdir, *helpers.overrides(30, '--config.log_every=30',
                                                            '--config.batch_size=16',
                                            '--config.eval.zeroshot_shards=',
                                            f'--config.data.train={shards}/{{00000..00006}}.tar',
                                            '--config.data.workers=2'),
                  config=helpers.demo_config(demo_data)), helpers.env(1))
  skipped = {k.removeprefix('skipped/'): v for k, v in helpers.metrics(workdir)[30].items()
             if k.startswith('skipped/')}
  for kind in ('bad_image', 'empty_image', 'missing_caption', 'bad_caption',
               'oversized_member', 'empty_shard', 'truncated_shard'):
    assert skipped.get(kind, 0) >= 1, (kind, skipped)


def test_periodic_zero_shot_streams_images_and_scores_like_the_evaluator(trained_demo, demo_data,
                                                                        monkeypatch):
  """At most two batches of decoded images are alive at once (the old code held all 400)."""
  config = base_config()
  config.eval.zeroshot_shards = f'{demo_data}/eval/*.tar'
  config.eval.classnames = f'{demo_data}/classnames.txt'
  cfg, params = load_params(trained_demo)
  model, mesh = FunctionalModel.create(cfg), sharding.make_mesh({'data': -1})
  evaluator = train_lib.ZeroShotEval(config, model, mesh,
                                     tokenizer_from_spec(cfg.text.tokenizer,
                                                         cfg.text.context_length))
  evaluator.encoder = Encoder(model, None, mesh, batch_size=32)
  alive, most = [], [0]
  decode = inputs_lib.eval_pixels

  def tracked(*args, **kwargs):
    image = decode(*args, **kwargs)
    alive.append(weakref.ref(image))
    most[0] = max(most[0], sum(ref() is not None for ref in alive))
    return image

  monkeypatch.setattr(inputs_lib, 'eval_pixels', tracked)
  result = evaluator(params)
  assert len(alive) == evaluator.total == 400 and most[0] <= 2 * 32
  monkeypatch.setattr(inputs_lib, 'eval_pixels', decode)
  expected = zeroshot.run(Encoder(model, params, mesh), evaluator.tokenizer, evaluator.classnames,
                          evaluator.templates,
                          zeroshot.shard_images(config.eval.zeroshot_shards,
                                                inputs_lib.ImageInput.of(cfg)))
  assert result == {'zeroshot_top1': expected['top1'], 'zeroshot_top5': expected['top5']}
  assert result['zeroshot_top1'] > 0.2  # a trained model, so lost images would show


@pytest.mark.slow
def test_zero_shot_in_two_processes_equals_one_process(trained_demo, demo_data, tmp_path):
  """Each process decodes half the eval images; the summed counts equal one process's."""
  common = ['--config.total_steps=1', '--config.optim.lr=0', '--config.batch_size=32',
            '--config.checkpoint_every=1000', '--config.model.name=tiny',
            '--config.model.vision.image_size=64', f'--config.init_from={trained_demo}']
  helpers.run(helpers.train_cmd(tmp_path / 'one', *common,
                                config=helpers.demo_config(demo_data)), helpers.env(4))
  _launched(tmp_path / 'two', 2, 2, *common, demo_dir=demo_data, log_dir=tmp_path / 'logs')
  one, two = helpers.metrics(tmp_path / 'one')[1], helpers.metrics(tmp_path / 'two')[1]
  assert one['zeroshot_top1'] > 0.2
  assert (two['zeroshot_top1'], two['zeroshot_top5']) == (one['zeroshot_top1'],
                                                          one['zeroshot_top5'])
