"""Launch scripts: the commands they issue (against fake gcloud/srun) and shellcheck."""

import os
import pathlib
import shutil
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / 'launch' / 'local.sh', ROOT / 'launch' / 'tpu_vm.sh',
           ROOT / 'launch' / 'slurm.sbatch', ROOT / '.ci' / 'run']


@pytest.fixture
def fake_bin(tmp_path):
  """`gcloud` and `srun` that record their arguments, one call per line."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('gcloud', 'srun'):
    script = bin_dir / tool
    script.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "{tmp_path}/calls.log"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return bin_dir


def _tpu(fake_bin, *args, **env):
  full_env = dict(os.environ, PATH=f'{fake_bin}:{os.environ["PATH"]}', TPU_NAME='clip',
                  TPU_ZONE='us-central2-b', TPU_TYPE='v4-32', BUCKET='gs://bucket',
                  REPO_URL='https://example.com/clip_jax.git', REPO_REF='abc123', **env)
  return subprocess.run([str(ROOT / 'launch' / 'tpu_vm.sh'), *args], env=full_env,
                        capture_output=True, text=True, check=True)


def _calls(fake_bin):
  log = fake_bin.parent / 'calls.log'
  return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize('mode,expected', [
    ('on_demand', 'gcloud compute tpus tpu-vm create clip --zone us-central2-b '
                  '--accelerator-type v4-32 --version tpu-ubuntu2204-base'),
    ('spot', '--spot'),
    ('queued', 'gcloud compute tpus queued-resources create clip --zone us-central2-b '
               '--node-id clip --accelerator-type v4-32'),
])
def test_tpu_create_modes(fake_bin, mode, expected):
  _tpu(fake_bin, 'create', TPU_MODE=mode)
  (call,) = _calls(fake_bin)
  assert expected in call


def test_tpu_setup_train_logs_delete(fake_bin):
  _tpu(fake_bin, 'setup')
  _tpu(fake_bin, 'train', '--config', 'configs/clip.py:model=ViT-B-16',
       "--config.data.train=gs://bucket/laion/{00000..00009}.tar")
  _tpu(fake_bin, 'logs')
  _tpu(fake_bin, 'delete')
  setup, train, logs, delete = _calls(fake_bin)
  assert '--worker=all' in setup and 'git checkout -q abc123' in setup
  assert "'jax[tpu]'" in setup and 'pip install' in setup
  assert '--worker=all' in train
  assert 'python -m clip_jax.train --workdir gs://bucket/runs/clip' in train
  assert 'configs/clip.py:model=ViT-B-16' in train
  assert '--worker=0' in logs and 'tail' in logs
  assert delete.startswith('gcloud compute tpus tpu-vm delete clip')


def test_tpu_dry_run_prints_without_running(fake_bin):
  result = _tpu(fake_bin, '--dry_run', 'create', TPU_MODE='spot')
  assert result.stdout.startswith('gcloud compute tpus tpu-vm create clip')
  assert '--spot' in result.stdout
  assert not _calls(fake_bin)


def test_tpu_requires_its_settings(fake_bin):
  env = dict(os.environ, PATH=f'{fake_bin}:{os.environ["PATH"]}')
  env.pop('TPU_NAME', None)
  result = subprocess.run([str(ROOT / 'launch' / 'tpu_vm.sh'), 'create'], env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode != 0 and 'TPU_NAME' in result.stderr


def test_slurm_script_runs_the_trainer_under_srun(fake_bin):
  env = dict(os.environ, PATH=f'{fake_bin}:{os.environ["PATH"]}', VENV='/opt/venv')
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'slurm.sbatch'), '--config',
                           'configs/clip.py', '--workdir', '/shared/run'], env=env,
                          capture_output=True, text=True, check=True)
  assert not result.stderr
  (call,) = _calls(fake_bin)
  assert call == ('srun --kill-on-bad-exit=1 /opt/venv/bin/python -m clip_jax.train --config '
                  'configs/clip.py --workdir /shared/run')
  dry = subprocess.run(['bash', str(ROOT / 'launch' / 'slurm.sbatch'), '--workdir', '/x'],
                       env=dict(env, DRY_RUN='1'), capture_output=True, text=True, check=True)
  assert dry.stdout.startswith('srun --kill-on-bad-exit=1')


def test_local_launcher_rejects_bad_usage():
  result = subprocess.run([str(ROOT / 'launch' / 'local.sh'), '2', 'x', '--'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 2 and 'usage' in result.stderr


def test_shellcheck_passes_on_every_script():
  shellcheck = (shutil.which('shellcheck')
                or str(pathlib.Path(os.sys.executable).parent / 'shellcheck'))
  result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout
