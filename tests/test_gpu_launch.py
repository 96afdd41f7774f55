"""GPU launchers (launch/gpu_host.sh, slurm.sbatch, local.sh on GPUs): the processes they
start and the XLA / NCCL settings those get, against fake `python` / `srun` / `scontrol`;
the XLA flags are ones the installed jaxlib accepts."""

import os
import pathlib
import shutil
import stat
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
FLAG_NAMES = ('--xla_gpu_enable_latency_hiding_scheduler', '--xla_gpu_enable_command_buffer',
              '--xla_gpu_all_reduce_combine_threshold_bytes',
              '--xla_gpu_all_gather_combine_threshold_bytes',
              '--xla_gpu_reduce_scatter_combine_threshold_bytes')
NCCL = {'NCCL_PROTO': 'SIMPLE,LL,LL128', 'NCCL_LL_BUFFSIZE': '-2', 'NCCL_LL128_BUFFSIZE': '-2',
        'NCCL_LAUNCH_MODE': 'GROUP'}


def _fake(path: pathlib.Path, calls: pathlib.Path) -> pathlib.Path:
  """An executable recording, one file per call, its name, arguments and launch env."""
  path.parent.mkdir(parents=True, exist_ok=True)
  calls.mkdir(exist_ok=True)
  path.write_text('#!/usr/bin/env bash\n'
                  f'{{ echo "$(basename "$0") $*"; env | grep -E '
                  "'^(XLA_|NCCL_|JAX_PLATFORMS|CUDA_VISIBLE_DEVICES|CLIP_JAX_NUM)'; } "
                  f'> "{calls}/call.$$"\n')
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def _calls(calls: pathlib.Path) -> list[tuple[str, dict[str, str]]]:
  """(command line, env) of each recorded call, sorted by command line."""
  out = []
  for file in calls.glob('call.*'):
    line, *env = file.read_text().splitlines()
    out.append((line, dict(e.split('=', 1) for e in env)))
  return sorted(out, key=lambda c: (c[0], c[1].get('CUDA_VISIBLE_DEVICES', '')))


def _env(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('XLA_', 'NCCL_', 'JAX_', 'SLURM_', 'CLIP_JAX_', 'CUDA_'))}
  env.pop('PYTHON', None)
  env['PATH'] = f'{tmp_path / "bin"}:{env["PATH"]}'
  env.update(extra)
  return env


def _run(args, env, check=True):
  return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True,
                        check=check, timeout=60)


def _flags(env: dict[str, str]) -> dict[str, str]:
  return dict(f.split('=', 1) for f in env['XLA_FLAGS'].split())


def test_gpu_host_runs_one_process_on_all_gpus_with_the_gpu_settings(tmp_path):
  python = _fake(tmp_path / 'py' / 'python', tmp_path / 'calls')
  result = _run([LAUNCH / 'gpu_host.sh', '--config', 'configs/clip.py:gpus=8', '--workdir', '/r'],
                _env(tmp_path, PYTHON=str(python)))
  assert not result.stderr
  ((line, env),) = _calls(tmp_path / 'calls')  # one process: no jax.distributed, no split
  assert line == 'python -m clip_jax.train --config configs/clip.py:gpus=8 --workdir /r'
  assert 'CUDA_VISIBLE_DEVICES' not in env and 'CLIP_JAX_NUM_PROCESSES' not in env
  flags = _flags(env)
  assert sorted(flags) == sorted(FLAG_NAMES)
  assert flags['--xla_gpu_enable_latency_hiding_scheduler'] == 'true'
  assert 'CUSTOM_CALL' in flags['--xla_gpu_enable_command_buffer'].split(',')
  assert {k: env[k] for k in NCCL} == NCCL
  assert env['JAX_PLATFORMS'] == 'cuda' and env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'


def test_a_users_settings_are_kept_and_win(tmp_path):
  """Before: nothing set XLA_FLAGS; here the user's own flags stay first and a flag the
  user sets is not added again with the script's value."""
  python = _fake(tmp_path / 'py' / 'python', tmp_path / 'calls')
  user = '--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/dump'
  _run([LAUNCH / 'gpu_host.sh', '--workdir', '/r'],
       _env(tmp_path, PYTHON=str(python), XLA_FLAGS=user, NCCL_PROTO='Simple',
            XLA_PYTHON_CLIENT_MEM_FRACTION='0.8'))
  ((_, env),) = _calls(tmp_path / 'calls')
  assert env['XLA_FLAGS'].startswith(user + ' ')
  assert env['XLA_FLAGS'].count('--xla_gpu_enable_latency_hiding_scheduler') == 1
  assert set(FLAG_NAMES) | {'--xla_dump_to'} == set(_flags(env))
  assert env['NCCL_PROTO'] == 'Simple' and env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.8'


def test_the_xla_flags_are_ones_jaxlib_accepts(tmp_path):
  """XLA aborts at start on an unknown flag or command-buffer kind ('Unknown flag in
  XLA_FLAGS'): start the installed jax (CPU) with the script's flags."""
  result = _run([LAUNCH / 'gpu_host.sh'], _env(tmp_path, DRY_RUN='1'))
  (line,) = [x for x in result.stdout.splitlines() if x.startswith('XLA_FLAGS=')]
  code = 'import jax; jax.numpy.zeros(1).block_until_ready()'
  for flags, ok in ((line.removeprefix('XLA_FLAGS='), True),
                    ('--xla_gpu_enable_command_buffer=FUSION,CUBLAS_TYPO', False)):
    run = _run([sys.executable, '-c', code], dict(os.environ, XLA_FLAGS=flags,
                                                  JAX_PLATFORMS='cpu'), check=False)
    assert (run.returncode == 0) == ok, (flags, run.stderr[-2000:])


def _slurm_env(tmp_path, **extra):
  _fake(tmp_path / 'bin' / 'srun', tmp_path / 'calls')
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'python').write_text('')
  (venv / 'bin' / 'python').chmod(0o755)
  return _env(tmp_path, VENV=str(venv), **extra)


def test_slurm_runs_one_task_per_node_with_the_gpu_settings(tmp_path):
  env = _slurm_env(tmp_path, XLA_FLAGS='--xla_dump_to=/d')
  result = _run(['bash', LAUNCH / 'slurm.sbatch', '--workdir', '/shared/run'], env)
  assert not result.stderr
  ((line, srun_env),) = _calls(tmp_path / 'calls')
  assert line == f'srun --kill-on-bad-exit=1 {tmp_path}/venv/bin/python -m clip_jax.train ' \
                 '--workdir /shared/run'
  assert set(_flags(srun_env)) == set(FLAG_NAMES) | {'--xla_dump_to'}
  assert srun_env['XLA_FLAGS'].startswith('--xla_dump_to=/d ')
  assert {k: srun_env[k] for k in NCCL} == NCCL and srun_env['JAX_PLATFORMS'] == 'cuda'
  assert '#SBATCH --ntasks-per-node=1' in (LAUNCH / 'slurm.sbatch').read_text()


def test_slurm_finds_launch_from_sbatchs_copy_through_the_job_command(tmp_path):
  """sbatch runs a copy of the script from its spool directory, where gpu_host.sh is not."""
  spool = tmp_path / 'spool' / 'job42'
  spool.mkdir(parents=True)
  shutil.copy(LAUNCH / 'slurm.sbatch', spool / 'slurm_script')
  (tmp_path / 'bin' / 'scontrol').parent.mkdir(parents=True, exist_ok=True)
  (tmp_path / 'bin' / 'scontrol').write_text(
      '#!/usr/bin/env bash\n[[ "$*" == "show job -o 42" ]] || exit 1\n'
      f'echo "JobId=42 JobName=clip_jax Command={LAUNCH}/slurm.sbatch WorkDir=/x"\n')
  (tmp_path / 'bin' / 'scontrol').chmod(0o755)
  env = _slurm_env(tmp_path)
  _run(['bash', spool / 'slurm_script', '--workdir', '/r'], dict(env, SLURM_JOB_ID='42'))
  ((_, srun_env),) = _calls(tmp_path / 'calls')
  assert set(_flags(srun_env)) == set(FLAG_NAMES)
  lost = _run(['bash', spool / 'slurm_script', '--workdir', '/r'], env, check=False)
  assert lost.returncode == 2 and 'launch/gpu_host.sh not found' in lost.stderr


def test_local_launcher_on_gpus_splits_them_and_sets_the_gpu_settings(tmp_path):
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  for script in ('local.sh', 'gpu_host.sh'):
    shutil.copy(LAUNCH / script, repo / 'launch' / script)
  _fake(repo / '.venv' / 'bin' / 'python', tmp_path / 'calls')
  _run([repo / 'launch' / 'local.sh', '2', '4', '--', '--workdir', '/r'],
       _env(tmp_path, JAX_PLATFORMS='cuda', CLIP_JAX_LOG_DIR=str(tmp_path / 'logs')))
  calls = _calls(tmp_path / 'calls')
  assert [env['CUDA_VISIBLE_DEVICES'] for _, env in calls] == ['0,1,2,3', '4,5,6,7']
  for line, env in calls:
    assert line == 'python -m clip_jax.train --workdir /r'
    assert set(_flags(env)) == set(FLAG_NAMES) and env['CLIP_JAX_NUM_PROCESSES'] == '2'


def test_shellcheck_passes_on_gpu_host():
  """tests/test_launch.py checks the other scripts (it predates this one)."""
  shellcheck = (shutil.which('shellcheck') or str(pathlib.Path(sys.executable).parent
                                                  / 'shellcheck'))
  result = subprocess.run([shellcheck, str(LAUNCH / 'gpu_host.sh')], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout
