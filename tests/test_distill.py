"""Distillation (`config.distill`): OpenCLIP's `DistillClipLoss` on a mesh, the trainer."""

import pathlib
import sys

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from open_clip.loss import DistillClipLoss

import clip_jax
from clip_jax import aot
from clip_jax import train as train_lib
from clip_jax.checkpoint import save_model
from clip_jax.losses import distillation_loss
from clip_jax.models.functional import get_params
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, DIM, TEACHER_DIM = 16, 8, 12
SCALE, TEACHER_SCALE = 2.3, 3.1  # logs


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs():
  """Student and teacher features (the teacher wider), correlated like trained towers."""
  rng = np.random.default_rng(0)
  img = _normalise(rng.normal(size=(BATCH, DIM)))
  txt = _normalise(img + rng.normal(size=(BATCH, DIM)))
  t_img = _normalise(rng.normal(size=(BATCH, TEACHER_DIM)))
  t_txt = _normalise(t_img + 0.5 * rng.normal(size=(BATCH, TEACHER_DIM)))
  return [x.astype(np.float32) for x in (img, txt, t_img, t_txt)]


def _ours(mesh, batch_axes, img, txt, t_img, t_txt):
  """(loss, grads w.r.t. student image, text, log scale), embeddings sharded on `mesh`."""
  rows = NamedSharding(mesh, P(tuple(a for a in batch_axes if a in mesh.axis_names)))
  put = lambda x: jax.device_put(x, rows)

  def loss(img, txt, scale):
    return distillation_loss(img, txt, scale, t_img, t_txt, TEACHER_SCALE, mesh=mesh,
                             batch_axes=batch_axes)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
      put(img), put(txt), np.float32(SCALE))
  return float(value), [np.asarray(g) for g in grads]


def test_distillation_loss_equals_open_clip_distill_clip_loss():
  """Value and gradients (student features and scale) of OpenCLIP's distill term, float64."""
  img, txt, t_img, t_txt = _inputs()
  torch_in = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (img, txt)]
  log_scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
  _, reference = DistillClipLoss()(
      *torch_in, log_scale.exp(), torch.tensor(t_img, dtype=torch.float64),
      torch.tensor(t_txt, dtype=torch.float64), torch.tensor(TEACHER_SCALE).exp())
  reference.backward()
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  value, grads = _ours(mesh, ('data',), img, txt, t_img, t_txt)
  np.testing.assert_allclose(value, reference.item(), rtol=1e-5)
  for ours, theirs in zip(grads, [*torch_in, log_scale]):
    np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('n,shape,names', [(4, (2, 2), ('data', 'fsdp')), (8, (8,), ('data',))])
def test_distillation_on_a_mesh_equals_one_device(n, shape, names):
  inputs = _inputs()
  one_device = _ours(Mesh(np.array(jax.devices()[:1]), ('data',)), ('data',), *inputs)
  mesh = Mesh(np.array(jax.devices()[:n]).reshape(shape), names)
  value, grads = _ours(mesh, ('data', 'fsdp'), *inputs)
  np.testing.assert_allclose(value, one_device[0], rtol=1e-6)
  for ours, reference in zip(grads, one_device[1]):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('overrides,error,message', [
    ({'distill.teacher': '/nonexistent/teacher'}, FileNotFoundError,
     r'config.distill.teacher=/nonexistent/teacher: .* holds no clip_jax checkpoint'),
    ({'distill.teacher': '/nonexistent/teacher', 'distill.weight': 0.0}, ValueError,
     r'config.distill.weight=0.0 must be > 0'),
    ({'distill.teacher': '/nonexistent/teacher', 'optim.grad_accum': 2,
      'optim.grad_accum_mode': 'micro'}, ValueError,
     r"config.distill.teacher needs config.optim.grad_accum_mode='cache'"),
])
def test_bad_distillation_configs_fail_before_compute(overrides, error, message, tmp_path):
  with pytest.raises(error, match=message):
    train_lib.validate(helpers.synthetic_config(**overrides), str(tmp_path), 8)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
  teacher = clip_jax.create_model('tiny')
  save_model(tmp_path / 'teacher', teacher.cfg, get_params(teacher))
  config = helpers.synthetic_config(**{'distill.teacher': str(tmp_path / 'teacher'),
                      'model.text.context_length': 16})
  with pytest.raises(ValueError, match='reads tokens of tokenizer .* context 32'):
    train_lib.validate(config, str(tmp_path), 8)


@pytest.mark.slow
def test_the_train_binary_distills_from_a_trained_teacher(trained_demo, demo_data, tmp_path):
  """A fresh `tiny` at 32 px learns from the trained 64 px demo model on 4 devices (the
  teacher resizes the batch); distill_loss is logged, and the feature cache (grad_accum=2)
  starts with the one-shot step's losses."""
  runs = {}
  for accum in (1, 2):
    workdir = tmp_path / f'accum{accum}'
    helpers.run([sys.executable, '-m', 'clip_jax.train',
          '--config', f'{ROOT / "configs" / "demo.py"}:data_dir={demo_data}',
          '--workdir', str(workdir), '--config.total_steps=4', '--config.log_every=1',
          '--config.batch_size=16', '--config.model.name=tiny', '--config.eval.zeroshot_shards=',
          f'--config.optim.grad_accum={accum}', f'--config.distill.teacher={trained_demo}',
          '--config.distill.weight=0.5', '--config.optim.warmup_steps=0'], helpers.env(devices=4))
    runs[accum] = helpers.metrics(workdir)
    for record in runs[accum].values():
      assert record['distill_loss'] > 0
      np.testing.assert_allclose(record['loss'],
                                 record['contrastive_loss'] + 0.5 * record['distill_loss'],
                                 rtol=1e-5)
  for key in ('loss', 'distill_loss', 'contrastive_loss'):
    np.testing.assert_allclose(runs[2][1][key], runs[1][1][key], rtol=1e-5)


def test_aot_compiles_a_distilling_step_with_an_ema(tmp_path):
  """`clip_jax.aot` lowers the step with the teacher's params (shapes only) and the EMA.
  Measured on `tiny` at 2 pairs per device, compiled FLOPs: 171.9 M, +13.1 M the teacher's
  forward, +20.7 M the EMA update; the EMA adds a copy of the params to the memory."""
  teacher = clip_jax.create_model('tiny')
  save_model(tmp_path / 'teacher', teacher.cfg, get_params(teacher))
  base = {'model.name': 'tiny', 'batch_size': 16, 'model.scan_layers': False}
  plain = aot.analyse(helpers.synthetic_config(**base), 'local')
  both = aot.analyse(helpers.synthetic_config(
      **base, **{'distill.teacher': str(tmp_path / 'teacher'), 'optim.ema_decay': 0.999}),
      'local')
  assert both['flops']['compiled_per_chip'] > 1.1 * plain['flops']['compiled_per_chip']
  assert both['hbm']['total_bytes'] > plain['hbm']['total_bytes']
