"""The OpenCLIP-shaped entry points: create_model, load, get_tokenizer, list_models."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np
from etils import epath
from flax import nnx

from clip_jax.checkpoint import load_model_config, load_params
from clip_jax.data.tokenizers import Tokenizer, tokenizer_from_spec
from clip_jax.data.transforms import make_preprocess
from clip_jax.models.clip import CLIP
from clip_jax.models.config import CLIPConfig
from clip_jax.models.presets import PRESETS, get_config

Params = dict[str, Any]


def create_model(name_or_cfg: str | CLIPConfig, *, seed: int = 0, **overrides: Any) -> CLIP:
  """A randomly initialised model from a preset name (or a CLIPConfig) and overrides."""
  cfg = (get_config(name_or_cfg, **overrides) if isinstance(name_or_cfg, str)
         else name_or_cfg.replace(**overrides).validate())
  return CLIP(cfg, rngs=nnx.Rngs(seed))


@dataclasses.dataclass
class FunctionalModel:
  """A model as a pure function of its params dict, for use inside `jax.jit`."""
  cfg: CLIPConfig
  abstract: CLIP   # shapes and metadata only, no arrays
  graphdef: Any
  template: Any    # the abstract nnx.State of the params

  @classmethod
  def create(cls, cfg: CLIPConfig) -> 'FunctionalModel':
    abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    graphdef, template = nnx.split(abstract, nnx.Param)
    return cls(cfg, abstract, graphdef, template)

  def bind(self, params: Params) -> CLIP:
    """The module with `params` (arrays or tracers) in place."""
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def shapes(self) -> Params:
    return jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(self.template))

  def check(self, params: Params) -> None:
    """Raises ValueError naming the first parameter missing, extra or mis-shaped."""
    expected, got = self.shapes(), jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if expected != got:
      raise ValueError('Params do not match the model config: '
                       f'{_first_difference(expected, got)}')


def param_shapes(cfg: CLIPConfig) -> Params:
  """The params tree of shapes, computed without allocating the model."""
  return FunctionalModel.create(cfg).shapes()


def get_params(model: CLIP) -> Params:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(cfg: CLIPConfig, params: Params) -> CLIP:
  """Builds the model without random init and fills it with `params` (shapes checked)."""
  model = FunctionalModel.create(cfg)
  model.check(params)
  return model.bind(jax.tree.map(jax.numpy.asarray, params))


def _first_difference(expected: Any, got: Any, path: str = '') -> str:
  if isinstance(expected, dict) and isinstance(got, dict):
    for key in sorted(set(expected) | set(got)):
      if key not in got:
        return f'missing {path}{key}'
      if key not in expected:
        return f'unexpected {path}{key}'
      diff = _first_difference(expected[key], got[key], f'{path}{key}/')
      if diff:
        return diff
    return ''
  return '' if expected == got else f'{path.rstrip("/")}: model {expected}, params {got}'


def get_tokenizer(name_or_path: str, context_length: Optional[int] = None) -> Tokenizer:
  """A preset name, 'clip', a sentencepiece `.model` path or a clip_jax checkpoint dir."""
  if name_or_path in PRESETS:
    text = PRESETS[name_or_path].text
  elif epath.Path(name_or_path).is_dir():
    text = load_model_config(name_or_path).text
  else:
    return tokenizer_from_spec(name_or_path, context_length or 77)
  if not text.tokenizer:
    raise ValueError(
        f'{name_or_path} uses a sentencepiece tokenizer that is not shipped (OpenCLIP fetches '
        f'{text.hf_tokenizer_name} from the hub). Pass its file: '
        f"get_tokenizer('/path/to/spiece.model', context_length={text.context_length}).")
  return tokenizer_from_spec(text.tokenizer, context_length or text.context_length)


def load(path: str) -> tuple[CLIP, Callable[[Any], np.ndarray], Optional[Tokenizer]]:
  """(model, preprocess, tokenizer) from a clip_jax checkpoint or a training workdir.

  `preprocess` maps a PIL image to a float32 HWC array; stack them into the NHWC batch
  `model.encode_image` takes. The tokenizer is None when the model's sentencepiece file
  is not known (pass one to `get_tokenizer`).
  """
  cfg, params = load_params(path)
  model = model_from_params(cfg, params)
  preprocess = make_preprocess(cfg.preprocess, cfg.vision.image_size)
  tokenizer = (tokenizer_from_spec(cfg.text.tokenizer, cfg.text.context_length)
               if cfg.text.tokenizer else None)
  return model, preprocess, tokenizer
