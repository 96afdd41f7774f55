"""Training logs: TensorBoard (clu), `WORKDIR/metrics.jsonl`, a console line, and MFU.

Only process 0 writes files. FLOPs are counted analytically per tower
(L * (8Nd^2 + 4Nd*mlp + 4N^2 d), plus the patch embedding; a gated (SwiGLU) MLP's third
matmul adds 2Nd*mlp; a ConvNeXt's convolutions and MLPs: `convnext_flops`; a
ModifiedResNet's convolutions and attention pool: `resnet_flops`), plus a caption decoder's
(`decoder_flops`) and CoCa's attentional pooler, x3 for training.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from clip_jax.models.config import (
  CLIPConfig,
  ConvNeXtConfig,
  EvaConfig,
  ResNetConfig,
  kept_count,
)

# Dense bf16 peak FLOP/s per device, for the MFU estimate. TPUs by their exact
# `device_kind` ('TPU v5' is v5p, 'TPU v5 lite' is v5e: a substring rule would mix them up).
TPU_PEAK_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5': 459e12,
                  'TPU v6 lite': 918e12}
# NVIDIA GPUs report 'NVIDIA <model>[ -]<variant>' ('NVIDIA H100 80GB HBM3',
# 'NVIDIA A100-SXM4-80GB', 'NVIDIA H200'): the whole <model> token is looked up, so 'H100'
# never matches 'GH100' or 'H1000'. Exact kinds whose peak differs from their model's come first.
GPU_KIND_PEAK_FLOPS = {'NVIDIA H100 PCIe': 756e12}
GPU_MODEL_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}
_NVIDIA_KIND = re.compile(r'NVIDIA ([A-Za-z0-9]+)(?:[ -].*)?')


def tower_flops(layers: int, tokens: int, width: int, mlp: int, gated: bool = False) -> float:
  """Forward FLOPs of `layers` transformer blocks over `tokens`: q, k, v and output
  projections, the MLP's matmuls (3 when `gated`: SwiGLU's gate), attention scores and values.
  Norms, activations and rotary embeddings are not counted."""
  mlp_matmuls = 3 if gated else 2
  per_layer = (8 * tokens * width**2 + 2 * mlp_matmuls * tokens * width * mlp
               + 4 * tokens**2 * width)
  return float(layers * per_layer)


def decoder_flops(layers: int, tokens: int, image_tokens: int, width: int, mlp: int,
                  vocab: int) -> float:
  """Forward FLOPs of a caption decoder over `tokens` (T) positions reading `image_tokens`
  (S): per layer a self-attention block (a tower layer over T) and a cross-attention block
  (queries and output over T: 4Td^2; keys and values of the S image tokens, projected in
  every layer: 4Sd^2; scores and values 4TSd; MLP 4Td*mlp), then the vocabulary projection
  2Td*vocab."""
  t, s, d = tokens, image_tokens, width
  cross = 4 * t * d**2 + 4 * s * d**2 + 4 * t * s * d + 4 * t * d * mlp
  return tower_flops(layers, t, d, mlp) + float(layers * cross + 2 * t * d * vocab)


def attn_pool_flops(queries: int, tokens: int, context_width: int, dim: int) -> float:
  """CoCa's attentional pooler per image: keys and values of `tokens` (4Nd_v*dim), scores and
  values (4QN*dim), output projection (2Q*dim^2); the queries' own projection is per batch."""
  return float(4 * tokens * context_width * dim + 4 * queries * tokens * dim
               + 2 * queries * dim**2)


def convnext_block_flops(v: ConvNeXtConfig) -> list[float]:
  """Forward FLOPs of one block of each stage per image (depthwise conv and MLP)."""
  sides = [v.image_size // 4 // 2**i for i in range(len(v.dims))]
  return [float(side**2 * (2 * 49 * dim + 16 * dim**2)) for side, dim in zip(sides, v.dims)]


def convnext_flops(v: ConvNeXtConfig, embed_dim: int) -> float:
  """Forward FLOPs of a ConvNeXt tower per image: the 4x4 stem conv, per stage the 2x2
  downsampling conv and per block the depthwise 7x7 conv (2*49*C per position) and the
  MLP (16*C^2 per position), and the head's projection (linear, or OpenCLIP's 2-layer MLP).
  Norms, GELUs, pooling and residual adds are not counted."""
  side = v.image_size // 4
  flops = 2.0 * side**2 * 4 * 4 * 3 * v.dims[0]
  previous = v.dims[0]
  blocks = convnext_block_flops(v)
  for i, (depth, dim) in enumerate(zip(v.depths, v.dims)):
    if i:
      side //= 2
      flops += 2 * side**2 * 2 * 2 * previous * dim
    flops += depth * blocks[i]
    previous = dim
  head = (2 * previous * embed_dim if v.head_proj == 'linear'
          else 2 * previous * 2 * embed_dim + 2 * 2 * embed_dim * embed_dim)
  return float(flops + head)


def resnet_block_flops(v: ResNetConfig) -> list[float]:
  """Forward FLOPs per image of one of the stacked blocks (all but the first) of each stage:
  1x1 conv 4p -> p, 3x3 conv p -> p, 1x1 conv p -> 4p at the stage's output grid, p the
  stage's planes: 2 * side^2 * 17 * p^2."""
  sides = [v.image_size // 4 // 2**i for i in range(4)]
  return [float(2 * side**2 * 17 * (v.width * 2**i)**2) for i, side in enumerate(sides)]


def resnet_flops(v: ResNetConfig, embed_dim: int) -> float:
  """Forward FLOPs of a ModifiedResNet tower per image: the stem's three 3x3 convs at half
  the image side; per stage the first block (1x1 and 3x3 convs at the input grid, then
  the 1x1 conv to 4x planes and the shortcut's 1x1 conv at the output grid) and the other
  blocks (`resnet_block_flops`); the attention pool (k and v of the grid^2 + 1 tokens, the
  mean token's q, its scores and weighted sum, c_proj). BatchNorms, ReLUs, pooling and
  residual adds are not counted."""
  half, w = v.image_size // 2, v.width
  flops = 2.0 * half**2 * 9 * (3 * w // 2 + (w // 2)**2 + (w // 2) * w)
  inplanes, side = w, v.image_size // 4
  blocks = resnet_block_flops(v)
  for i, depth in enumerate(v.depths):
    planes, out_side = w * 2**i, side // (2 if i else 1)
    flops += 2 * side**2 * (inplanes * planes + 9 * planes**2)
    flops += 2 * out_side**2 * 4 * planes * (planes + inplanes)
    flops += (depth - 1) * blocks[i]
    inplanes, side = 4 * planes, out_side
  c, tokens = v.features, v.grid**2 + 1
  flops += 2 * tokens * c * c * 2 + 2 * c * c + 2 * 2 * tokens * c + 2 * c * embed_dim
  return float(flops)


def train_flops_per_sample(cfg: CLIPConfig, context_length: int,
                           image_tokens: int | None = None) -> float:
  """Forward + backward (3x forward) FLOPs of one image-text pair.

  `image_tokens`: a NaFlex model's sequence length (default: the position grid's patches).

  With `vision.patch_dropout` the image blocks see only the kept patches (the patch
  embedding still sees all of them). The text tower sees `context_length` tokens, plus
  CoCa's appended class token (`text.embed_cls`). A caption decoder (`cfg.decoder`) runs
  teacher-forced over one position less than its input: CoCa's over the text tower's
  `context_length - 1` token outputs, reading the attentional pooler's queries after the
  first (or the kept patch tokens without a pooler); LocCa's over `decoder.context_length - 1`
  of its own tokens, reading the image tower's kept patch tokens. Embedding lookups, layer
  norms, softmaxes and the towers' pooling projections are not counted.
  """
  v, t = cfg.vision, cfg.text
  text = tower_flops(t.layers, context_length + int(t.embed_cls), t.width, t.mlp_dim)
  if isinstance(v, ConvNeXtConfig):  # no caption decoder (CLIPConfig.validate)
    return 3 * (convnext_flops(v, cfg.embed_dim) + text)
  if isinstance(v, ResNetConfig):  # no caption decoder either
    return 3 * (resnet_flops(v, cfg.embed_dim) + text)
  patches = image_tokens or v.grid ** 2
  kept = kept_count(patches, v.patch_dropout)
  tokens = kept + int(v.class_token)
  gated = isinstance(v, EvaConfig) and v.gated_mlp  # EVA-02's SwiGLU
  image = (tower_flops(v.layers, tokens, v.width, v.mlp_dim, gated)
           + 2 * patches * 3 * v.patch_size**2 * v.width)
  if v.attn_pool_queries:
    image += attn_pool_flops(v.attn_pool_queries, tokens, v.width, cfg.embed_dim)
  caption = 0.0
  if cfg.decoder is not None:
    d = cfg.decoder
    positions = (d.context_length if d.embed_tokens else context_length) - 1
    image_tokens = v.attn_pool_queries - 1 if v.attn_pool_queries else kept
    caption = decoder_flops(d.layers, positions, image_tokens, d.width, d.mlp_dim, d.vocab_size)
  return 3 * (image + text + caption)


def peak_flops_per_device(override: float = 0.0,
                          device_kind: str | None = None) -> float | None:
  """`override` if set, else the peak of `device_kind` (default: the first device's), or None.

  TPU kinds must match a `TPU_PEAK_FLOPS` key exactly; an NVIDIA kind is looked up by its
  model token (the word after 'NVIDIA', up to a space or '-') after exact GPU kinds.
  """
  if override:
    return override
  kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  if kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[kind]
  if kind in GPU_KIND_PEAK_FLOPS:
    return GPU_KIND_PEAK_FLOPS[kind]
  match = _NVIDIA_KIND.fullmatch(kind)
  return GPU_MODEL_PEAK_FLOPS.get(match.group(1)) if match else None


class MetricLogger:
  """Writes scalars to TensorBoard, metrics.jsonl and the console (process 0 only).

  `tensorboard=False` leaves TensorBoard out: its event files are written by TensorFlow's
  own file system, which cannot be pointed at a GCS emulator (README, "gs://").
  `start_step` is the step the run starts after (0, or the restored checkpoint's): the
  lines an earlier run logged after it are dropped, as this run logs those steps again, so
  `metrics.jsonl` holds each step once, with the values of the run that continued. None
  keeps the file as it is.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, start_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = epath.Path(workdir)
    self.writer = None
    if self.enabled:
      if tensorboard:
        _hide_gpus_from_tensorflow()
        from clu import metric_writers
        # TensorBoard only: the trainer writes its own console line (or progress bar), so
        # clu's LoggingWriter would print every scalar a second time.
        self.writer = metric_writers.SummaryWriter(str(self.workdir / 'tensorboard'))
      self.jsonl = JsonlLog(self.workdir / 'metrics.jsonl', keep_through=start_step)

  def write_config(self, config: Any, param_overview: str) -> None:
    if not self.enabled:
      return
    (self.workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    logging.info('Parameters:\n%s', param_overview)
    if self.writer:
      self.writer.write_texts(0, {'config': f'```\n{config}\n```'})

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items() if v is not None}
    if self.writer:
      self.writer.write_scalars(step, scalars)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')

  def flush(self) -> None:
    """Stores every line written so far (called with each checkpoint save)."""
    if self.enabled:
      self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      if self.writer:
        self.writer.close()
      self.jsonl.close()


class JsonlLog:
  """A text file that grows by lines, on local disks and on object stores (gs://).

  Locally each line is appended and flushed. An object store cannot append and allows about
  one write per second to an object, so there the whole text is kept and rewritten at most
  every `UPLOAD_SECONDS`, at each `flush()` (a checkpoint: a resumed run finds every line up
  to its step) and at `close()`.

  `keep_through`: a step; the lines of later steps (and a torn last line) are dropped first,
  locally by an atomic rewrite (a crash leaves the old file or the new one, never half).
  """
  UPLOAD_SECONDS = 30.0

  def __init__(self, path: epath.Path, keep_through: int | None = None):
    self.path = path
    self.remote = '://' in str(path)
    text = path.read_text() if path.exists() else ''
    kept = text if keep_through is None else lines_through(text, keep_through)
    if self.remote:
      self.text = kept
      self.uploaded = time.monotonic()
    else:
      if kept != text:
        temporary = path.with_name(f'.{path.name}.tmp')
        temporary.write_text(kept)
        os.replace(temporary, path)
      self.file = path.open('a')

  def write(self, line: str) -> None:
    if not self.remote:
      self.file.write(line)
      self.file.flush()
      return
    self.text += line
    if time.monotonic() - self.uploaded > self.UPLOAD_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self.remote:
      self.path.write_text(self.text)
      self.uploaded = time.monotonic()

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self.file.close()


def lines_through(text: str, step: int) -> str:
  """The lines of a metrics log whose step is at most `step`; a line that does not parse
  (the torn last line of a killed run) is dropped."""
  kept = []
  for line in text.splitlines():
    try:
      earlier = json.loads(line)['step'] <= step
    except (ValueError, KeyError, TypeError):
      continue
    if earlier:
      kept.append(line + '\n')
  return ''.join(kept)


def _hide_gpus_from_tensorflow() -> None:
  """clu imports TensorFlow for its writers; keep it off the accelerators JAX uses."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
