"""The public facade, shaped like OpenCLIP: create_model, load, get_tokenizer.

Internals live below it (`models/`, `data/`, `checkpoint.py`); nothing in the package
imports this module except `clip_jax/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from etils import epath
from flax import nnx

from clip_jax.checkpoint import load_model_config, load_params
from clip_jax.data.tokenizers import Tokenizer, tokenizer_from_spec
from clip_jax.eval.inputs import ImageInput
from clip_jax.models.clip import CLIP
from clip_jax.models.config import CLIPConfig
from clip_jax.models.functional import model_from_params
from clip_jax.models.presets import PRESETS, get_config


def create_model(name_or_cfg: str | CLIPConfig, *, seed: int = 0, **overrides: Any) -> CLIP:
  """A randomly initialised model from a preset name (or a CLIPConfig) and overrides."""
  cfg = (get_config(name_or_cfg, **overrides) if isinstance(name_or_cfg, str)
         else name_or_cfg.replace(**overrides).validate())
  return CLIP(cfg, rngs=nnx.Rngs(seed))


def get_tokenizer(name_or_path: str, context_length: int | None = None) -> Tokenizer:
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


def load(path: str, ema: bool = False, seq_len: int | None = None
         ) -> tuple[CLIP, Callable[[Any], Any], Tokenizer | None]:
  """(model, preprocess, tokenizer) from a clip_jax checkpoint or a training workdir.

  `ema=True` loads the EMA of the params (a run trained with `config.optim.ema_decay`).

  `preprocess` maps a PIL image to a float32 HWC array; stack them into the NHWC batch
  `model.encode_image` takes. A NaFlex model with `seq_len` sees each image at its own
  aspect ratio: `preprocess` gives its `NaFlexPatches` (at most `seq_len` patches, padded),
  batched by `jax.tree.map(lambda *x: np.stack(x), *rows)`. The tokenizer is None when the
  model's sentencepiece file is not known (pass one to `get_tokenizer`).
  """
  cfg, params = load_params(path, ema=ema)
  model = model_from_params(cfg, params)
  preprocess = ImageInput.of(cfg, seq_len, 'seq_len').normalized
  tokenizer = (tokenizer_from_spec(cfg.text.tokenizer, cfg.text.context_length)
               if cfg.text.tokenizer else None)
  return model, preprocess, tokenizer
