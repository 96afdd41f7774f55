"""The MFU peak table: device kinds are matched exactly, never by substring; a resumed run's
metrics log."""

import json

import jax
import pytest

from clip_jax.metrics import MetricLogger, peak_flops_per_device


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
