"""OpenCLIP (PyTorch) reference models and feature helpers shared by the parity tests.

Imports torch: pure-JAX tests use `tests.jax_reference` (re-exported here) instead.
"""

from __future__ import annotations

import copy
import functools
from unittest import mock

import numpy as np
import open_clip
import open_clip.timm_model
import torch

from clip_jax.convert.open_clip_config import model_cfg
from clip_jax.models.presets import get_config


def open_clip_model(name: str, vision_layers: int | None = None, text_layers: int | None = None,
                    text_overrides: dict | None = None, seed: int = 0,
                    vision_depths: tuple[int, ...] | None = None, config: dict | None = None,
                    trunk: dict | None = None) -> torch.nn.Module:
  """OpenCLIP's own model for preset `name`, optionally shallower, with every weight perturbed.

  Presets OpenCLIP lacks (the tiny ones) are built from the model_cfg clip_jax exports, or
  from `config` (an OpenCLIP model_cfg) when given. `trunk`: keyword arguments OpenCLIP's
  TimmModel passes on to `timm.create_model` for its `timm_model_name` (shapes timm names no
  model for: timm's own class and model function, these arguments overriding the name's).

  Random noise on all parameters (LayerNorm scales and biases included) makes any
  mis-mapped or transposed weight show up in the features.
  """
  cfg = copy.deepcopy(config or open_clip.get_model_config(name))
  if cfg is None:  # a clip_jax-only preset (tiny): OpenCLIP builds it from our exported config
    cfg = model_cfg(get_config(name))
  timm = 'timm_model_name' in cfg['vision_cfg']
  resnet = isinstance(cfg['vision_cfg'].get('layers'), (list, tuple))
  coca = 'multimodal_cfg' in cfg
  if text_layers:
    cfg['text_cfg']['layers'] = text_layers
    if coca:  # the caption decoder runs at the text tower's reduced depth
      cfg['multimodal_cfg']['layers'] = text_layers
  if vision_layers and not timm and not resnet:
    cfg['vision_cfg']['layers'] = vision_layers
  if vision_depths and resnet:  # a ModifiedResNet: its stage depths
    cfg['vision_cfg']['layers'] = list(vision_depths)
  cfg['text_cfg'].update(text_overrides or {})
  custom_text = cfg.pop('custom_text', False)
  torch.manual_seed(seed)
  create = open_clip.timm_model.timm.create_model
  with mock.patch.object(open_clip.timm_model.timm, 'create_model',
                         functools.partial(create, **(trunk or {}))):
    model = _build(cfg, coca, custom_text, seed)
  if timm and vision_layers:  # timm builds by name only: drop the extra blocks afterwards
    model.visual.trunk.blocks = model.visual.trunk.blocks[:vision_layers]
  if vision_depths and timm:  # a ConvNeXt trunk: keep the first blocks of each stage
    for stage, depth in zip(model.visual.trunk.stages, vision_depths):
      stage.blocks = stage.blocks[:depth]
  perturb(model, seed)
  return model.eval()


def _build(cfg: dict, coca: bool, custom_text: bool, seed: int) -> torch.nn.Module:
  if not coca:
    return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
  model = open_clip.CoCa(**cfg)
  # OpenCLIP never initialises the decoder's projection (torch.empty: whatever memory
  # held), so two builds differ: draw it from the seed, as its TextTransformer would.
  proj = model.text_decoder.text_projection
  with torch.no_grad():
    proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(seed))
               * proj.shape[0] ** -0.5)
  return model


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Noise on every parameter; a BatchNorm's weight, bias and running statistics (buffers)
  are drawn afresh, far from their init (weight 1 or 0, mean 0, var 1), so that a swapped
  or ignored statistic shows in the features."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    for m in model.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        uniform = lambda low, high, m=m: low + (high - low) * torch.rand(
            m.running_var.shape, generator=generator)
        m.weight.copy_(uniform(0.5, 1.5))
        m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
        m.running_var.copy_(uniform(0.5, 2.0))
        m.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (), generator=generator)))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def torch_features(model: torch.nn.Module, images: np.ndarray, tokens: np.ndarray):
  """Normalised OpenCLIP features for NHWC images and token ids."""
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
    txt = model.encode_text(torch.from_numpy(tokens).long(), normalize=True)
  return img.numpy(), txt.numpy()


def torch_caption_logits(model: torch.nn.Module, images: np.ndarray, tokens: np.ndarray
                         ) -> np.ndarray:
  """OpenCLIP CoCa's teacher-forced caption logits [B, T - 1, vocab] (its `forward`)."""
  with torch.no_grad():
    out = model(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(tokens).long())
  return out['logits'].numpy()
