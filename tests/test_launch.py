"""Launch scripts: the commands they issue (against fake gcloud/srun) and shellcheck."""

import os
import pathlib
import shutil
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / 'launch' / 'local.sh', ROOT / 'launch' / 'tpu_vm.sh',
           ROOT / 'launch' / 'gpu_host.sh', ROOT / 'launch' / 'slurm.sbatch', ROOT / '.ci' / 'run']


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
  assert f'git clone -q {origin} clip_jax' in call and f'--verify origin/{head}^{{commit}}' in call


def test_tpu_setup_train_logs_delete(fake_bin):
  _tpu(fake_bin, 'setup')
  _tpu(fake_bin, 'train', '--config', 'configs/clip.py:model=ViT-B-16',
       "--config.data.train=gs://bucket/laion/{00000..00009}.tar")
  _tpu(fake_bin, 'logs')
  _tpu(fake_bin, 'delete')
  setup, train, logs, delete = _calls(fake_bin)
  assert '--worker=all' in setup and '--verify origin/abc123^{commit}' in setup
  assert "'jax[tpu]'" in setup and 'pip install' in setup
  assert '--worker=all' in train
  assert 'python -m clip_jax.train --workdir gs://bucket/runs/clip' in train
  assert 'configs/clip.py:model=ViT-B-16' in train
  assert '--worker=0' in logs and 'tail' in logs
  assert delete.startswith('gcloud compute tpus tpu-vm delete clip')


@pytest.fixture
def worker(tmp_path):
  """A fake one-worker TPU VM: `gcloud ... --command CMD` echoes its arguments to stderr (as
  a verbose gcloud does) and runs CMD with bash in the worker's home; there `python3 -m venv
  DIR` makes a venv whose `pip` and `python` record their arguments in `home/calls.log`."""
  home, bin_dir = tmp_path / 'home', tmp_path / 'worker_bin'
  home.mkdir()
  bin_dir.mkdir()
  scripts = {
      'gcloud': ('echo "gcloud $*" >&2\n'
                 'while [[ $# -gt 0 ]]; do\n'
                 f'  if [[ $1 == --command ]]; then cd "{home}"; exec bash -c "$2"$\'\\n\'wait\n'
                 '  fi\n'
                 '  shift\n'
                 'done\n'),
      'recorder': f'echo "$(basename "$0") $*" >> "{home}/calls.log"\n',
      'python3': (f'mkdir -p "$3/bin"; cp "{bin_dir}/recorder" "$3/bin/pip"\n'
                  f'cp "{bin_dir}/recorder" "$3/bin/python"\n'
                  f'echo "python3 $*" >> "{home}/calls.log"\n'),
  }
  for name, body in scripts.items():
    (bin_dir / name).write_text(f'#!/usr/bin/env bash\n{body}')
    (bin_dir / name).chmod(0o755)
  return home, bin_dir


def _on_worker(worker, *args, **settings):
  """tpu_vm.sh against the fake worker; settings replace the defaults (BUCKET, REPO_*)."""
  home, bin_dir = worker
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', TPU_NAME='clip',
             TPU_ZONE='us-central2-b', BUCKET='gs://bucket', REPO_URL='none', REPO_REF='main')
  env.update(settings)
  return subprocess.run([str(ROOT / 'launch' / 'tpu_vm.sh'), *args], env=env, cwd=home.parent,
                        capture_output=True, text=True, check=False)


def _origin_with_commit(tmp_path, name):
  """A bare repository `origin.git` whose main branch gains a commit adding file `name`."""
  origin, work = tmp_path / 'origin.git', tmp_path / 'work'
  if not origin.exists():
    _git(tmp_path, 'init', '-q', '--bare', '-b', 'main', str(origin))
    _git(tmp_path, 'clone', '-q', str(origin), str(work))
  (work / name).write_text(name)
  _git(work, 'add', name)
  _git(work, 'commit', '-q', '-m', name)
  _git(work, 'push', '-q', 'origin', 'HEAD:main')
  return origin, _git(work, 'rev-parse', 'HEAD')


def test_tpu_setup_updates_the_checkout_in_place(worker, tmp_path):
  """A second setup fetches the new commit into the same checkout: a running job's log, the
  user's files and the venv survive (setup used to `rm -rf clip_jax` on every worker)."""
  home, _ = worker
  origin, first = _origin_with_commit(tmp_path, 'one.txt')
  result = _on_worker(worker, 'setup', REPO_URL=str(origin), REPO_REF=first)
  assert result.returncode == 0, result.stderr
  checkout = home / 'clip_jax'
  assert _git(checkout, 'rev-parse', 'HEAD') == first
  (checkout / 'train.log').write_text('step 100')
  (checkout / 'notes.txt').write_text('mine')
  origin, second = _origin_with_commit(tmp_path, 'two.txt')
  result = _on_worker(worker, 'setup', REPO_URL=str(origin), REPO_REF='main')
  assert result.returncode == 0, result.stderr
  assert _git(checkout, 'rev-parse', 'HEAD') == second and (checkout / 'two.txt').exists()
  assert (checkout / 'train.log').read_text() == 'step 100'
  assert (checkout / 'notes.txt').read_text() == 'mine'
  calls = (home / 'calls.log').read_text().splitlines()
  assert [c.split()[0] for c in calls] == ['python3', 'pip', 'pip']  # one venv, reused
  bad = _on_worker(worker, 'setup', REPO_URL=str(origin), REPO_REF='no-such-ref')
  assert bad.returncode == 2 and 'REPO_REF no-such-ref is no branch, tag or commit' in bad.stderr
  assert _git(checkout, 'rev-parse', 'HEAD') == second


@pytest.mark.parametrize('variable', ['BUCKET', 'REPO_URL', 'REPO_REF', 'TPU_NAME'])
def test_tpu_values_reach_the_worker_shell_quoted(worker, tmp_path, variable):
  """A value with shell syntax in it is passed literally, never run on the workers."""
  home, _ = worker
  origin, _ = _origin_with_commit(tmp_path, 'one.txt')
  value = 'x$(touch PWN1); touch PWN2; :'
  settings = {'REPO_URL': str(origin), variable: value}
  _on_worker(worker, 'setup', **settings)
  _on_worker(worker, 'train', '--config', 'c.py', **settings)
  assert not list(home.rglob('PWN*')) and not list(tmp_path.glob('PWN*'))
  if variable in ('BUCKET', 'TPU_NAME'):  # the trainer got the workdir as it was written
    bucket, name = (settings.get('BUCKET', 'gs://bucket'), settings.get('TPU_NAME', 'clip'))
    calls = (home / 'calls.log').read_text()
    assert f'python -m clip_jax.train --workdir {bucket}/runs/{name} --config c.py' in calls


def test_tpu_setup_never_prints_the_repository_token(worker):
  url = 'https://user:s3cret-token@127.0.0.1:9/clip_jax.git'  # the discard port: refused
  dry = _on_worker(worker, '--dry_run', 'setup', REPO_URL=url)
  assert dry.returncode == 0 and 'https://***@127.0.0.1:9/clip_jax.git' in dry.stdout
  real = _on_worker(worker, 'setup', REPO_URL=url)
  assert real.returncode != 0 and 'https://***@127.0.0.1:9/clip_jax.git' in real.stderr
  for result in (dry, real):
    assert 's3cret' not in result.stdout + result.stderr


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
