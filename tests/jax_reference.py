"""Torch-free references and helpers for the pure-JAX tests (no torch, no open_clip).

`tests/reference.py` holds the OpenCLIP (PyTorch) side and re-exports these; pure-JAX test
modules import from here so that collecting them never loads torch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from clip_jax.models.functional import FunctionalModel, model_from_params
from clip_jax.models.presets import get_config


def contrastive_loss_reference(img, txt, scale, bias, kind: str):
  """The textbook single-device formulas over the whole global batch ('softmax'|'sigmoid')."""
  logits = jnp.exp(scale) * img @ txt.T
  if kind == 'softmax':
    labels = jnp.arange(img.shape[0])
    i2t = -jax.nn.log_softmax(logits, axis=1)[labels, labels].mean()
    t2i = -jax.nn.log_softmax(logits.T, axis=1)[labels, labels].mean()
    return (i2t + t2i) / 2
  z = 2 * jnp.eye(img.shape[0]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(z * (logits + bias))) / img.shape[0]


def contrastive_loss_float64(img: np.ndarray, txt: np.ndarray, scale: float, bias: float,
                             kind: str) -> tuple[float, list[np.ndarray]]:
  """(loss, [d/d img, d/d txt, d/d scale, d/d bias]) of the reference, in float64."""
  with jax.enable_x64(True):
    args = (jnp.asarray(img, jnp.float64), jnp.asarray(txt, jnp.float64),
            jnp.float64(scale), jnp.float64(bias))
    loss, grads = jax.value_and_grad(contrastive_loss_reference, argnums=(0, 1, 2, 3))(*args,
                                                                                       kind)
    return float(loss), [np.asarray(g) for g in grads]


def jax_features(model, images: np.ndarray, tokens: np.ndarray):
  """Normalised clip_jax features, computed under jit like the trainer does."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def features(state, images, tokens):
    m = nnx.merge(graphdef, state)
    return m.encode_image(images, normalize=True), m.encode_text(tokens, normalize=True)

  img, txt = features(state, images, tokens)
  return np.asarray(img), np.asarray(txt)


def random_inputs(image_size: int, context_length: int, vocab_size: int, batch: int = 2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Images ~ N(0, 1) (normalised pixels) and token rows that each end in a unique max id."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  tokens = rng.integers(1, vocab_size - 1, size=(batch, context_length)).astype(np.int32)
  lengths = rng.integers(2, context_length + 1, size=batch)
  for row, n in enumerate(lengths):
    tokens[row, n - 1] = vocab_size - 1  # EOT-like: the argmax position varies per row
    tokens[row, n:] = 0
  return images, tokens


def perturbed_model(name: str, seed: int = 1, **overrides):
  """Preset `name` (with overrides) with random weights drawn in numpy, far from any init:
  N(0, 0.02), LayerNorm scales 1 + N(0, 0.02). Quicker than an eager JAX init (~20 s for the
  large towers); for towers without BatchNorm statistics (a variance must stay positive)."""
  cfg = get_config(name, **overrides)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(FunctionalModel.create(cfg).shapes(), sep='/',
                                    is_leaf=lambda _, x: isinstance(x, tuple))
  params = {path: (rng.normal(scale=0.02, size=shape) + path.endswith('/scale')
                   ).astype(np.float32) for path, shape in flat.items()}
  return model_from_params(cfg, traverse_util.unflatten_dict(params, sep='/'))
