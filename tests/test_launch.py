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
  assert ('--spot' in call) == (mode == 'spot')  # queued is on-demand unless TPU_SPOT=1


def test_tpu_queued_spot_is_optional(fake_bin):
  _tpu(fake_bin, 'create', TPU_MODE='queued', TPU_SPOT='1')
  (call,) = _calls(fake_bin)
  assert call.startswith('gcloud compute tpus queued-resources create clip')
  assert call.endswith('--runtime-version tpu-ubuntu2204-base --spot')
  with pytest.raises(subprocess.CalledProcessError) as error:
    _tpu(fake_bin, 'create', TPU_MODE='queued', TPU_SPOT='yes')
  assert error.value.returncode == 2 and 'TPU_SPOT must be 0 or 1' in error.value.stderr


def _git(cwd, *args):
  env = dict(os.environ, GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@t', GIT_COMMITTER_NAME='t',
             GIT_COMMITTER_EMAIL='t@t')
  return subprocess.run(['git', '-C', str(cwd), *args], env=env, capture_output=True, text=True,
                        check=True).stdout.strip()


def test_tpu_setup_stops_when_the_commit_is_not_pushed(fake_bin, tmp_path):
  origin, clone = tmp_path / 'origin.git', tmp_path / 'clone'
  _git(tmp_path, 'init', '-q', '--bare', str(origin))
  _git(tmp_path, 'clone', '-q', str(origin), str(clone))
  (clone / 'launch').mkdir()
  shutil.copy(ROOT / 'launch' / 'tpu_vm.sh', clone / 'launch' / 'tpu_vm.sh')
  _git(clone, 'add', '.')
  _git(clone, 'commit', '-q', '-m', 'first')
  env = dict(os.environ, PATH=f'{fake_bin}:{os.environ["PATH"]}', TPU_NAME='clip',
             TPU_ZONE='us-central2-b')
  env.pop('REPO_URL', None)
  env.pop('REPO_REF', None)
  setup = [str(clone / 'launch' / 'tpu_vm.sh'), 'setup']
  result = subprocess.run(setup, env=env, capture_output=True, text=True, check=False)
  head = _git(clone, 'rev-parse', 'HEAD')
  assert result.returncode == 2 and not _calls(fake_bin)
  assert f'REPO_REF {head} ({head[:12]}) is not pushed' in result.stderr
  assert 'git push' in result.stderr
  _git(clone, 'push', '-q', 'origin', 'HEAD')
  (clone / 'launch' / 'tpu_vm.sh').write_text(
      (clone / 'launch' / 'tpu_vm.sh').read_text() + '\n')  # uncommitted: deployed without it
  result = subprocess.run(setup, env=env, capture_output=True, text=True, check=True)
  assert 'uncommitted changes' in result.stderr
  (call,) = _calls(fake_bin)
  assert f'git clone -q {origin} clip_jax' in call and f'git checkout -q {head}' in call


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


def _fake_python(path, log):
  """An executable at `path` that records its arguments (and the JAX env) in `log`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('#!/usr/bin/env bash\n'
                  f'echo "$0 $* JAX_NUM_CPU_DEVICES=$JAX_NUM_CPU_DEVICES" >> "{log}"\n')
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def test_slurm_script_runs_the_trainer_under_srun(fake_bin, tmp_path):
  venv = tmp_path / 'venv'
  _fake_python(venv / 'bin' / 'python', tmp_path / 'python.log')
  env = dict(os.environ, PATH=f'{fake_bin}:{os.environ["PATH"]}', VENV=str(venv))
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'slurm.sbatch'), '--config',
                           'configs/clip.py', '--workdir', '/shared/run'], env=env,
                          capture_output=True, text=True, check=True)
  assert not result.stderr
  (call,) = _calls(fake_bin)
  assert call == (f'srun --kill-on-bad-exit=1 {venv}/bin/python -m clip_jax.train --config '
                  'configs/clip.py --workdir /shared/run')
  dry = subprocess.run(['bash', str(ROOT / 'launch' / 'slurm.sbatch'), '--workdir', '/x'],
                       env=dict(env, DRY_RUN='1'), capture_output=True, text=True, check=True)
  assert dry.stdout.startswith('srun --kill-on-bad-exit=1')


def test_slurm_venv_defaults_to_the_submit_dir_and_must_exist(fake_bin, tmp_path):
  env = dict(os.environ, PATH=f'{fake_bin}:{os.environ["PATH"]}', SLURM_SUBMIT_DIR=str(tmp_path),
             DRY_RUN='1')
  env.pop('VENV', None)
  script = ['bash', str(ROOT / 'launch' / 'slurm.sbatch'), '--workdir', '/x']
  missing = subprocess.run(script, env=env, capture_output=True, text=True, check=False)
  assert missing.returncode == 2 and not missing.stdout
  assert f'{tmp_path}/.venv/bin/python not found: set VENV' in missing.stderr
  _fake_python(tmp_path / '.venv' / 'bin' / 'python', tmp_path / 'python.log')
  dry = subprocess.run(script, env=env, capture_output=True, text=True, check=True)
  assert dry.stdout.startswith(f'srun --kill-on-bad-exit=1 {tmp_path}/.venv/bin/python -m')


def test_slurm_gpus_per_node_is_a_default_sbatch_overrides():
  header = (ROOT / 'launch' / 'slurm.sbatch').read_text()
  assert '#SBATCH --gpus-per-node=8' in header
  assert 'sbatch --nodes=2 --gpus-per-node=4' in header  # says how to change it


def test_local_launcher_rejects_bad_usage():
  result = subprocess.run([str(ROOT / 'launch' / 'local.sh'), '2', 'x', '--'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 2 and 'usage' in result.stderr


def _local_checkout(tmp_path):
  """A copy of launch/local.sh in a checkout of its own (for its .venv lookup)."""
  (tmp_path / 'repo' / 'launch').mkdir(parents=True)
  script = tmp_path / 'repo' / 'launch' / 'local.sh'
  shutil.copy(ROOT / 'launch' / 'local.sh', script)
  return script


def _run_local(script, tmp_path, **env):
  full_env = dict(os.environ, CLIP_JAX_LOG_DIR=str(tmp_path / 'logs'), JAX_PLATFORMS='cpu')
  full_env.pop('PYTHON', None)
  full_env.update(env)
  subprocess.run([str(script), '2', '3', '--', '--workdir', '/tmp/run'], env=full_env,
                 capture_output=True, text=True, check=True, cwd=tmp_path)
  return sorted((tmp_path / 'python.log').read_text().splitlines())


def test_local_launcher_uses_the_checkout_venv(tmp_path):
  script = _local_checkout(tmp_path)
  venv_python = _fake_python(tmp_path / 'repo' / '.venv' / 'bin' / 'python',
                             tmp_path / 'python.log')
  calls = _run_local(script, tmp_path)
  assert calls == [f'{venv_python} -m clip_jax.train --workdir /tmp/run JAX_NUM_CPU_DEVICES=3'] * 2


def test_local_launcher_python_env_wins_and_python3_is_the_fallback(tmp_path):
  script = _local_checkout(tmp_path)
  other = _fake_python(tmp_path / 'other' / 'python', tmp_path / 'python.log')
  _fake_python(tmp_path / 'repo' / '.venv' / 'bin' / 'python', tmp_path / 'venv.log')
  assert _run_local(script, tmp_path, PYTHON=str(other))[0].startswith(f'{other} -m clip_jax')
  (tmp_path / 'python.log').unlink()
  shutil.rmtree(tmp_path / 'repo' / '.venv')
  python3 = _fake_python(tmp_path / 'bin' / 'python3', tmp_path / 'python.log')
  calls = _run_local(script, tmp_path, PATH=f'{python3.parent}:{os.environ["PATH"]}')
  assert calls == [f'{python3} -m clip_jax.train --workdir /tmp/run JAX_NUM_CPU_DEVICES=3'] * 2
  assert not (tmp_path / 'venv.log').exists()


def test_shellcheck_passes_on_every_script():
  shellcheck = (shutil.which('shellcheck')
                or str(pathlib.Path(os.sys.executable).parent / 'shellcheck'))
  result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout
