"""clip_jax.aot: the train step compiled for TPU topologies on this CPU host (needs libtpu)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from clip_jax import aot
from clip_jax.config_base import base_config
from tests.test_memory import scanned_stack_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason='compiling for a TPU topology needs libtpu (test extra)')

# The tiny preset made wide enough (and its vocabulary small enough) that matmuls dominate,
# as in real models: the analytic count then holds to a few percent.
WIDE_TINY = {'model.vision.width': 256, 'model.vision.mlp_dim': 1024, 'model.text.width': 256,
             'model.text.mlp_dim': 1024, 'model.text.vocab_size': 1024,
             'model.vision.image_size': 32, 'batch_size': 64}


def _config(**overrides):
  config = base_config()
  config.model.name = 'tiny'
  config.update_from_flattened_dict(overrides)
  return config


def _cli(*args, **env_vars):
  env = dict(os.environ, PYTHONPATH=str(ROOT), **env_vars)
  env.pop('JAX_PLATFORMS', None)  # the tool keeps the host on CPU itself
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'clip_jax.aot', '--config',
                         str(ROOT / 'configs' / 'demo.py'), *args],
                        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                        env=env)


@pytest.mark.slow
def test_tiny_step_compiles_for_v5e_and_matches_the_analytic_flops():
  """The CLI's JSON for the (scanned) tiny model on v5e:2x2: fits, HBM, and FLOPs within 10%
  of the analytic count by depth extrapolation (the scanned program plus what one more layer
  costs in the loop, from compiles at 1 and 2 layers per iteration), where the scanned
  program's own count (its loop body once) falls far short."""
  overrides = [f'--config.{k}={v}' for k, v in WIDE_TINY.items()]
  result = _cli('--topology', 'v5e:2x2', '--json', *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report['fits'] is True
  assert report['device_kind'] == 'TPU v5 lite' and report['chips'] == 4
  hbm = report['hbm']
  assert hbm['total_bytes'] > hbm['argument_bytes'] > 0
  assert 15 * 2**30 < hbm['capacity_bytes'] <= 16 * 2**30  # the compiler's v5e figure
  assert report['estimate']['while_loops'] > 0
  extrapolated = report['estimate']['depth_extrapolation']
  assert set(extrapolated['compiles']) == {'1x1', '2x1', '1x2'}
  ratio = report['flops']['compiled_over_analytic']
  assert 0.9 < ratio < 1.1, report['flops']
  assert extrapolated['scanned_program']['flops'] < 0.8 * report['flops']['compiled_per_chip']
  assert 'TPU_WORKER_HOSTNAMES' not in result.stderr  # libtpu's init noise stays hidden


@pytest.mark.slow
def test_a_scanned_program_the_compiler_fits_is_reported_as_fitting():
  """`memory_analysis()`'s temporaries over-count a scanned program by about its stacked
  residuals: here arguments + outputs + temporaries exceed a v5e chip's HBM, yet the TPU
  compiler accepts the program, and the tool's total (the compiler's peak) is under it."""
  device = aot.topology_devices('v5e:2x2')[0]
  memory = scanned_stack_memory(8, 1536, 197, 256, remat='save_attn', device=device)
  hbm = aot.hbm_use(memory, device.platform)
  summed = hbm['argument_bytes'] + hbm['output_bytes'] - hbm['alias_bytes'] + hbm['temp_bytes']
  assert hbm['total_bytes'] == hbm['peak_bytes'] + hbm['code_bytes']
  assert hbm['total_bytes'] < aot.hbm_capacity(device) < summed, hbm


def test_an_uncorrected_loop_is_said_to_be_counted_once():
  """Without an extrapolated time (here: accumulation's loop), the notes say so."""
  report = {'device_kind': 'TPU v5 lite', 'cores_per_device': 1, 'remat': 'none',
            'loss': 'softmax',
            'estimate': {'step_seconds': 0.1, 'loops_counted_once': True, 'while_loops': 1,
                         'depth_extrapolation': None, 'custom_calls': [],
                         'compiler_custom_calls': [], 'scatters': 0}}
  assert any('NOT corrected' in note and 'depth_estimate' in note for note in aot.notes(report))


@pytest.mark.parametrize('topology', ['v5x:2x2', 'tpu', 'v5e:3x7'])
def test_a_wrong_topology_lists_the_valid_forms(topology):
  with pytest.raises(ValueError, match='Valid forms: .*v5p:4x4x4.*local'):
    aot.topology_devices(topology)


def test_a_step_that_cannot_fit_exits_non_zero_naming_the_knobs():
  result = _cli('--topology', 'v5e:2x2', '--config.batch_size=262144',
                '--config.model.vision.image_size=32')
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert 'DOES NOT FIT' in result.stdout
  for knob in ('--config.batch_size', '--config.model.remat', '--config.mesh.fsdp'):
    assert knob in result.stderr


def test_libtpu_ending_the_process_still_shows_why():
  """libtpu exits at once on a flag it does not know: with LIBTPU_INIT_ARGS set the tool hides
  none of libtpu's output, so the message reaches the user instead of a silent exit 1."""
  result = _cli('--topology', 'v5e:2x2', LIBTPU_INIT_ARGS='--no_such_libtpu_flag=1')
  assert result.returncode != 0
  assert "Unknown command line flag 'no_such_libtpu_flag'" in result.stderr, result.stderr


def test_local_topology_compiles_for_this_machines_devices():
  report = aot.analyse(_config(**WIDE_TINY, **{'mesh.data': 1, 'mesh.fsdp': -1}), 'local')
  assert report['device_kind'] == 'cpu' and report['chips'] == 8
  assert report['mesh']['fsdp'] == 8
  assert report['fits'] is True and report['hbm']['total_bytes'] > 0
  assert report['flops']['compiled_per_chip'] > 0


def test_a_locca_step_compiles_with_its_decoder_in_the_analytic_flops():
  """LocCa's decoder (`locca.weight=1`: its own token sequences in the batch) is compiled with
  the step and its FLOPs are in the analytic count: unrolled, the compiled count matches it
  (the towers alone are a twentieth of it: the vocabulary projection dominates).
  CoCa on a TPU topology: bench/RESULTS.md 2026-12-05."""
  config = _config(**{'mesh.data': 1, 'mesh.fsdp': -1, 'batch_size': 16, 'locca.weight': 1.0,
                      'model.scan_layers': False})
  report = aot.analyse(config, 'local')
  assert report['fits'] is True
  assert report['decoder'] == {'kind': 'locca', 'layers': 1, 'width': 64, 'context_length': 32,
                               'vocab_size': 49408 + 103}
  assert 0.9 < report['flops']['compiled_over_analytic'] < 1.1, report['flops']


@pytest.mark.parametrize('seq_len', [16, 64])
def test_a_naflex_step_compiles_per_length_with_the_budgets_batch(seq_len):
  """tiny-naflex at lengths 16 and 64 under a 2,048-token budget: the step compiles with 128
  and 32 sequences, and its analytic FLOPs (blocks over `seq_len` tokens) match the
  compiled count (unrolled)."""
  config = _config(**{'model.name': 'tiny-naflex', 'mesh.data': 1, 'mesh.fsdp': -1,
                      'model.scan_layers': False, 'batch_size': 64,
                      'data.naflex.seq_lens': (16, 64), 'data.naflex.max_tokens_per_batch': 2048})
  report = aot.analyse(config, 'local', seq_len=seq_len)
  assert (report['batch_size'], report['seq_len']) == (2048 // seq_len, seq_len)
  assert report['fits'] is True
  assert 0.9 < report['flops']['compiled_over_analytic'] < 1.1, report['flops']


def test_the_binaries_keep_libtpus_probe_noise_from_users():
  """Without JAX_PLATFORMS, an installed libtpu probes for a TPU and logs init errors; the
  binaries' start-up (`distributed.initialize`) shows one warning instead and runs on CPU."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop('JAX_PLATFORMS', None)
  code = ('import jax; from clip_jax import distributed; distributed.initialize(); '
          'print(jax.devices()[0].platform)')
  result = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.stdout.strip() == 'cpu'
  assert 'TPU_WORKER_HOSTNAMES' not in result.stderr, result.stderr[-2000:]
  assert 'libtpu is installed but found no TPU' in result.stderr


@pytest.mark.slow
def test_the_splash_attention_kernel_compiles_for_tpu():
  """`model.attention='splash'` puts the Pallas kernel in the TPU program (the scanned tiny
  step on v5e:2x2; padded tiles, causal text), and the report says the estimate omits it."""
  config = _config(**WIDE_TINY, **{'model.attention': 'splash'})
  report = aot.analyse(config, 'v5e:2x2')
  assert report['fits'] is True
  assert 'tpu_custom_call' in report['estimate']['custom_calls']
  assert any('tpu_custom_call' in note and 'not in the estimate' in note
             for note in report['notes'])
