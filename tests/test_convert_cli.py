"""Converter CLIs, weight-file formats, checkpoint resolution and bad-input errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import clip_jax
from clip_jax.checkpoint import load_params, resolve_checkpoint, save_model
from clip_jax.convert.files import read_state_dict
from clip_jax.convert.open_clip import CheckpointMismatchError
from clip_jax.convert.open_clip_config import UnsupportedForOpenCLIP
from clip_jax.export import CONFIG_NAME, export
from clip_jax.import_open_clip import import_state_dict
from clip_jax.models.functional import get_params
from tests.jax_reference import jax_features, random_inputs
from tests.reference import open_clip_model, state_dict_numpy

TINY_CFG = clip_jax.get_config('tiny')


def _run(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        check=False)


@pytest.fixture(scope='module')
def tiny_torch():
  return open_clip_model('tiny')


@pytest.mark.parametrize('fmt', ['safetensors', 'pt_wrapped', 'bin_ddp'])
def test_import_cli_reads_every_weight_format(fmt, tiny_torch, tmp_path):
  state = tiny_torch.state_dict()
  if fmt == 'safetensors':
    path = tmp_path / 'w.safetensors'
    save_file({k: v.numpy() for k, v in state.items()}, str(path))
  elif fmt == 'pt_wrapped':
    path = tmp_path / 'w.pt'
    torch.save({'epoch': 3, 'state_dict': state}, path)
  else:
    path = tmp_path / 'w.bin'
    torch.save({f'module.{k}': v for k, v in state.items()}, path)
  out = tmp_path / 'ckpt'
  result = _run('clip_jax.import_open_clip', '--model', 'tiny', '--checkpoint', str(path),
                '--out', str(out))
  assert result.returncode == 0, result.stderr
  cfg, params = load_params(out)
  assert cfg == TINY_CFG
  np.testing.assert_array_equal(params['text']['token_embed'],
                                state['token_embedding.weight'].numpy())


class _WritesMarker:
  """Unpickling this object calls `pathlib.Path(marker).write_text('pwned')`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return pathlib.Path.write_text, (pathlib.Path(self.marker), 'pwned')


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
  """torch.load(weights_only=True): a checkpoint whose unpickling would run code (write a
  marker file) is refused, and the code never runs. The environment variable turns torch's
  default back to unpickling (as before torch 2.6): only the loader's explicit flag holds."""
  monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
  path, marker = tmp_path / 'evil.pt', tmp_path / 'marker'
  torch.save({'state_dict': {'x': torch.zeros(1)}, 'payload': _WritesMarker(str(marker))}, path)
  assert not marker.exists()
  with pytest.raises(Exception, match='(?i)weights_only|unsupported|global'):
    read_state_dict(path)
  assert not marker.exists()


def test_mismatched_checkpoint_names_every_bad_key(tiny_torch):
  state = state_dict_numpy(tiny_torch)
  del state['visual.ln_post.weight']
  state['extra.weight'] = np.zeros(3, np.float32)
  state['text_projection'] = np.zeros((64, 32), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    import_state_dict(TINY_CFG, state)
  message = str(err.value)
  assert "missing key 'visual.ln_post.weight'" in message
  assert "unexpected key 'extra.weight'" in message
  assert "'text_projection' has shape (64, 32), model expects (64, 64)" in message


def test_import_checks_the_preset_name_and_file(tmp_path):
  result = _run('clip_jax.import_open_clip', '--model', 'ViT-B-33', '--checkpoint', 'x.pt',
                '--out', str(tmp_path / 'o'))
  assert result.returncode != 0 and 'ViT-B-32' in result.stderr
  result = _run('clip_jax.import_open_clip', '--model', 'tiny', '--checkpoint',
                str(tmp_path / 'absent.safetensors'), '--out', str(tmp_path / 'o'))
  assert result.returncode != 0 and 'absent.safetensors does not exist' in result.stderr


def test_import_cli_override_for_reduced_depth(tmp_path):
  torch_model = open_clip_model('ViT-B-32', 1, 1)
  path = tmp_path / 'w.safetensors'
  save_file(state_dict_numpy(torch_model), str(path))
  out = tmp_path / 'ckpt'
  result = _run('clip_jax.import_open_clip', '--model', 'ViT-B-32', '--checkpoint', str(path),
                '--out', str(out), '--override', 'vision.layers=1', '--override', 'text.layers=1')
  assert result.returncode == 0, result.stderr
  assert load_params(out)[0].vision.layers == 1


def test_export_cli_from_a_workdir_uses_the_latest_step(tmp_path):
  workdir = tmp_path / 'workdir'
  older, newer = clip_jax.create_model('tiny', seed=1), clip_jax.create_model('tiny', seed=2)
  save_model(workdir / 'checkpoints' / '100', older.cfg, get_params(older))
  save_model(workdir / 'checkpoints' / '200', newer.cfg, get_params(newer))
  assert resolve_checkpoint(workdir).name == '200'
  out = tmp_path / 'exported'
  result = _run('clip_jax.export', '--checkpoint', str(workdir), '--out', str(out))
  assert result.returncode == 0, result.stderr
  config = json.loads((out / CONFIG_NAME).read_text())
  assert config['preprocess_cfg']['size'] == 32 and config['model_cfg']['embed_dim'] == 64
  torch_model = open_clip.create_model(f'local-dir:{out}').eval()
  images, tokens = random_inputs(32, 32, 49408)
  with torch.no_grad():
    ref = torch_model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
  np.testing.assert_allclose(ref.numpy(), jax_features(newer, images, tokens)[0], atol=1e-5)


def test_path_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='holds no clip_jax checkpoint'):
    resolve_checkpoint(tmp_path)
  result = _run('clip_jax.export', '--checkpoint', str(tmp_path), '--out', str(tmp_path / 'o'))
  assert result.returncode != 0 and 'holds no clip_jax checkpoint' in result.stderr


def test_checkpoints_are_never_overwritten(tmp_path):
  model = clip_jax.create_model('tiny')
  save_model(tmp_path / 'c', model.cfg, get_params(model))
  with pytest.raises(FileExistsError, match='already exists'):
    save_model(tmp_path / 'c', model.cfg, get_params(model))


@pytest.mark.parametrize('overrides,message', [
    ({'vision.pool': 'map', 'vision.class_token': False}, 'timm_model_name'),
    ({'text.pool': 'mean'}, "'mean' pooling"),
    ({'vision.act': 'quick_gelu'}, 'quick_gelu in both towers'),
])
def test_export_refuses_what_open_clip_cannot_build(overrides, message, tmp_path):
  model = clip_jax.create_model('tiny', **overrides)
  save_model(tmp_path / 'c', model.cfg, get_params(model))
  with pytest.raises(UnsupportedForOpenCLIP, match=message):
    export(str(tmp_path / 'c'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()  # nothing half-written


def test_reduced_depth_siglip_cannot_pretend_to_be_the_timm_model(tmp_path):
  cfg = clip_jax.get_config('ViT-B-16-SigLIP', **{'vision.layers': 2})
  from clip_jax.convert.open_clip_config import model_cfg
  with pytest.raises(UnsupportedForOpenCLIP, match=r'layers=2 \(timm: 12\)'):
    model_cfg(cfg)


def test_load_returns_model_preprocess_and_tokenizer_like_open_clip(tmp_path):
  model = clip_jax.create_model('tiny')
  save_model(tmp_path / 'c', model.cfg, get_params(model))
  loaded, preprocess, tokenizer = clip_jax.load(str(tmp_path / 'c'))
  out = export(str(tmp_path / 'c'), str(tmp_path / 'oc'))
  torch_model, _, torch_preprocess = open_clip.create_model_and_transforms(f'local-dir:{out}')
  torch_tokenizer = open_clip.get_tokenizer(f'local-dir:{out}')

  rng = np.random.default_rng(0)
  photos = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for h, w in ((48, 80), (100, 40), (32, 32), (481, 640), (101, 333))]
  ours = np.stack([preprocess(p) for p in photos])
  theirs = torch.stack([torch_preprocess(p) for p in photos]).permute(0, 2, 3, 1).numpy()
  assert ours.shape == theirs.shape == (5, 32, 32, 3)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)

  texts = ['a red square', 'two blue circles']
  np.testing.assert_array_equal(tokenizer(texts), torch_tokenizer(texts).numpy())
  img, txt = jax_features(loaded, theirs.astype(np.float32), tokenizer(texts))
  with torch.no_grad():
    ref_img = torch_model.encode_image(torch.from_numpy(theirs).permute(0, 3, 1, 2),
                                       normalize=True).numpy()
  np.testing.assert_allclose(ref_img, img, atol=1e-5)
  assert txt.shape == (2, 64)
