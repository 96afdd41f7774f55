"""Every preset is the architecture OpenCLIP builds under the same name.

OpenCLIP's own models are instantiated on the `meta` device (shapes and modules, no
memory), so even ViT-bigG-14 and ViT-e-14 are checked at full size: every state_dict
key and shape, the activation of each tower, LayerNorm eps, text masking and pooling.
"""

import open_clip
import pytest
import torch
from open_clip.model import CLIP as TorchCLIP
from open_clip.model import CustomTextCLIP
from open_clip.transformer import QuickGELU

import clip_jax
from clip_jax.convert.open_clip import open_clip_shapes
from clip_jax.models.functional import param_shapes

# Presets under OpenCLIP's names: not the tiny ones, nor NaFlex's, named as timm names its
# trunks (OpenCLIP has no NaFlex config: tests/test_naflex.py exports them to it).
OPEN_CLIP_PRESETS = [n for n in clip_jax.list_models() if not n.startswith(('tiny', 'naflexvit_'))]


def _meta_model(name):
  cfg = dict(open_clip.get_model_config(name))
  custom_text = cfg.pop('custom_text', False)
  kind = (open_clip.CoCa if 'multimodal_cfg' in cfg
          else CustomTextCLIP if custom_text else TorchCLIP)
  with torch.device('meta'):
    return kind(**cfg), cfg


def _act_name(module):
  if isinstance(module, QuickGELU):
    return 'quick_gelu'
  if type(module).__name__ == 'GELUTanh' or getattr(module, 'approximate', 'none') == 'tanh':
    return 'gelu_tanh'
  assert isinstance(module, torch.nn.GELU), module
  return 'gelu'


def _assert_eva_trunk(trunk, v, embed_dim):
  """A timm Eva trunk (PE-Core, EVA-01/02) against its EvaConfig, option by option."""
  block = trunk.blocks[0]
  assert trunk.norm.eps == block.norm1.eps == v.norm_eps
  assert len(trunk.blocks) == v.layers and block.attn.num_heads == v.heads
  assert trunk.num_prefix_tokens == int(v.class_token)
  assert isinstance(trunk.norm_pre, torch.nn.Identity) != v.ln_pre
  assert (trunk.patch_embed.proj.bias is not None) == v.patch_bias
  assert type(block).__name__ == ('EvaBlockPostNorm' if v.post_norm else 'EvaBlock')
  assert isinstance(block.attn.norm, torch.nn.Identity) != v.attn_norm
  mlp = block.mlp
  assert (type(mlp).__name__ == 'SwiGLU') == v.gated_mlp
  act = mlp.act
  assert (type(act).__name__ == 'SiLU') if v.act == 'silu' else _act_name(act) == v.act
  assert isinstance(mlp.norm, torch.nn.Identity) != v.mlp_norm
  rope = trunk.rope
  assert (rope is not None) == v.rope
  if v.rope:  # timm's RotaryEmbeddingCat: index grid, interleaved pairs
    assert type(rope).__name__ == 'RotaryEmbeddingCat' and not rope.in_pixels
    assert rope.grid_offset == v.rope_offset and rope.temperature == v.rope_temperature
    assert rope.grid_indexing == ('xy' if v.rope_xy else 'ij') and not rope.rotate_half
    ref = rope.ref_feat_shape
    assert (None if ref is None else tuple(ref)) == (
        None if v.rope_ref_grid is None else (v.rope_ref_grid,) * 2)
  pool = trunk.attn_pool
  assert (pool is not None) == (v.pool == 'map')
  if pool is not None:
    assert pool.num_heads == v.map_heads and pool.mlp.fc1.out_features == v.map_mlp_dim
    assert _act_name(pool.mlp.act) == 'gelu' and pool.norm.eps == v.norm_eps
  assert trunk.global_pool == ('map' if v.pool == 'map' else 'token')
  assert isinstance(trunk.fc_norm, torch.nn.Identity)
  assert trunk.head.out_features == embed_dim and (trunk.head.bias is not None) == v.proj_bias


def test_presets_cover_open_clip_names():
  assert len(OPEN_CLIP_PRESETS) >= 50
  assert set(OPEN_CLIP_PRESETS) <= set(open_clip.list_models())


def test_presets_cover_the_open_clip_vit_and_siglip_families():
  names = set(clip_jax.list_models())
  for required in ('ViT-S-16', 'ViT-M-32', 'ViT-B-32', 'ViT-B-16', 'ViT-L-14', 'ViT-H-14',
                   'ViT-g-14', 'ViT-bigG-14', 'ViT-B-32-quickgelu', 'ViT-B-16-plus-240',
                   'ViT-L-14-336', 'ViT-H-14-378', 'ViT-B-16-SigLIP', 'ViT-B-16-SigLIP-256',
                   'ViT-B-16-SigLIP-384', 'ViT-B-16-SigLIP-512', 'ViT-B-16-SigLIP-i18n-256',
                   'ViT-L-16-SigLIP-256', 'ViT-L-16-SigLIP-384', 'ViT-SO400M-14-SigLIP',
                   'ViT-SO400M-14-SigLIP-384', 'tiny'):
    assert required in names


@pytest.mark.parametrize('name', OPEN_CLIP_PRESETS)
def test_preset_matches_open_clip_architecture(name):
  torch_model, torch_cfg = _meta_model(name)
  cfg = clip_jax.get_config(name)
  ours = open_clip_shapes(cfg, param_shapes(cfg))
  theirs = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  assert ours == theirs

  text = torch_model.text if cfg.custom_text else torch_model
  assert _act_name(text.transformer.resblocks[0].mlp.gelu) == cfg.text.act
  assert text.ln_final.eps == cfg.text.norm_eps
  assert (text.attn_mask is not None) == cfg.text.causal
  assert getattr(text, 'pool_type', getattr(text, 'text_pool_type', None)) == cfg.text.pool
  if cfg.vision.kind == 'convnext':
    trunk = torch_model.visual.trunk
    assert trunk.stem[1].eps == trunk.head.norm.eps == cfg.vision.norm_eps
    act = trunk.stages[0].blocks[0].mlp.act  # timm's own GELU module: exact (erf)
    assert type(act).__name__ == 'GELU' and getattr(act, 'approximate', 'none') == 'none'
    assert [len(stage.blocks) for stage in trunk.stages] == list(cfg.vision.depths)
    assert (trunk.stages[0].blocks[0].gamma is not None) == (cfg.vision.ls_init is not None)
    # timm_drop_path: timm's per-block rates, rising linearly to the config's
    rates = [0.0 if isinstance(b.drop_path, torch.nn.Identity) else b.drop_path.drop_prob
             for stage in trunk.stages for b in stage.blocks]
    ours = [r for stage in cfg.vision.drop_path_rates for r in stage]
    assert rates == pytest.approx(ours, abs=1e-6)
  elif cfg.vision.kind == 'resnet':
    visual = torch_model.visual
    assert [len(stage) for stage in (visual.layer1, visual.layer2, visual.layer3,
                                     visual.layer4)] == list(cfg.vision.depths)
    assert visual.attnpool.num_heads == cfg.vision.heads
    assert visual.image_size == cfg.vision.image_size
    assert {m.eps for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
    assert {m.momentum for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
  elif cfg.vision.kind == 'eva':
    _assert_eva_trunk(torch_model.visual.trunk, cfg.vision, cfg.embed_dim)
  elif cfg.vision.timm_model_name:
    trunk = torch_model.visual.trunk
    assert _act_name(trunk.blocks[0].mlp.act) == cfg.vision.act
    assert _act_name(trunk.attn_pool.mlp.act) == cfg.vision.act
    assert trunk.norm.eps == cfg.vision.norm_eps
  else:
    assert _act_name(torch_model.visual.transformer.resblocks[0].mlp.gelu) == cfg.vision.act
    assert torch_model.visual.ln_post.eps == cfg.vision.norm_eps
  assert torch_cfg.get('init_logit_bias') == cfg.init_logit_bias
  if cfg.decoder is not None:  # CoCa
    decoder = torch_model.text_decoder
    assert _act_name(decoder.resblocks[0].mlp.gelu) == cfg.decoder.act
    assert decoder.ln_final.eps == cfg.decoder.norm_eps
    assert decoder.context_length == cfg.decoder.context_length
