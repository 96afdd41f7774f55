r"""Compiles the real train step for a TPU pod on this machine: does the config fit?

  python -m clip_jax.aot --config configs/clip.py:model=ViT-B-16,batch_size=512 \
      --topology v5p:2x2x1 [--config.KEY=VALUE ...] [--json]

No accelerator and no data are needed: with `libtpu` installed (`pip install "jax[tpu]"`)
XLA compiles for any TPU topology from a CPU host. The step is the trainer's own
(`clip_jax.step.build`: the config resolved and checked, model, optimizer, shardings and
jitted step), built from shapes only (`abstract=True`) and compiled ahead of time for the
topology's chips; the compile in progress is said on stderr.
Printed per chip: HBM (arguments, outputs, temporaries, total vs capacity), compiled vs
analytic FLOPs, and the TPU compiler's step-time estimate with the pairs/s and MFU it
implies. Exits 1 when the step does not fit, naming the knobs to turn.

Caveats, also printed when they apply: the step time is the compiler's estimate, not a
measurement; `cost_analysis()` counts the body of a `while` loop (`lax.scan`:
`model.scan_layers=True`, `optim.grad_accum>1`) once, so its FLOPs and time are then a
fraction of the truth, so for scanned layers the tool adds what one more layer costs inside
the loop (`depth_extrapolation`: the vision, text and caption decoder's layers; the HBM
figures are the program's own either way); custom calls (Pallas kernels, ...) are not costed.
A caption decoder (CoCa presets, `--config.locca.weight=1`) is compiled and counted with
the step: its FLOPs (`metrics.train_flops_per_sample`) are in the analytic count and MFU.
`--topology local` compiles for this machine's own devices instead.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from clip_jax import cli, run_config, sharding, step
from clip_jax.distributed import quiet_stderr
from clip_jax.metrics import (
  convnext_block_flops,
  peak_flops_per_device,
  resnet_block_flops,
  train_flops_per_sample,
)
from clip_jax.models.config import (
  CLIPConfig,
  ConvNeXtConfig,
  DecoderConfig,
  ResNetConfig,
  TextConfig,
  VisionConfig,
)

Stack = VisionConfig | ConvNeXtConfig | ResNetConfig | TextConfig | DecoderConfig

_CONFIG = cli.config_flag()
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, "TPU topology to compile for, e.g. 'v5p:4x4x4', 'v5e:2x2', or 'local' "
    "(this machine's devices).")
_JSON = flags.DEFINE_bool('json', False, 'Print the report as JSON.')
_SEQ_LEN = flags.DEFINE_integer(
    'seq_len', None, 'NaFlex models: the sequence length to compile the step at, with the '
    'batch the token budget gives (default: the longest of config.data.naflex.seq_lens).')
_DEPTH_ESTIMATE = flags.DEFINE_bool(
    'depth_estimate', True, 'For scanned layers: estimate step time and FLOPs of every layer '
    'from compiles of the same step at 4 layers per tower and 1 or 2 layers per loop '
    "iteration (3 small compiles), since the compiler counts a loop body once. "
    "--nodepth_estimate skips them.")

GIB = 2**30
# HBM per chip by `device_kind` (Cloud TPU documentation); the topology's devices do not
# report memory stats (they are not addressable from this host).
HBM_BYTES = {'TPU v4': 32 * GIB, 'TPU v5 lite': 16 * GIB, 'TPU v5': 95 * GIB,
             'TPU v6 lite': 32 * GIB}
# Chips with two TensorCores: a topology may list each core as a device (v4 here does).
CORES_PER_CHIP = {'TPU v4': 2, 'TPU v5': 2}
TOPOLOGY_FORMS = ("'GEN:AxB' or 'GEN:AxBxC' with GEN one of v4, v5e, v5p, v6e and the chip "
                  "grid as the TPU type names it: v4:2x2x1, v4:4x4x4, v5e:2x2, v5e:4x4, "
                  "v5e:16x16, v5p:2x2x1, v5p:4x4x4, v6e:2x2, v6e:16x16; or 'local' for "
                  "this machine's devices")
KNOBS = ('--config.batch_size (fewer pairs per chip), --config.model.remat (full: keep no '
         'activations), --config.mesh.fsdp (shard params and optimizer state over more '
         'chips, e.g. -1 for all)')


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU topology (compile-only), or this machine's for 'local'."""
  if topology == 'local':
    with quiet_stderr():  # an installed libtpu logs its init errors on a host without TPU
      return jax.devices()
  from jax.experimental import topologies
  # Compiling touches no TPU: let several compiles (pytest workers, a trainer on this TPU
  # VM) load libtpu at once instead of failing on its lock file.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    with quiet_stderr():
      desc = topologies.get_topology_desc(platform='tpu', topology_name=topology)
  except Exception as e:  # libtpu's error names the first thing it did not like
    if 'INVALID_ARGUMENT' not in str(e):
      raise
    raise ValueError(f'--topology {topology!r} is not a TPU topology ({str(e).strip()}). '
                     f'Valid forms: {TOPOLOGY_FORMS}.') from e
  return list(desc.devices)


# --- the step, from shapes ----------------------------------------------------------------

def lower_train_step(config: ml_collections.ConfigDict, devices: list[jax.Device],
                     seq_len: int | None = None):
  """The trainer's jitted step for `devices` (`clip_jax.step`, abstract: shapes only),
  lowered; the resolved run; and the batch it was lowered for: (global batch, sequence
  length). A NaFlex model's step is compiled per sequence length: at `seq_len` (default the
  longest of `data.naflex.seq_lens`) with the batch its token budget gives."""
  run = run_config.resolve(config, len(devices), data=False)
  program = step.build(run, sharding.make_mesh(run.mesh, devices), abstract=True)
  batching = run_config.naflex_batching(config, run.model, len(devices))
  if batching is None:
    return program.lower(run.step.batch_size), run, (run.step.batch_size, None)
  seq_len = seq_len or max(batching.seq_lens)
  batch = batching.global_batch(seq_len)
  return program.lower(batch, seq_len), run, (batch, seq_len)


# --- the report ---------------------------------------------------------------------------

def analyse(config: ml_collections.ConfigDict, topology: str, depth_estimate: bool = False,
            seq_len: int | None = None) -> dict[str, Any]:
  """Compiles the step for `topology`; returns the report (a JSON-serialisable dict).

  With `depth_estimate`, a scanned step's time and FLOPs come from `depth_extrapolation`.
  `seq_len`: a NaFlex model's sequence length (`lower_train_step`).
  """
  devices = topology_devices(topology)
  kind = devices[0].device_kind
  chips = len(devices)
  lowered, run, (batch, seq_len) = lower_train_step(config, devices, seq_len)
  cfg = run.model
  report: dict[str, Any] = {
      'topology': topology, 'device_kind': kind, 'chips': chips,
      'cores_per_device': getattr(devices[0], 'num_cores', None),
      'mesh': dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, chips))),
      'model': config.model.name, 'dtype': config.model.dtype, 'remat': config.model.remat,
      'scan_layers': config.model.scan_layers, 'loss': config.loss.kind,
      'decoder': decoder_summary(cfg),
      'batch_size': batch, 'batch_per_chip': batch / chips, 'seq_len': seq_len,
      'grad_accum': config.optim.grad_accum, 'grad_accum_mode': config.optim.grad_accum_mode}
  capacity = hbm_capacity(devices[0])
  scanned = depth_estimate and config.model.scan_layers and config.optim.grad_accum == 1
  compiles = (5 if cfg.decoder is not None else 4) if scanned else 1
  progress(f'compile 1 of {compiles}: the {config.model.name} step for {topology} '
           f'({chips} x {kind})')
  try:
    with quiet_stderr():
      compiled = lowered.compile()
  except Exception as e:  # XLA refuses a program that cannot fit in HBM
    used = _out_of_memory(str(e))
    if used is None:
      raise
    report.update(fits=False, hbm={'total_bytes': used[0], 'capacity_bytes': used[1] or capacity},
                  compile_error=str(e).strip().splitlines()[0][:500])
    return report

  usage = hbm_use(compiled.memory_analysis(), devices[0].platform)
  report['hbm'] = {**usage, 'capacity_bytes': capacity}
  report['fits'] = capacity is None or usage['total_bytes'] <= capacity

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  hlo = compiled.as_text() or ''
  analytic = train_flops_per_sample(cfg, cfg.text.context_length, seq_len) * batch / chips
  compiled_flops = float(cost.get('flops', 0.0))
  seconds = cost.get('optimal_seconds')
  loops = len(re.findall(r'\bwhile\(', hlo))
  custom_calls = kernel_calls(lowered.as_text())
  compiler_calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)) - set(custom_calls))
  scatters = len(re.findall(r'(?<![\w-])scatter\(', hlo))  # not reduce-scatter
  peak = peak_flops(config, devices[0])
  extrapolated = None
  if scanned:
    extrapolated = depth_extrapolation(config, cfg, devices,
                                       (float(seconds or 0.0), compiled_flops), seq_len)
    extrapolated['scanned_program'] = {'step_seconds': seconds, 'flops': compiled_flops}
    compiled_flops = extrapolated['flops_per_chip']
    if extrapolated['step_seconds'] is not None:  # else the program's own (non-positive) time
      seconds = extrapolated['step_seconds']
  report['flops'] = {'compiled_per_chip': compiled_flops, 'analytic_per_chip': analytic,
                     'compiled_over_analytic': compiled_flops / analytic if analytic else None}
  valid_time = seconds is not None and seconds > 0
  report['estimate'] = {
      'step_seconds': float(seconds) if seconds is not None else None,
      'pairs_per_second_per_chip': batch / chips / seconds if valid_time else None,
      'peak_flops_per_chip': peak,
      'mfu': analytic / seconds / peak if valid_time and peak else None,
      'while_loops': loops,
      'loops_counted_once': loops > 0 and not (extrapolated and extrapolated['step_seconds']),
      'depth_extrapolation': extrapolated,
      'custom_calls': custom_calls, 'compiler_custom_calls': compiler_calls,
      'scatters': scatters}
  report['notes'] = notes(report)
  return report


def depth_extrapolation(config: ml_collections.ConfigDict, cfg: CLIPConfig,
                        devices: list[jax.Device], scanned: tuple[float, float],
                        seq_len: int | None = None) -> dict[str, Any]:
  """Step time and FLOPs of the full-depth scanned step, from the loop bodies' own cost.

  `cost_analysis()` counts a loop body once: the scanned program (`scanned`: its time and
  FLOPs) costs c + a + b (+ e), with a, b (and e) what one vision, one text (and one caption
  decoder) layer cost inside their scan loops. Scanning costs more per layer than the same
  layer unrolled: the loop writes each layer's saved activations into stacks and reads them
  back (the compiler costs a ViT-B-16 layer at 1.37x its unrolled self, bench/RESULTS.md).
  So a, b and e come from the scanned step itself: compiled with 4 layers per stack and 1
  layer per loop iteration, then 2 (`scan_unroll`) for one stack at a time, the difference
  is one more layer in the loop body. The estimate extends `scanned` by the layers not in
  its loop bodies (all but `scan_unroll` a stack; the layers of a body cost alike). Each
  compile is the same step (mesh, batch, remat, loss) with shallower stacks: 3 compiles,
  4 with a decoder (CoCa, LocCa). The ring loss (`sigmoid_chunked`, a loop) is costed as
  the gathered `sigmoid`: the same FLOPs. No time when the compiler gives none positive for
  one of them.
  """
  stacks: list[Stack] = [cfg.vision, cfg.text]
  if cfg.decoder is not None:
    stacks.append(cfg.decoder)
  names = ['vision', 'text', 'decoder'][:len(stacks)]
  base = (1,) * len(stacks)
  variants = [base] + [tuple(2 if j == i else 1 for j in range(len(stacks)))
                       for i in range(len(stacks))]
  costs = {}
  for i, unrolls in enumerate(variants):
    shallow = config.copy_and_resolve_references()
    for name, stack, unroll in zip(names, stacks, unrolls):
      if isinstance(stack, ConvNeXtConfig):  # 4 blocks in each stage
        shallow.model[name].depths = (4,) * len(stack.depths)
      elif isinstance(stack, ResNetConfig):  # the first block, then 4 scanned ones
        shallow.model[name].depths = (5,) * len(stack.depths)
      else:
        shallow.model[name].layers = 4  # 2 iterations at unroll 2
      shallow.model[name].scan_unroll = unroll
    if shallow.loss.kind == 'sigmoid_chunked':  # the same FLOPs without the ring's loop
      shallow.loss.kind = 'sigmoid'
    progress(f'compile {i + 2} of {len(variants) + 1}: 4 layers per stack, '
             + ', '.join(f'{u} {n}' for n, u in zip(names, unrolls))
             + ' layer(s) per loop iteration (for the depth estimate)')
    with quiet_stderr():
      cost = lower_train_step(shallow, devices, seq_len)[0].compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    costs[unrolls] = (float(cost.get('optimal_seconds') or 0.0),
                      float(cost.get('flops', 0.0)))
  # The scanned program's loop bodies hold `scan_unroll` layers each (1 by default).
  extend = lambda k: scanned[k] + sum(
      extra_layers(stack) * (costs[u][k] - costs[base][k])
      for stack, u in zip(stacks, variants[1:]))
  timed = min(seconds for seconds, _ in [*costs.values(), scanned]) > 0
  return {'step_seconds': extend(0) if timed else None, 'flops_per_chip': extend(1),
          'layers': [sum(s.depths) if isinstance(s, (ConvNeXtConfig, ResNetConfig)) else s.layers
                     for s in stacks],
          'compiles': {'x'.join(map(str, u)): {'step_seconds': c[0], 'flops': c[1]}
                       for u, c in costs.items()}}


def extra_layers(stack: Stack) -> float:
  """How many loop bodies' worth of layers the scanned program's count leaves out.

  A ConvNeXt scans each of its 4 stages: its unroll-2 compile adds one block to every stage's
  loop body at once (a_1 + ... + a_4), so the blocks left out are weighted by their stage's
  share of the per-block FLOPs (`metrics.convnext_block_flops`): the estimate assumes a
  block's cost in the loop follows its FLOPs. A ModifiedResNet likewise, over the blocks
  after each stage's first (which is outside the loop: `metrics.resnet_block_flops`).
  """
  if isinstance(stack, (ConvNeXtConfig, ResNetConfig)):
    if isinstance(stack, ResNetConfig):
      flops, outside = resnet_block_flops(stack), 1
    else:
      flops, outside = convnext_block_flops(stack), 0
    return sum((depth - outside - stack.scan_unroll) * f
               for depth, f in zip(stack.depths, flops)) / sum(flops)
  return stack.layers - stack.scan_unroll


def decoder_summary(cfg: CLIPConfig) -> dict[str, Any] | None:
  """The caption decoder the step trains (CoCa's, or LocCa's with its own tokens); None."""
  d = cfg.decoder
  if d is None:
    return None
  return {'kind': 'locca' if d.embed_tokens else 'coca', 'layers': d.layers, 'width': d.width,
          'context_length': d.context_length, 'vocab_size': d.vocab_size}


# Custom calls that only annotate sharding or placement; anything else in the program as
# written (a Pallas kernel, a cuDNN call) runs code the estimator does not see.
_ANNOTATIONS = {'Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape', 'MoveToHost',
                'MoveToDevice', 'annotate_device_placement', 'X64Combine', 'X64SplitLow',
                'X64SplitHigh', 'LayoutConstraint'}


def kernel_calls(stablehlo: str) -> list[str]:
  """Targets of the custom calls in the lowered program, sharding annotations left out."""
  names = set(re.findall(r'custom_call @([\w$.\-]+)', stablehlo))
  names |= set(re.findall(r'call_target_name = "([^"]+)"', stablehlo))
  return sorted(names - _ANNOTATIONS)


def hbm_capacity(device: jax.Device) -> int | None:
  """Bytes of memory per device: its own figure, else what the compiler allows, else the table.

  Topology devices are not addressable (no memory stats); the compiler's out-of-memory error
  for a program too big for any chip names the HBM it makes available (e.g. v5p 95.74G).
  """
  try:
    stats = device.memory_stats() or {}
  except Exception:  # topology devices are not addressable: no stats
    stats = {}
  if stats.get('bytes_limit'):
    return stats['bytes_limit']
  if device.platform == 'tpu':
    huge = jax.ShapeDtypeStruct((2**38,), jnp.float32,
                                sharding=jax.sharding.SingleDeviceSharding(device))
    try:
      with quiet_stderr():
        jax.jit(lambda x: x * 2).lower(huge).compile()
    except Exception as e:
      used = _out_of_memory(str(e))
      if used and used[1]:
        return used[1]
  return HBM_BYTES.get(device.device_kind)


def peak_flops(config: ml_collections.ConfigDict, device: jax.Device) -> float | None:
  """Peak FLOP/s of one device; a v4/v5p device that is one TensorCore gets half a chip's."""
  peak = peak_flops_per_device(config.peak_flops_per_device, device_kind=device.device_kind)
  cores = getattr(device, 'num_cores', None)
  if peak and not config.peak_flops_per_device and device.device_kind in CORES_PER_CHIP and cores:
    peak *= cores / CORES_PER_CHIP[device.device_kind]
  return peak


def hbm_use(mem, platform: str) -> dict[str, int]:
  """Bytes per chip from `memory_analysis()`; on TPU the total is the compiler's own peak.

  `temp_size_in_bytes` over-counts a program with a `lax.scan` by about its stacked
  residuals: for 4 scanned ViT-B-16 layers on one v5p chip, arguments + outputs +
  temporaries make 3.4 GB where the compiler's buffer assignment allocates 2.3 GB in all,
  and a scanned program whose sum reached 110 GiB compiled for a 95 GiB chip. Unrolled,
  the three agree within 2%. `peak_memory_in_bytes`, the compiler's heap simulation
  (arguments and outputs included), is 2.2 GB there and stays within ~7% of the
  allocation. The CPU compiler's peak counts only arguments and outputs: elsewhere the sum
  stands.
  """
  hbm = {'argument_bytes': mem.argument_size_in_bytes, 'output_bytes': mem.output_size_in_bytes,
         'alias_bytes': mem.alias_size_in_bytes, 'temp_bytes': mem.temp_size_in_bytes,
         'peak_bytes': mem.peak_memory_in_bytes if platform == 'tpu' else 0,
         'code_bytes': mem.generated_code_size_in_bytes}
  buffers = hbm['peak_bytes'] or (hbm['argument_bytes'] + hbm['output_bytes']
                                  - hbm['alias_bytes'] + hbm['temp_bytes'])
  hbm['total_bytes'] = buffers + hbm['code_bytes']
  return hbm


def _out_of_memory(message: str) -> tuple[int, int | None] | None:
  """(bytes needed, bytes available) from XLA's out-of-memory error; None for other errors."""
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return None
  size = r'([\d.]+)\s*([KMGT]?)i?B?'
  patterns = ((rf'required for [^(]*\({size}\)', rf'available HBM \({size}\)'),
              (rf'Used {size} of', rf'Used {size} of {size} hbm'))
  for needed, available in patterns:
    n, a = re.search(needed, message), re.search(available, message)
    if n:
      return _bytes(*n.groups()[:2]), _bytes(*a.groups()[-2:]) if a else None
  return (0, None)


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}[unit])


def notes(report: dict[str, Any]) -> list[str]:
  """The caveats that apply to this report, in words."""
  est, out = report['estimate'], []
  if est['step_seconds'] is None:
    out.append('This backend\'s compiler gives no step-time estimate.')
  else:
    out.append('Step time, pairs/s and MFU are the compiler\'s estimate '
               '(cost_analysis()["optimal_seconds"]), not a measurement.')
  if est['depth_extrapolation']:
    out.append('Scanned layers: step time and FLOPs are the scanned program\'s, its loop '
               'bodies counted once, plus what one more layer costs inside the loop (compiles '
               'at 1 and 2 layers per iteration) for its other layers.'
               + (' The ring loss is costed as the gathered sigmoid (same FLOPs).'
                  if report['loss'] == 'sigmoid_chunked' else ''))
  if est['loops_counted_once']:
    out.append(f'The program has {est["while_loops"]} while loop(s) (model.scan_layers, '
               'optim.grad_accum or a chunked loss): cost_analysis() counts a loop body once, '
               'so compiled FLOPs, step time and MFU are NOT corrected and are a fraction '
               'of the truth. For estimates compile with --config.model.scan_layers=False '
               'or keep --depth_estimate (and grad_accum=1); the HBM figures are right '
               'either way.')
  if est['custom_calls']:
    out.append(f'Custom calls ({", ".join(est["custom_calls"])}): their cost is not in the '
               'estimate.')
  if est['compiler_custom_calls']:
    out.append('The compiler added custom calls of its own '
               f'({", ".join(est["compiler_custom_calls"])}); the estimator may not cost '
               'them either.')
  if est['step_seconds'] is not None and est['step_seconds'] <= 0:
    out.append('The compiler returned a non-positive step time: no throughput estimate. '
               f'The program has {est["scatters"]} scatter(s) (e.g. the backward of an '
               'embedding lookup or a gather in the loss), which the estimator is known to '
               'mis-cost on TPU.')
  if report['device_kind'] in CORES_PER_CHIP and report['cores_per_device'] == 1:
    out.append(f'The topology lists each TensorCore of a {report["device_kind"]} chip as a '
               'device: "per chip" figures here are per TensorCore (half a chip).')
  if report['remat'] != 'none':
    out.append(f'model.remat={report["remat"]}: compiled FLOPs include the recomputed '
               'forward pass; MFU counts the analytic 3x forward only.')
  return out


def format_report(report: dict[str, Any]) -> str:
  """The report as the lines a person reads."""
  gib = lambda b: f'{b / GIB:.2f} GiB'
  r, lines = report, []
  lines.append(f'{r["model"]} ({r["dtype"]}, remat={r["remat"]}, scan_layers={r["scan_layers"]}, '
               f'loss={r["loss"]}) on {r["topology"]}: {r["chips"]} x {r["device_kind"]}, '
               f'mesh {r["mesh"]}')
  lines.append(f'batch {r["batch_size"]} global = {r["batch_per_chip"]:g} pairs per chip'
               + (f', grad_accum {r["grad_accum"]} ({r["grad_accum_mode"]})'
                  if r['grad_accum'] > 1 else ''))
  if r.get('decoder'):
    d = r['decoder']
    lines.append(f'caption decoder ({"LocCa" if d["kind"] == "locca" else "CoCa"}): '
                 f'{d["layers"]} layers, width {d["width"]}, context {d["context_length"]}, '
                 f'vocab {d["vocab_size"]} (its FLOPs are in the analytic count)')
  hbm = r['hbm']
  capacity = hbm['capacity_bytes']
  cap = gib(capacity) if capacity else 'unknown capacity'
  if 'compile_error' in r:
    needs = gib(hbm['total_bytes']) if hbm['total_bytes'] else 'more than'
    lines.append(f'HBM per chip: DOES NOT FIT: the compiler needs {needs} of {cap}')
    lines.append(f'  ({r["compile_error"]})')
  else:
    lines.append('HBM per chip:')
    lines.append(f'  arguments    {gib(hbm["argument_bytes"]):>12}  (params, optimizer state, '
                 'batch)')
    lines.append(f'  outputs      {gib(hbm["output_bytes"]):>12}  ({gib(hbm["alias_bytes"])} '
                 'reuse donated arguments)')
    lines.append(f'  temporaries  {gib(hbm["temp_bytes"]):>12}  (activations, gradients, '
                 'workspace; over-counted under scan)')
    if hbm['peak_bytes']:
      lines.append(f'  peak         {gib(hbm["peak_bytes"]):>12}  (all buffers at once, the '
                   "compiler's heap simulation)")
    lines.append(f'  program      {gib(hbm["code_bytes"]):>12}  (compiled code)')
    lines.append(f'  total        {gib(hbm["total_bytes"]):>12}  of {cap}: '
                 + ((f'fits ({hbm["total_bytes"] / capacity:.0%})' if capacity else 'fits?')
                    if r['fits'] else 'DOES NOT FIT'))
    f, est = r['flops'], r['estimate']
    source = 'extrapolated' if est['depth_extrapolation'] else 'compiled'
    lines.append(f'FLOPs per chip per step: {source} {f["compiled_per_chip"]:.4g}, analytic '
                 f'{f["analytic_per_chip"]:.4g} (ratio {f["compiled_over_analytic"]:.2f})')
    if est['step_seconds'] is not None and est['step_seconds'] <= 0:
      lines.append(f'Estimated step time: none (the compiler returned {est["step_seconds"]:.3g} s)')
    elif est['step_seconds'] is not None:
      lines.append(f'Estimated step time: {est["step_seconds"] * 1e3:.2f} ms'
                   + (f' -> {est["pairs_per_second_per_chip"]:.1f} pairs/s/chip'
                      if est['pairs_per_second_per_chip'] else '')
                   + (f', MFU {est["mfu"]:.1%} (peak {est["peak_flops_per_chip"] / 1e12:.0f} '
                      'TFLOP/s)' if est['mfu'] is not None else ''))
    lines.append(f'While loops: {est["while_loops"]}'
                 + (' (estimates count each body once: NOT corrected)'
                    if est['loops_counted_once'] else '')
                 + (' (time and FLOPs by depth extrapolation)'
                    if est['depth_extrapolation'] else ''))
    lines.append('Custom calls (kernels, not in the estimate): '
                 + (', '.join(est['custom_calls']) or 'none')
                 + f'; added by the compiler: {", ".join(est["compiler_custom_calls"]) or "none"}')
    for note in r['notes']:
      lines.append(f'Note: {note}')
  if not r['fits']:
    lines.append(f'Does not fit. Knobs: {KNOBS}.')
  return '\n'.join(lines)


def progress(message: str) -> None:
  """Where the tool is, on stderr (compiles take seconds to minutes each)."""
  print(f'aot: {message}', file=sys.stderr, flush=True)


# --- the binary ---------------------------------------------------------------------------

@cli.user_errors
def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {" ".join(argv[1:])!r}')
  if _CONFIG.value is None:
    raise ValueError('--config is required, e.g. --config configs/clip.py:model=ViT-B-16')
  if _TOPOLOGY.value is None:
    raise ValueError(f'--topology is required: {TOPOLOGY_FORMS}.')
  if _TOPOLOGY.value != 'local' and not os.environ.get('JAX_PLATFORMS'):
    # The host's own backend only traces: keep JAX off libtpu's TPU detection (and off any
    # TPU this host has), before the first backend use.
    jax.config.update('jax_platforms', 'cpu')
  report = analyse(_CONFIG.value, _TOPOLOGY.value, _DEPTH_ESTIMATE.value, _SEQ_LEN.value)
  print(json.dumps(report, indent=2) if _JSON.value else format_report(report))
  if not report['fits']:
    print(f'error: the step does not fit in HBM on {_TOPOLOGY.value}. Knobs: {KNOBS}.',
          file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.absl_flags_parser)
