"""The MFU peak table: device kinds are matched exactly, never by substring; the analytic
FLOPs of a caption decoder; a resumed run's metrics log."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from clip_jax.metrics import (
  MetricLogger,
  attn_pool_flops,
  decoder_flops,
  peak_flops_per_device,
  tower_flops,
  train_flops_per_sample,
)
from clip_jax.models.config import DecoderConfig
from clip_jax.models.decoder import TextDecoder
from clip_jax.models.presets import get_config


@pytest.mark.parametrize('kind, peak', [
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5', 459e12),  # v5p
    ('TPU v6 lite', 918e12),  # v6e (Trillium)
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),  # the PCIe card's own (lower) dense bf16 peak
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA A100-SXM4-40GB', 312e12),
    ('NVIDIA A100-PCIE-40GB', 312e12),
])
def test_known_device_kinds(kind, peak):
  assert peak_flops_per_device(device_kind=kind) == peak


def test_v5p_and_v5e_are_told_apart():
  assert peak_flops_per_device(device_kind='TPU v5') != peak_flops_per_device(
      device_kind='TPU v5 lite')


@pytest.mark.parametrize('kind', [
    'cpu', 'TPU v4 lite', 'TPU v5p', 'TPU v5e', 'TPU v7', 'TPU v5 lite pod', 'tpu v5',
    'NVIDIA GH200 480GB', 'NVIDIA H1000', 'NVIDIA A1000', 'NVIDIA RTX A6000',
    'Tesla V100-SXM2-16GB', 'AMD Instinct MI300X', 'H100', '',
])
def test_unknown_device_kinds_have_no_peak(kind):
  assert peak_flops_per_device(device_kind=kind) is None


def test_default_kind_is_the_first_devices(monkeypatch):
  class FakeDevice:
    device_kind = 'TPU v5'

  monkeypatch.setattr(jax, 'devices', lambda: [FakeDevice()])
  assert peak_flops_per_device() == 459e12


def test_override_wins():
  assert peak_flops_per_device(123e12) == 123e12
  assert peak_flops_per_device(123e12, device_kind='TPU v5') == 123e12


def test_decoder_flops_match_the_compiled_decoder():
  """The analytic count of a decoder (self- and cross-attention blocks over T tokens and S
  image tokens, vocabulary projection) is within 10% of XLA's count for the compiled forward
  (which adds the elementwise work: norms, softmax, GELU)."""
  width, tokens, image_tokens, vocab = 256, 31, 49, 1024
  cfg = DecoderConfig(width=width, heads=4, layers=2, mlp_dim=4 * width,
                      context_length=tokens + 1, vocab_size=vocab)
  decoder = TextDecoder(cfg, scan=False, remat='none', dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(decoder)
  forward = jax.jit(lambda state, image, text: nnx.merge(graphdef, state)(image, text))
  cost = forward.lower(state, jax.ShapeDtypeStruct((1, image_tokens, width), jnp.float32),
                       jax.ShapeDtypeStruct((1, tokens, width), jnp.float32)
                       ).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = decoder_flops(2, tokens, image_tokens, width, 4 * width, vocab)
  assert 1.0 <= cost['flops'] / analytic < 1.1, (cost['flops'], analytic)


def test_coca_counts_its_decoder_pooler_and_class_token():
  """CoCa: the text tower over the context plus the class token, the attentional pooler, and
  the decoder over context - 1 positions reading the pooler's queries after the first."""
  cfg = get_config('coca_ViT-B-32')
  v, t, d = cfg.vision, cfg.text, cfg.decoder
  towers = train_flops_per_sample(dataclasses.replace(
      cfg, decoder=None, vision=dataclasses.replace(v, attn_pool_queries=0),
      text=dataclasses.replace(t, embed_cls=False)), t.context_length)
  extra = (tower_flops(t.layers, t.context_length + 1, t.width, t.mlp_dim)
           - tower_flops(t.layers, t.context_length, t.width, t.mlp_dim)
           + attn_pool_flops(256, v.grid**2 + 1, v.width, cfg.embed_dim)
           + decoder_flops(12, t.context_length - 1, 255, 512, 2048, 49408))
  total = train_flops_per_sample(cfg, t.context_length)
  assert total == pytest.approx(towers + 3 * extra)
  assert d.layers == 12 and 2.1 < total / towers < 2.4  # the decoder more than doubles B-32


def test_locca_counts_its_own_sequence_over_the_patch_tokens():
  """LocCa: the decoder runs over decoder.context_length - 1 of its own tokens, whatever the
  text context, and reads every patch token (no class token in SigLIP)."""
  base = get_config('ViT-B-16-SigLIP')
  d = DecoderConfig(width=768, heads=12, layers=6, mlp_dim=3072, context_length=32,
                    vocab_size=32103, embed_tokens=True)
  locca = dataclasses.replace(base, decoder=d)
  added = train_flops_per_sample(locca, 64) - train_flops_per_sample(base, 64)
  assert added == pytest.approx(3 * decoder_flops(6, 31, 196, 768, 3072, 32103))


def test_a_resumed_logger_drops_the_lines_after_its_start_step(tmp_path):
  """The lines a killed run logged after the restored step (and its torn last line) go; the
  resumed run's lines for those steps are the only ones."""
  earlier = [json.dumps({'step': step, 'loss': 10.0 + step}) for step in range(1, 6)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(earlier) + '\n{"step": 6, "lo')
  logger = MetricLogger(str(tmp_path), tensorboard=False, start_step=3)
  logger.write(4, {'loss': 1.0})
  logger.close()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert records == [{'step': 1, 'loss': 11.0}, {'step': 2, 'loss': 12.0},
                     {'step': 3, 'loss': 13.0}, {'step': 4, 'loss': 1.0}]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.jsonl']  # no temporary left
