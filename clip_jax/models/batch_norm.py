"""BatchNorm, and where its running statistics live and change (the ModifiedResNet's norm).

The statistics in one picture:

- Each `BatchNorm` holds `scale` and `bias` (`nnx.Param`, trained) and `mean`, `var` and
  `count` (`nnx.BatchStat`: torch's `running_mean`, `running_var`, `num_batches_tracked`).
  Models without BatchNorm have no `BatchStat`s: an empty statistics tree, nothing changes.
- Mode: `use_running_average` (nnx's attribute name, so `model.train()` / `model.eval()`
  switch it) is True by default. A model that is created, loaded (`clip_jax.load`) or bound
  (`FunctionalModel.bind`) normalises by its running statistics: zero-shot evaluation,
  `clip_jax.embed`, the evaluators and `encode_image` outside training. Only the train step
  binds with `train=True` (`train_mode`). Each BatchNorm then normalises by the batch's
  statistics and updates its running ones, except those whose `scale` the optimizer freezes
  (`optim.freeze`, e.g. LiT's '^visual/'): these keep normalising by their running
  statistics and leave them as they are. That is OpenCLIP's `--lock-image` with
  `--lock-image-freeze-bn-stats` (FrozenBatchNorm2d). OpenCLIP's `--lock-image` alone keeps
  updating the statistics of the locked tower.
- Update (torch's BatchNorm2d, momentum 0.1): a training batch is normalised by its mean and
  biased variance; then running = 0.9 x running + 0.1 x batch value, with the unbiased
  variance (n / (n - 1)) for `var`, and `count` + 1.
- Cross-device (`sync`, the config's `vision.sync_bn`): True uses the statistics of the
  global batch. Under GSPMD a mean over the batch-sharded axis is the global mean, so XLA
  adds the all-reduce (OpenCLIP's `--use-bn-sync`, SyncBatchNorm). False uses each device's
  own rows: the batch is viewed as [devices, rows, ...] over the mesh's batch axes, and the
  running statistics take the mean of the devices' values. That is OpenCLIP's default, a
  plain BatchNorm2d per GPU. There DDP's `broadcast_buffers` copies rank 0's running
  statistics to every GPU at each forward pass, so OpenCLIP keeps rank 0's values where
  this keeps the devices' mean.
- Storage: the train state's `batch_stats` (`clip_jax.step`) is replicated on every device.
  The step's forward pass returns it updated (one update per micro-batch under
  `optim.grad_accum`, `clip_jax.accumulate`). It gets no gradient, is not in the optimizer
  or the EMA (an EMA of the params is evaluated with these statistics), and a non-finite
  step keeps the old values. Checkpoints keep it as an item `batch_stats` beside `params`.
  Everywhere else (`checkpoint.load_params`, `save_model`, the OpenCLIP converter,
  `FunctionalModel.bind`) the statistics travel inside the params tree under their layer's
  path: the model's variables.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from clip_jax.models.layers import param, recomputed
from clip_jax.sharding import context_batch_axes

MOMENTUM = 0.1  # torch's default: the weight of the new batch in the running statistics
EPS = 1e-5


class BatchNorm(nnx.Module):
  """torch's BatchNorm2d over the channels (last axis) of NHWC activations.

  `zero_init` starts `scale` at 0 (OpenCLIP's init of each bottleneck's last BatchNorm).
  Normalisation runs in float32 and is cast back to `dtype`.
  """

  def __init__(self, dim: int, *, sync: bool, dtype, param_dtype, rngs: nnx.Rngs,
               zero_init: bool = False):
    init = jax.nn.initializers.zeros if zero_init else jax.nn.initializers.ones
    self.scale = param(rngs, init, (dim,), ('embed',), param_dtype)
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), ('embed',), param_dtype)
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.sync = sync
    self.use_running_average = True
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_running_average:
      return recomputed(self._normalize)(x, self.mean[...], self.var[...], self.scale[...],
                                         self.bias[...])
    groups = 1 if self.sync else device_groups(x.shape[0])
    grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    if groups > 1:  # group g is device g's rows: keep it there
      grouped = jax.lax.with_sharding_constraint(grouped, P(context_batch_axes(x.shape[0])))
    axes = tuple(range(1, grouped.ndim - 1))  # all but the group and the channel
    x32 = grouped.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    var = jnp.square(x32 - mean).mean(axes, keepdims=True)
    y = recomputed(self._normalize)(grouped, mean, var, self.scale[...], self.bias[...])
    n = math.prod(grouped.shape[1:-1])
    self._update(mean.reshape(groups, -1).mean(0),
                 (var * (n / max(n - 1, 1))).reshape(groups, -1).mean(0))
    return y.reshape(x.shape)

  def _normalize(self, x, mean, var, scale, bias) -> jax.Array:
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + EPS)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)

  def _update(self, batch_mean: jax.Array, batch_var: jax.Array) -> None:
    """The running statistics after one training batch (torch's rule), no gradient."""
    batch_mean, batch_var = jax.lax.stop_gradient((batch_mean, batch_var))
    self.mean.value = (1 - MOMENTUM) * self.mean[...] + MOMENTUM * batch_mean
    self.var.value = (1 - MOMENTUM) * self.var[...] + MOMENTUM * batch_var
    self.count.value = self.count[...] + 1


def device_groups(batch: int) -> int:
  """How many devices split `batch` rows over the batch axes of the mesh in context (1 with
  no mesh, as in single-device evaluation)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in context_batch_axes(batch))


def train_mode(model: nnx.Module, freeze: str = '') -> None:
  """Switches every BatchNorm of `model` to batch statistics (and updating its running ones),
  except those whose `scale` path ('visual/layer1/blocks/bn1/scale') matches the `freeze`
  regex, as `optim.freeze` matches parameters: these keep their running statistics."""
  pattern = re.compile(freeze) if freeze else None
  for path, module in nnx.iter_modules(model):
    if isinstance(module, BatchNorm):
      scale = '/'.join(map(str, (*path, 'scale')))
      module.use_running_average = bool(pattern and pattern.search(scale))
