"""The whole train step lowered for NVIDIA GPUs on a CPU host: cuDNN flash attention in it.

Needs a CUDA jaxlib (`jax[cuda13]`, 4.3 GB), which the test extra does not install: the
main test run leaves this file out (pytest.ini) and `.ci/run` runs it in its own
environment, `.venv-cuda` (docs/tests.md). JAX_PLATFORMS=cpu (tests/conftest.py): no GPU is
used. The program is lowered (`Traced.lower(lowering_platforms=('cuda',))`), not compiled:
the cuDNN calls, their shapes and masks are in the StableHLO as the GPU compiler gets it.
"""

import collections
import logging
import re

import jax
import pytest

from clip_jax import run_config, sharding, step
from clip_jax.config_base import base_config

BATCH = 16
# `tiny` with 49 patches + class token (50 tokens, padded to 64) and CLIP's 77-token text
# (padded to 80), bf16, on a 2x2x2 mesh: 4 rows and 2 heads of 16 dims per device.
OVERRIDES = {'model.name': 'tiny', 'model.vision.image_size': 56,
             'model.text.context_length': 77, 'model.dtype': 'bfloat16', 'batch_size': BATCH,
             'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
TOKENS = {'image': 50, 'text': 77}
PADDED = {'image': 64, 'text': 80}
_CALL = re.compile(r'custom_call @__cudnn\$(fmhaSoftmax\w*)\(.*?mask_type\\22: \\22(\w+)\\22'
                   r'.*?} : \(tensor<(\d+)x(\d+)x(\d+)x(\d+)xbf16>')


def _lowered_for_cuda(**overrides) -> str:
  config = base_config()
  config.update_from_flattened_dict({**OVERRIDES, 'model.attention': 'auto', **overrides})
  run = run_config.resolve(config, len(jax.devices()), data=False)
  program = step.build(run, sharding.make_mesh(run.mesh, jax.devices()), abstract=True)
  traced = program.jitted_step.trace(program.state, program.batch_shapes(BATCH))
  return traced.lower(lowering_platforms=('cuda',)).as_text()


def _cudnn_calls(stablehlo: str) -> collections.Counter:
  """(call, padded tokens, mask) -> how many, from the per-device [B, T, H, D] q."""
  calls = collections.Counter()
  for name, mask, b, t, h, d in _CALL.findall(stablehlo):
    assert (int(b), int(h), int(d)) == (BATCH // 4, 2, 16), (name, b, h, d)  # per device
    calls[name, int(t), mask] += 1
  return calls


def _square_attention_tensors(stablehlo: str) -> set[str]:
  """Rank-4 tensors whose last two dims are a tower's sequence length: [B, H, T, T]."""
  lengths = {str(t) for t in (*TOKENS.values(), *PADDED.values())}
  return {m.group(0) for m in re.finditer(r'tensor<\d+x\d+x(\d+)x(\d+)x\w+>', stablehlo)
          if m.group(1) == m.group(2) and m.group(1) in lengths}


@pytest.mark.parametrize('scan', [True, False], ids=['scanned', 'unrolled'])
def test_the_train_step_for_gpu_runs_both_towers_attention_in_cudnn(scan):
  """`attention='auto'` lowered for `cuda`: every attention layer of both towers is cuDNN's
  flash attention, forward and backward, on tokens padded to a multiple of 16 and masked by
  their true lengths (the text tower also causal), and no [B, H, T, T] tensor (logits,
  mask or padding) of any dtype is left in the program. Per tower the scanned layer body
  holds the forward pass, and in the backward pass the forward again (the backward
  recomputes it from q, k, v) and the backward."""
  stablehlo = _lowered_for_cuda(**{'model.scan_layers': scan})
  expected = {('fmhaSoftmax', PADDED['image'], 'PADDING'): 2,
              ('fmhaSoftmaxBackward', PADDED['image'], 'PADDING'): 1,
              ('fmhaSoftmax', PADDED['text'], 'PADDING_CAUSAL'): 2,
              ('fmhaSoftmaxBackward', PADDED['text'], 'PADDING_CAUSAL'): 1}
  calls = _cudnn_calls(stablehlo)
  # Unrolled, identical layer bodies may share one lowered function: the kinds are checked.
  assert (calls == expected) if scan else (calls.keys() == expected.keys()), calls
  assert not _square_attention_tensors(stablehlo)


def test_xla_attention_keeps_the_logits_that_cudnn_avoids():
  """The check above can fail: the XLA path lowered for `cuda` has no cuDNN call and holds
  both towers' [B, H, T, T] logits."""
  stablehlo = _lowered_for_cuda(**{'model.attention': 'xla'})
  assert not _cudnn_calls(stablehlo)
  assert {f'tensor<{BATCH}x4x{t}x{t}xf32>' for t in TOKENS.values()} <= (
      _square_attention_tensors(stablehlo))


def test_float32_falls_back_to_xla_with_one_log_line_per_shape(caplog):
  """cuDNN refuses float32: found when the step is traced, the XLA path lowered instead (no
  cuDNN call, no error later), one warning per attention shape (image, text) naming why."""
  with caplog.at_level(logging.WARNING, logger='root'):
    stablehlo = _lowered_for_cuda(**{'model.dtype': 'float32'})
  assert not _cudnn_calls(stablehlo)
  refusals = [r.getMessage() for r in caplog.records if 'cuDNN flash attention' in r.getMessage()]
  assert len(refusals) == 2, refusals
  assert all('float32' in message for message in refusals), refusals
