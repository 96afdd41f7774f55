"""Optimizer: AdamW with a weight-decay mask, LR schedules, clipping and frozen towers.

Weight decay applies to matrices only (`kernel`s and the image projection), never to
biases, norms, embeddings (positional, token, class token, MAP probe) or the logit scale/bias.
(OpenCLIP is close but not equal: it exempts only <2-D tensors, norms, biases and the logit
scale, so it does decay its positional and token embeddings.) Parameters whose
'/'-joined path matches `freeze` (a regex, e.g. '^visual/' for LiT) get no update.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import optax

SCHEDULES = ('cosine', 'constant', 'constant_cooldown')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The `config.optim` section: every key with its default (`config_base` builds the
  section from these fields, `run_config.resolve` checks it into this frozen form)."""
  lr: float = 5e-4
  warmup_steps: int = 100
  schedule: str = 'cosine'        # 'cosine' | 'constant' | 'constant_cooldown'
  end_lr_ratio: float = 0.0
  cooldown_steps: int = 0
  weight_decay: float = 0.2
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-6
  clip_norm: float = 1.0
  grad_accum: int = 1             # micro-batches per step (clip_jax/accumulate.py)
  grad_accum_mode: str = 'cache'  # 'cache': negatives over the global batch | 'micro'
  freeze: str = ''                # regex on parameter paths, e.g. '^visual/' (LiT)
  ema_decay: float = 0.0          # >0: keep an EMA of the params (e.g. 0.9999); 0 = off


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine to `end_lr_ratio` x lr, constant, or constant + linear cooldown."""
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  rest = max(total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == 'constant':
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == 'constant_cooldown':
    cooldown = min(cfg.cooldown_steps, rest)
    main = optax.join_schedules(
        [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, 0.0, max(cooldown, 1))],
        [rest - cooldown])
  else:
    raise ValueError(f'config.optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}')
  return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def _paths(params: Any) -> Any:
  """Same tree with each leaf replaced by its '/'-joined path, e.g. 'text/ln_final/scale'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path, simple=True, separator='/'), params)


def decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.endswith('/kernel') or p == 'visual/proj', _paths(params))


def freeze_labels(params: Any, freeze: str) -> Any:
  pattern = re.compile(freeze) if freeze else None
  return jax.tree.map(lambda p: 'frozen' if pattern and pattern.search(p) else 'trained',
                      _paths(params))


def stop_frozen(params: Any, freeze: str) -> Any:
  """`params` with the `freeze` matches as constants (`stop_gradient`).

  Their gradients are then zeros that are never computed: a frozen tower (LiT) costs no
  backward pass, and adds nothing to the gradient norm.
  """
  if not freeze:
    return params
  return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == 'frozen' else p,
                      params, freeze_labels(params, freeze))


def make_optimizer(cfg: OptimConfig, total_steps: int, params: dict
                   ) -> optax.GradientTransformation:
  adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw
  if not cfg.freeze:
    return tx
  labels = freeze_labels(params, cfg.freeze)
  if 'frozen' not in jax.tree.leaves(labels):
    paths = jax.tree.leaves(_paths(params))
    examples = ', '.join(repr(p) for p in paths[:2] + paths[-2:])
    raise ValueError(f'config.optim.freeze={cfg.freeze!r} matches no parameter path; '
                     f'{len(paths)} paths such as {examples} (use e.g. \'^visual/\' to freeze '
                     'the image tower).')
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
