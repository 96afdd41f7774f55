"""Config -> model, optimizer, state shardings and the jitted train step, built once for all.

The trainer (`clip_jax.train`), the ahead-of-time compile check (`clip_jax.aot`), the
benchmarks and the tests all build their step here, from a resolved config
(`run_config.RunConfig`), in one of two ways (maxtext's shared abstract-state builder):

- `build(run, mesh)`: concrete. Params are created already sharded (`jax.jit(init,
  out_shardings=...)`) or loaded from `init_from`, and the teacher's params loaded.
- `build(run, mesh, abstract=True)`: the same program over shapes only
  (`jax.ShapeDtypeStruct`s carrying their shardings): nothing is allocated, so a step for
  a TPU pod can be lowered and compiled on a CPU host.

Either way the result is a `Program`: the model, optimizer and shardings, the state (arrays
or shapes), and the jitted step(s).

The state: `params` (what the optimizer trains), `opt_state`, `step`, `bad_steps`, `ema`
(with `optim.ema_decay`) and `batch_stats`: BatchNorm's running statistics, which the
step's forward pass updates ({} for models without BatchNorm; `models/batch_norm.py`).
`variables(state)` is the model's variables tree for evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from clip_jax import accumulate, distill, optim, sharding
from clip_jax import checkpoint as ckpt
from clip_jax.data.transforms import images_of
from clip_jax.losses import caption_loss, caption_rows, contrastive_loss, distillation_loss
from clip_jax.models.clip import CLIP, MAX_LOGIT_SCALE
from clip_jax.models.config import CLIPConfig, is_naflex
from clip_jax.models.functional import FunctionalModel, with_stats
from clip_jax.models.pos_embed import fit_pos_embeds
from clip_jax.run_config import RunConfig, StepConfig

Params = dict[str, Any]
State = dict[str, Any]
StepFn = Callable[[State, dict], tuple[State, dict]]


@dataclasses.dataclass
class Program:
  """One run's train program on one mesh: what `build` returns.

  `state` holds arrays (concrete) or shapes with shardings (abstract). `step` runs one
  training step; with patch dropout and a tail (`StepConfig.patch_dropout_tail_steps`),
  `unmasked_step` is the step of the tail, which keeps every patch.
  """
  model: FunctionalModel
  mesh: Mesh
  tx: optax.GradientTransformation
  state_shardings: State
  batch_sharding: NamedSharding
  state: State
  jitted_step: Any                # jax.jit(step)(state, batch, *teacher_params)
  jitted_unmasked_step: Any | None
  teacher_params: tuple[Params, ...] = ()  # () without distillation

  @property
  def step(self) -> StepFn:
    return functools.partial(_with_teacher, self.jitted_step, self.teacher_params)

  @property
  def unmasked_step(self) -> StepFn | None:
    if self.jitted_unmasked_step is None:
      return None
    return functools.partial(_with_teacher, self.jitted_unmasked_step, self.teacher_params)

  def batch_shapes(self, batch_size: int, seq_len: int | None = None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as shapes with their sharding (uint8 images, int32 tokens); a NaFlex
    model's patch sequences at `seq_len` (default: its position table's grid, squared)."""
    cfg = self.model.cfg
    size, context = cfg.vision.image_size, cfg.text.context_length
    shape = lambda *dims, dtype=jnp.int32: jax.ShapeDtypeStruct(
        (batch_size, *dims), dtype, sharding=self.batch_sharding)
    shapes = {'image': shape(size, size, 3, dtype=jnp.uint8), 'text': shape(context)}
    if is_naflex(cfg.vision):
      length, patch = seq_len or cfg.vision.grid ** 2, cfg.vision.patch_size
      del shapes['image']
      shapes.update(patches=shape(length, patch * patch * 3, dtype=jnp.uint8),
                    coords=shape(length, 2), valid=shape(length, dtype=jnp.bool_))
    if cfg.decoder is not None and cfg.decoder.embed_tokens:  # LocCa's own sequences
      shapes['decoder_tokens'] = shapes['decoder_mask'] = shape(cfg.decoder.context_length)
    return shapes

  def lower(self, batch_size: int, seq_len: int | None = None):
    """The step lowered on this program's state and a batch of `batch_size` (as shapes;
    a NaFlex model's at `seq_len`)."""
    return self.jitted_step.lower(self.state, self.batch_shapes(batch_size, seq_len),
                                  *self.teacher_params)


def _with_teacher(jitted, teacher_params, state, batch):
  return jitted(state, batch, *teacher_params)


def build(run: RunConfig, mesh: Mesh, abstract: bool = False,
          tx: optax.GradientTransformation | None = None) -> Program:
  """The train program of `run` on `mesh`: params (random, or `init_from`'s), optimizer
  (`run.step.optim`'s unless `tx` is given), state, teacher and jitted step(s); shapes only
  with `abstract`. See the module doc."""
  model, variable_shardings, init = build_model(run.model, mesh, run.sharding_rules,
                                                run.step.seed)
  if abstract:
    variables = with_shardings(jax.eval_shape(init), variable_shardings)
  else:
    variables = initial_params(run, model, variable_shardings, init)
  params, batch_stats = model.split(variables)
  param_shardings, stats_shardings = model.split(variable_shardings)
  tx = tx or optim.make_optimizer(run.step.optim, run.step.total_steps, params)
  ema = run.step.optim.ema_decay > 0
  shardings = state_shardings(params, param_shardings, tx, mesh, ema, stats_shardings)
  if abstract:
    state = with_shardings(jax.eval_shape(functools.partial(
        create_state, tx=tx, mesh=mesh, param_shardings=param_shardings, ema=ema),
        params, batch_stats=batch_stats), shardings)
  else:
    state = create_state(params, tx, mesh, ema=ema, batch_stats=batch_stats)
  teacher, teacher_params = _teacher(run, mesh, abstract)
  batch_sharding = sharding.batch_sharding(mesh)
  make = functools.partial(make_train_step, run.step, model, tx, mesh, shardings, batch_sharding,
                           teacher)
  tail = run.step.patch_dropout_tail_steps
  return Program(model=model, mesh=mesh, tx=tx, state_shardings=shardings,
                 batch_sharding=batch_sharding, state=state, jitted_step=make(),
                 jitted_unmasked_step=make(patch_dropout=False) if tail else None,
                 teacher_params=teacher_params)


def _teacher(run: RunConfig, mesh: Mesh, abstract: bool
             ) -> tuple[distill.Teacher | None, tuple[Params, ...]]:
  """The distillation teacher and its params (shapes with `abstract`: its config only)."""
  path = run.step.distill_teacher
  if not path:
    return None, ()
  if abstract:
    teacher = distill.Teacher.create(ckpt.load_model_config(path), mesh, run.sharding_rules,
                                     run.model.dtype)
    return teacher, (with_shardings(teacher.model.abstract_variables(), teacher.shardings),)
  teacher, params = distill.load(path, mesh, run.sharding_rules, run.model.dtype)
  logging.info('Distilling from %s (weight %g)', path, run.step.distill_weight)
  return teacher, (params,)


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """`shapes` (a tree of arrays or shapes) as `jax.ShapeDtypeStruct`s placed by `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


# --- model and optimizer state ------------------------------------------------------------

def build_model(cfg: CLIPConfig, mesh: Mesh, rules, seed: int
                ) -> tuple[FunctionalModel, Params, Callable[[], Params]]:
  """Functional model, the shardings of its variables and a jitted init that creates them
  sharded: the params and, for a BatchNorm model, its initial running statistics (mean 0,
  var 1, replicated); `model.split` takes them apart."""
  model = FunctionalModel.create(cfg)
  shardings = sharding.variable_shardings(model.abstract, mesh, rules)

  def init() -> Params:
    return nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(seed)),
                                      (nnx.Param, nnx.BatchStat)))

  return model, shardings, jax.jit(init, out_shardings=shardings)


def initial_params(run: RunConfig, model: FunctionalModel, shardings: Params,
                   init_fn: Callable[[], Params]) -> Params:
  """Random variables (params, BatchNorm statistics) from `init_fn`, or `run.init_from`'s
  fitted to the model, placed by `shardings`."""
  init_from = run.init_from
  if not init_from:
    return init_fn()
  _, params = ckpt.load_params(init_from)
  if model.cfg.init_logit_bias is not None and 'logit_bias' not in params:
    # A CLIP checkpoint for a sigmoid loss: the bias starts at config.model.init_logit_bias.
    params['logit_bias'] = np.float32(model.cfg.init_logit_bias)
  params = fit_pos_embeds(params, model.cfg)  # another image size, patch grid or context
  try:
    model.check(params)
  except ValueError as e:
    raise ValueError(f'config.init_from={init_from} does not fit config.model '
                     f'({run.preset}): {e}') from e
  logging.info('Initialised from %s', init_from)
  return jax.device_put(params, shardings)


def state_shardings(params: Params, param_shardings: Params, tx, mesh, ema: bool = False,
                    stats_shardings: Params | None = None) -> State:
  """Where the state lives: optimizer moments and the EMA sharded like their params, the
  rest (counts, step counters, BatchNorm's statistics: `stats_shardings`) replicated.
  `params` may be arrays or shapes (`jax.ShapeDtypeStruct`)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  masked = lambda x: isinstance(x, optax.MaskedNode)  # a frozen parameter has no moments
  opt_state = optax.tree_map_params(
      tx, lambda x, s: x if masked(x) else s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  return {'params': param_shardings, 'opt_state': opt_state, 'step': replicated,
          'bad_steps': replicated, 'batch_stats': stats_shardings or {},
          **({'ema': param_shardings} if ema else {})}


def create_state(params: Params, tx, mesh, param_shardings: Params | None = None,
                 ema: bool = False, batch_stats: Params | None = None) -> State:
  """Params, optimizer state, step counters, (`ema`) the EMA of the params, which starts
  at the params, and BatchNorm's running statistics (`batch_stats`; {} without BatchNorm);
  placed by `state_shardings`.

  Under `jax.eval_shape` (abstract params, as `clip_jax.aot` does) pass `param_shardings`.
  """
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
  shardings = state_shardings(params, param_shardings, tx, mesh)
  opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)

  def counter():  # separate buffers: the step donates its state, a buffer only once
    return jax.device_put(np.zeros((), np.int32), shardings['step'])

  # jnp.copy: the EMA needs buffers of its own, as the counters do.
  return {'params': params, 'opt_state': opt_state, 'step': counter(), 'bad_steps': counter(),
          'batch_stats': batch_stats or {},
          **({'ema': jax.tree.map(jnp.copy, params)} if ema else {})}


def variables(state: State, params: str = 'params') -> Params:
  """The model's variables in a train state: its `params` (or `'ema'`) with BatchNorm's
  running statistics; what `FunctionalModel.bind`, the evaluators and checkpoints take."""
  return with_stats(state[params], state.get('batch_stats', {}))


# --- the step -----------------------------------------------------------------------------

def make_train_step(config: StepConfig, model: FunctionalModel, tx, mesh, state_shardings,
                    batch_sharding, teacher: distill.Teacher | None = None,
                    patch_dropout: bool = True):
  """One jitted step: loss, grads (`clip_jax.accumulate`), update, clamp, NaN guard, and
  with `optim.ema_decay` the EMA (the state then holds one: `create_state(ema=True)`).
  BatchNorm's running statistics (`batch_stats`) come out of the forward pass in training
  mode, updated; the layers `optim.freeze` freezes keep theirs (`models/batch_norm.py`).

  With a `teacher` the step takes the teacher's params as a third argument and adds
  `distill.weight` x the distillation loss; the teacher embeds the whole batch before the
  student's (accumulated) gradients, which see its features as constants.
  `patch_dropout=False` builds the unmasked step (every patch kept) of a model with
  `vision.patch_dropout`, for the run's tail.
  """
  loss_kind, chunk = config.loss, config.loss_chunk_size
  ema_decay = config.optim.ema_decay
  accum, accum_mode = config.optim.grad_accum, config.optim.grad_accum_mode
  # Per-image random keys: patch dropout (ViT) or stochastic depth (ConvNeXt's drop_path).
  patch_dropout = patch_dropout and needs_dropout_keys(model.cfg)

  def embed(params, stats, batch):
    # Frozen parameters enter as constants: their backward pass is never built. BatchNorm
    # normalises by the batch and updates `stats`, except in frozen layers.
    freeze = config.optim.freeze
    clip = model.bind(with_stats(optim.stop_frozen(params, freeze), stats), train=True,
                      freeze=freeze)
    images = images_of(batch, model.cfg)
    rows = {}
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for sharding.constrain_batch
      if model.cfg.decoder is None:
        img, txt, scale, bias = clip(images, batch['text'], batch.get('dropout_keys'))
      else:
        img, txt, scale, bias, logits = clip.caption_logits(
            images, batch['text'], batch.get('dropout_keys'), batch.get('decoder_tokens'))
        rows = caption_rows(logits, *caption_targets(batch, model.cfg))
    embeddings = (img, txt, scale, None if loss_kind == 'softmax' else bias, rows)
    return embeddings, model.stats_of(clip)

  def loss_of(img, txt, scale, bias, rows, teacher_features=None):
    loss, metrics = contrastive_loss(img, txt, scale, bias, kind=loss_kind, mesh=mesh,
                                     batch_axes=sharding.BATCH_AXES, chunk_size=chunk)
    if rows:
      captioning = caption_loss(rows)
      metrics = {**metrics, 'contrastive_loss': loss, 'caption_loss': captioning}
      loss = config.contrastive_weight * loss + config.caption_weight * captioning
    if teacher_features is None:
      return loss, metrics
    distill_loss = distillation_loss(img, txt, scale, *teacher_features, mesh=mesh,
                                     batch_axes=sharding.BATCH_AXES)
    return loss + config.distill_weight * distill_loss, {
        'contrastive_loss': loss, **metrics, 'distill_loss': distill_loss}

  def step_fn(state, batch, teacher_params=None):
    params = state['params']
    if patch_dropout:
      batch = {**batch, 'dropout_keys': dropout_keys(config.seed, state['step'],
                                                     batch['text'].shape[0], batch_sharding)}
    teacher_features = (None if teacher is None else
                        teacher.embed(teacher_params, batch, mesh, accum, batch_sharding))
    grads_fn = accumulate.value_and_grad(
        embed, functools.partial(loss_of, teacher_features=teacher_features), accum=accum,
        mode=accum_mode, batch_sharding=batch_sharding)
    (loss, metrics), grads, batch_stats = grads_fn(params, state['batch_stats'], batch)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    new_params['logit_scale'] = jnp.minimum(new_params['logit_scale'], MAX_LOGIT_SCALE)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep(new, old):  # a non-finite step changes nothing
      return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = {'params': keep(new_params, params),
                 'opt_state': keep(opt_state, state['opt_state']),
                 'step': state['step'] + 1,
                 'bad_steps': jnp.where(ok, 0, state['bad_steps'] + 1),
                 'batch_stats': keep(batch_stats, state['batch_stats'])}
    if ema_decay:
      # ema = d * ema + (1 - d) * params, after the update. It starts at the initial params,
      # so it needs no debiasing (optax.ema, made for gradients, starts at zeros and does).
      ema = optax.tree.update_moment(new_params, state['ema'], ema_decay, order=1)
      new_state['ema'] = keep(ema, state['ema'])
    metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm,
               'logit_scale': jnp.exp(params['logit_scale']),
               'logit_bias': params.get('logit_bias', jnp.zeros(())),
               'skipped_nonfinite': 1 - ok.astype(jnp.int32),
               'bad_steps': new_state['bad_steps']}
    return new_state, metrics

  in_shardings = (state_shardings, batch_sharding, *([teacher.shardings] if teacher else []))
  return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(state_shardings, None),
                 donate_argnums=(0,))


def caption_targets(batch: dict, cfg: CLIPConfig) -> tuple[jax.Array, jax.Array]:
  """The decoder's targets (the token after each input position) and which of them count:
  CoCa's are the caption's tokens past the first, padding ignored (OpenCLIP's `CoCaLoss`);
  LocCa's are its own sequence's, counted where the data marks a task's answer."""
  if cfg.decoder is not None and cfg.decoder.embed_tokens:
    return batch['decoder_tokens'][:, 1:], batch['decoder_mask'][:, 1:]
  targets = batch['text'][:, 1:]
  return targets, targets != cfg.text.pad_id


def needs_dropout_keys(cfg: CLIPConfig) -> bool:
  """Whether training draws per-image keys: patch dropout or stochastic depth."""
  return cfg.vision.patch_dropout > 0 or getattr(cfg.vision, 'drop_path', 0.0) > 0


def dropout_keys(seed: int, step: jax.Array, batch_size: int, batch_sharding) -> jax.Array:
  """One key per row of the global batch, a function of (seed, step, row) only: a resumed
  run, another mesh or any `optim.grad_accum` drops the same patches of the same image."""
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), batch_size)
  return jax.lax.with_sharding_constraint(keys, batch_sharding)
