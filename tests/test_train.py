"""The train binary end to end: learning, exact resume, preemption, multi-host, FSDP."""

import contextlib
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import clip_jax
from clip_jax import optim, run_config, sharding
from clip_jax import step as step_lib
from clip_jax import train as train_lib
from clip_jax.checkpoint import load_params, resolve_checkpoint, save_model
from clip_jax.data.transforms import normalize_on_device
from clip_jax.losses import contrastive_loss
from clip_jax.models.clip import CLIP, MAX_LOGIT_SCALE
from clip_jax.models.functional import get_params
from tests import helpers
from tests.conftest import ROOT


@pytest.fixture(scope='module')
def demo_dir(demo_data):
  return demo_data


@pytest.mark.slow
def test_demo_config_learns(demo_dir, tmp_path):
  workdir = tmp_path / 'run'
  helpers.run(helpers.train_cmd(workdir, *helpers.overrides(150, '--config.eval_every=150',
                                            '--config.log_every=10', '--config.tensorboard=True'),
                  config=helpers.demo_config(demo_dir)),
              helpers.env(1))  # one device, as the Quickstart runs
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  metrics = helpers.metrics(workdir)
  assert metrics[150]['loss'] < 0.6 * metrics[10]['loss']
  assert metrics[150]['zeroshot_top1'] > 4 * (1 / 40)  # chance is 2.5%
  assert metrics[150]['samples_per_second'] > 0 and 'data_wait' in metrics[150]
  assert resolve_checkpoint(workdir).name == '150'


def _children(pid: int) -> list[int]:
  """The processes `pid` started (Linux /proc; a thread may end while its list is read)."""
  children = []
  for task in pathlib.Path(f'/proc/{pid}/task').iterdir():
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
      children += [int(child) for child in (task / 'children').read_text().split()]
  return children


def _assert_exit(pids: list[int], within: float) -> None:
  """Waits up to `within` seconds for `pids` to exit (a zombie has exited)."""
  def alive(pid):
    try:
      state = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
      return False
    return state != 'Z'
  deadline = time.monotonic() + within
  while any(map(alive, pids)) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not any(map(alive, pids)), [pid for pid in pids if alive(pid)]


@pytest.mark.slow
def test_sigkill_then_restart_matches_an_uninterrupted_run(demo_dir, tmp_path):
  """With patch dropout, the run with the most state to resume: its dropout keys come from
  (seed, step), so the same patches are dropped after the restart, through the unmasked tail
  (the last 4 steps, a second compiled step). A run without it takes the same path minus
  the keys; tests/test_gcs.py kills and resumes one (on gs://) against a straight run."""
  common = helpers.overrides(24, '--config.log_every=1', '--config.checkpoint_every=5',
                      '--config.eval.zeroshot_shards=', '--config.batch_size=32',
                      '--config.model.vision.patch_dropout=0.5',
                      '--config.patch_dropout_tail_steps=4')
  config = helpers.demo_config(demo_dir)
  helpers.run(helpers.train_cmd(tmp_path / 'straight', *common, config=config), helpers.env())

  workdir = tmp_path / 'killed'
  process = subprocess.Popen(helpers.train_cmd(workdir, *common, config=config),
                             env=helpers.env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  helpers.wait_for_step(workdir, 8)
  workers = _children(process.pid)
  assert workers, 'the trainer runs its data pipeline in worker processes'
  process.send_signal(signal.SIGKILL)
  process.wait()
  _assert_exit(workers, within=10)  # grain's workers do not outlive the killed trainer
  killed_at = max(helpers.metrics(workdir))
  assert killed_at < 24, 'the run finished before it could be killed'
  helpers.run(helpers.train_cmd(workdir, *common, config=config), helpers.env())

  straight, resumed = helpers.metrics(tmp_path / 'straight'), helpers.metrics(workdir)
  assert sorted(straight) == sorted(resumed) == list(range(1, 25))
  for step in straight:
    assert resumed[step]['loss'] == straight[step]['loss'], step
  _, params_a = load_params(tmp_path / 'straight')
  _, params_b = load_params(workdir)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(demo_dir, tmp_path):
  workdir = tmp_path / 'run'
  cmd = helpers.train_cmd(workdir, *helpers.overrides(10_000, '--config.log_every=1',
                                             '--config.checkpoint_every=1000',
                                             '--config.eval.zeroshot_shards=',
                                             '--config.batch_size=32'),
                   config=helpers.demo_config(demo_dir))
  process = subprocess.Popen(cmd, env=helpers.env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  helpers.wait_for_step(workdir, 3)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  assert 'SIGTERM received' in stderr
  step = int(resolve_checkpoint(workdir).name)
  assert 3 <= step < 10_000 and step >= max(helpers.metrics(workdir))


@pytest.mark.slow
def test_two_processes_match_one_process(demo_data, tmp_path):
  synthetic = ['--config.data.kind=synthetic', '--config.total_steps=4',
               '--config.log_every=1', '--config.eval.zeroshot_shards=', '--config.batch_size=32',
               '--config.mesh.data=4', '--config.mesh.fsdp=2']
  helpers.run(helpers.train_cmd(tmp_path / 'one', *synthetic,
                                config=helpers.demo_config(demo_data)), helpers.env())
  env = helpers.env(PYTHON=sys.executable, CLIP_JAX_LOG_DIR=str(tmp_path))
  env.pop('XLA_FLAGS')
  result = subprocess.run([str(ROOT / 'launch' / 'local.sh'), '2', '4', '--',
                           *helpers.train_cmd(tmp_path / 'two', *synthetic,
                                       config=helpers.demo_config(demo_data))[3:]],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
  log_1 = tmp_path / 'clip_jax_proc_1.log'
  logs = log_1.read_text() if log_1.exists() else ''
  assert result.returncode == 0, result.stderr[-2000:] + logs[-2000:]
  one, two = helpers.metrics(tmp_path / 'one'), helpers.metrics(tmp_path / 'two')
  assert 'Process 0 of 2' in result.stderr
  for step in range(1, 5):
    np.testing.assert_allclose(two[step]['loss'], one[step]['loss'], rtol=1e-5)


@pytest.mark.slow
def test_restore_onto_a_smaller_mesh_continues(demo_dir, tmp_path):
  """8 devices for 3 steps, then 4 devices: the losses of an uninterrupted 8-device run.

  A constant schedule after warmup makes the first leg's learning rates independent of its
  shorter `total_steps`.
  """
  common = ['--config.log_every=1', '--config.checkpoint_every=3', '--config.eval.zeroshot_shards=',
            '--config.batch_size=32', '--config.mesh.fsdp=2', '--config.optim.schedule=constant']
  helpers.run(helpers.train_cmd(tmp_path / 'straight', *helpers.overrides(6, *common),
                  config=helpers.demo_config(demo_dir)), helpers.env(devices=8))
  workdir = tmp_path / 'run'
  for steps, devices in ((3, 8), (6, 4)):
    helpers.run(helpers.train_cmd(workdir, *helpers.overrides(steps, *common),
                    config=helpers.demo_config(demo_dir)), helpers.env(devices=devices))
  straight, resumed = helpers.metrics(tmp_path / 'straight'), helpers.metrics(workdir)
  assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
  for step in straight:  # same batches and state; only the reduction order differs
    np.testing.assert_allclose(resumed[step]['loss'], straight[step]['loss'], rtol=1e-4)
  assert resolve_checkpoint(workdir).name == '6'


def test_fsdp_shards_weights_across_devices():
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1})
  cfg = clip_jax.get_config('ViT-B-32', **{'vision.layers': 2, 'text.layers': 2})
  _, _, init = step_lib.build_model(cfg, mesh, sharding.DEFAULT_RULES, 0)
  params = init()
  total = sum(x.size for x in jax.tree.leaves(params))
  on_device0 = sum(s.data.size for x in jax.tree.leaves(params) for s in x.addressable_shards
                   if s.device == jax.devices()[0])
  assert on_device0 / total < 1 / 8 + 0.01  # only tiny vectors (logit scale) are replicated
  kernel = params['visual']['transformer']['blocks']['mlp']['fc1']['kernel']  # [L, 768, 3072]
  assert kernel.addressable_shards[0].data.shape == (2, 96, 3072)
  # AdamW's moments live where their parameters live (not replicated); the count does not.
  state = step_lib.create_state(params, optim.make_optimizer(optim.OptimConfig(), 10, params),
                                mesh)
  first_moments = optax.tree_utils.tree_get_all_with_path(state['opt_state'], 'mu')
  assert first_moments
  for _, moments in first_moments:
    mu = moments['visual']['transformer']['blocks']['mlp']['fc1']['kernel']
    assert mu.sharding == kernel.sharding
  assert state['step'].sharding.is_fully_replicated


def test_tensor_rules_shard_heads_and_mlp():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  abstract = nnx.eval_shape(lambda: CLIP(clip_jax.get_config('tiny'), rngs=nnx.Rngs(0)))
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(abstract, mesh))
  blocks = specs['visual']['transformer']['blocks']
  assert tuple(blocks['attn']['qkv']['kernel']) == (None, 'fsdp', None, 'tensor', None)
  assert tuple(blocks['mlp']['fc2']['kernel']) == (None, 'tensor', 'fsdp')
  assert tuple(specs['logit_scale']) == ()


@pytest.mark.parametrize('overrides,error,message', [
    ({'mesh.data': 3}, ValueError, r'config.mesh .* needs 3 devices'),
    ({'batch_size': 12}, ValueError,
     r'config.batch_size=12 must be divisible by the data-parallel size 8'),
    ({'data.kind': 'tar', 'data.train': '/nonexistent/{0..3}.tar'}, FileNotFoundError,
     'matches no file'),
    ({'model.name': 'ViT-B32'}, ValueError, 'Did you mean'),
    ({'loss.kind': 'hinge'}, ValueError, 'config.loss.kind'),
    ({'loss.kind': 'sigmoid'}, ValueError, 'set config.model.init_logit_bias=-10'),
    ({'optim.grad_accum_mode': 'gradcache'}, ValueError, 'config.optim.grad_accum_mode'),
])
def test_bad_configs_fail_before_compiling(overrides, error, message, tmp_path):
  with pytest.raises(error, match=message):
    train_lib.validate(helpers.synthetic_config(**overrides), str(tmp_path), 8)


def test_unwritable_workdir_and_unknown_key(demo_data, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match='--workdir .* is not writable'):
    train_lib.validate(helpers.synthetic_config(), str(blocker / 'sub'), 8)
  result = subprocess.run(helpers.train_cmd(tmp_path / 'w', '--config.optim.learning_rate=1',
                                     config=helpers.demo_config(demo_data)),
                          env=helpers.env(), capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode != 0 and 'learning_rate' in result.stderr


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops(demo_data, tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(helpers.train_cmd(
      workdir, '--config.data.kind=synthetic',
      '--config.eval.zeroshot_shards=', '--config.batch_size=16', '--config.total_steps=50',
      '--config.optim.lr=1e30', '--config.optim.clip_norm=0', '--config.optim.warmup_steps=0',
      '--config.max_bad_steps=3', '--config.log_every=1', '--config.checkpoint_every=1',
      config=helpers.demo_config(demo_data)),
      env=helpers.env(), capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert '3 steps in a row had a non-finite loss or gradient' in result.stderr
  _, params = load_params(workdir)  # the last checkpoint is complete and loads
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_lit_init_from_a_checkpoint_keeps_the_image_tower_frozen(trained_demo, demo_data,
                                                                 tmp_path):
  """configs/lit.py: start from a checkpoint, train the text tower only."""
  workdir = tmp_path / 'lit'
  helpers.run(helpers.train_cmd(workdir, '--config.model.name=tiny',
                                '--config.model.vision.image_size=64',
                  '--config.model.dtype=float32', f'--config.init_from={trained_demo}',
                  '--config.total_steps=5', '--config.batch_size=32', '--config.log_every=1',
                  f'--config.data.train={demo_data}/train/{{00000..00009}}.tar',
                  '--config.data.workers=0', '--config.mesh.data=-1',
                  config=str(ROOT / 'configs' / 'lit.py')), helpers.env())
  _, before = load_params(trained_demo)
  _, after = load_params(workdir)
  for a, b in zip(jax.tree.leaves(before['visual']), jax.tree.leaves(after['visual'])):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before['text']),
                                                      jax.tree.leaves(after['text']))]
  assert all(changed)
  # Starts from the trained model, not from scratch.
  assert helpers.metrics(workdir)[1]['loss'] < 2.0


def test_micro_batch_accumulation_averages_micro_batch_gradients():
  """grad_accum_mode='micro', grad_accum=2 applies the mean of the gradients of its two
  strided micro-batches, each scored against its own rows only."""

  config = helpers.synthetic_config(**{
      'optim.grad_accum': 2, 'optim.grad_accum_mode': 'micro', 'optim.clip_norm': 0.0,
      'optim.lr': 1.0, 'optim.warmup_steps': 0, 'optim.weight_decay': 0.0,
      'optim.schedule': 'constant', 'batch_size': 16})
  config.optim.b1 = 0.0  # make the AdamW update a pure function of this step's gradient
  mesh = sharding.make_mesh({'data': -1})
  tx = optax.sgd(1.0)  # the update is then exactly -grad
  program = helpers.program(config, mesh, tx)
  model, state, step = program.model, program.state, program.step
  cfg, params = model.cfg, state['params']
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
           'text': rng.integers(1, 49407, (16, 32)).astype(np.int32)}
  batch['text'][:, -1] = 49407

  def grads_of(b):
    def loss(p):
      images = normalize_on_device(b['image'], cfg.preprocess)
      img, txt, scale, _ = model.bind(p)(images, b['text'])
      return contrastive_loss(img, txt, scale, kind='softmax', mesh=mesh,
                              batch_axes=('data',))[0]
    return jax.jit(jax.grad(loss))(params)

  micro = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, grads_of(micro[0]), grads_of(micro[1]))
  old = jax.tree.map(np.asarray, params)
  new_state, _ = step(state, batch)
  applied = jax.tree.map(lambda o, n: o - np.asarray(n), old, new_state['params'])
  applied['logit_scale'] = expected['logit_scale']  # clamped separately; checked elsewhere
  for a, e in zip(jax.tree.leaves(applied), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, np.asarray(e), rtol=1e-4, atol=1e-6)


def test_the_step_clamps_the_logit_scale_at_log_100():
  """However far an update pushes it, the logit scale never exceeds log(100)."""

  config = helpers.synthetic_config(batch_size=8)
  # A huge step up the gradient: the loss wants a larger scale.
  program = helpers.program(config, tx=optax.sgd(-1e4))
  state, step = program.state, program.step
  state['params']['logit_scale'] = jax.device_put(np.float32(MAX_LOGIT_SCALE - 0.01),
                                                  state['params']['logit_scale'].sharding)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8),
           'text': rng.integers(1, 49407, (8, 32)).astype(np.int32)}
  new_state, metrics = step(state, batch)
  assert float(new_state['params']['logit_scale']) == np.float32(MAX_LOGIT_SCALE)
  assert int(metrics['skipped_nonfinite']) == 0


def _step(config):
  """(model, state, jitted step) of `config` on all 8 devices."""
  program = helpers.program(config)
  return program.model, program.state, program.jitted_step


def test_sigmoid_loss_trains_a_clip_preset_with_a_configured_bias():
  """`tiny` (a CLIP preset, no bias) learns with SigLIP's loss once init_logit_bias is set;
  its feature-cache step (grad_accum=2) starts with the one-shot step's loss and norm."""
  overrides = {'loss.kind': 'sigmoid', 'model.init_logit_bias': -10.0,
               'model.init_logit_scale': 2.302585, 'model.text.vocab_size': 256,
               'batch_size': 16, 'optim.lr': 1e-3, 'optim.warmup_steps': 0}
  run_config.resolve(helpers.synthetic_config(**overrides), 8)
  config = helpers.synthetic_config(**overrides, **{'optim.grad_accum': 2})
  _, state, step = _step(config)
  batch = helpers.random_batch(16, run_config.model_config(config))
  assert float(state['params']['logit_bias']) == -10.0
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] and float(state['params']['logit_bias']) != -10.0
  _, one_shot_state, one_shot = _step(helpers.synthetic_config(**overrides))
  _, expected = one_shot(one_shot_state, batch)
  np.testing.assert_allclose(losses[0], float(expected['loss']), rtol=1e-5)


def test_a_frozen_tower_costs_no_backward_pass():
  """LiT (`optim.freeze='^visual/'`): the step's compiled FLOPs per device drop by ~2x the
  image tower's forward, its backward (measured: 41.1 -> 30.2 MFLOP, image forward 5.0, so
  2.17x; before the frozen parameters were stop_gradient-ed the drop was 0.37x on `tiny`'s
  2-layer towers, the optimizer update only); the frozen parameters do not change."""
  overrides = {'model.scan_layers': False, 'model.vision.layers': 1, 'model.text.layers': 1,
               'model.text.vocab_size': 256, 'batch_size': 16, 'optim.warmup_steps': 0}
  cfg = run_config.model_config(helpers.synthetic_config(**overrides))
  batch = helpers.random_batch(16, cfg)

  def compiled_step(freeze):
    model, state, step = _step(helpers.synthetic_config(**overrides, **{'optim.freeze': freeze}))
    return model, state, step.lower(state, batch).compile()

  _, _, trained = compiled_step('')
  model, state, frozen = compiled_step('^visual/')
  images = jax.ShapeDtypeStruct((16, 32, 32, 3), np.float32,
                                sharding=sharding.batch_sharding(sharding.make_mesh({'data': -1})))
  image_forward = jax.jit(lambda p, x: model.bind(p).encode_image(x)).lower(
      state['params'], images).compile().cost_analysis()['flops']
  saved = trained.cost_analysis()['flops'] - frozen.cost_analysis()['flops']
  assert 1.7 < saved / image_forward < 2.7
  before = jax.tree.map(np.asarray, state['params'])
  new_state, _ = frozen(state, batch)
  after = new_state['params']
  for a, b in zip(jax.tree.leaves(before['visual']), jax.tree.leaves(after['visual'])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(before['text']['ln_final']['scale'],
                            after['text']['ln_final']['scale'])


def test_a_clip_checkpoint_starts_a_sigmoid_run_with_the_configured_bias(tmp_path):
  """init_from a checkpoint without a logit bias (CLIP) + init_logit_bias: LiT with SigLIP's
  loss from an OpenCLIP CLIP model."""
  model = clip_jax.create_model('tiny')
  save_model(tmp_path / 'clip', model.cfg, get_params(model))
  config = helpers.synthetic_config(**{'loss.kind': 'sigmoid', 'model.init_logit_bias': -10.0,
                                       'init_from': str(tmp_path / 'clip')})
  params = helpers.program(config).state['params']
  assert float(params['logit_bias']) == -10.0
  np.testing.assert_array_equal(params['text']['ln_final']['scale'],
                                get_params(model)['text']['ln_final']['scale'])
