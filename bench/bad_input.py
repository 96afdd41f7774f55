"""Bad input through the real commands: one shard holding a sample of every bad kind.

  python bench/bad_input.py [--steps 6] [--timeout 600] [--keep DIR]

Writes one tar shard of good samples (64 px JPEGs, a caption and a `label`) with one sample
of each bad kind (`bad_samples`) among them and its last member cut short, then runs over
it the train binary (configs/demo.py with the `tiny` model, a few steps, its periodic
zero-shot on the same shard), `clip_jax.embed` and `clip_jax.evaluate` (zero-shot and
retrieval) on a random-init checkpoint. Prints a table per command: how it ended (a crash
with the last line of its stderr), wall time, the peak RSS of its process tree (sampled
from /proc: Linux only) and the skip counts it reported, by kind, read from whatever it
reports: `...skipped/KIND` keys (metrics.jsonl) and `skipped` objects (its JSON on stdout,
`embed_info.json`, `eval_results.json`). A kind no command counts is a sample that went
through unnoticed (or a command that died first).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ('red', 'green', 'blue', 'yellow')


def _jpeg(rng: np.random.Generator, size: int = 64) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, 'JPEG')
  return buffer.getvalue()


def _png_bomb(side: int = 13000) -> bytes:
  """A `side` x `side` black PNG: tens of KB on disk, side^2 x 3 bytes decoded as RGB."""
  buffer = io.BytesIO()
  Image.new('1', (side, side)).save(buffer, 'PNG', optimize=True)
  return buffer.getvalue()


def bad_samples(rng: np.random.Generator) -> dict[str, list[tuple[str, bytes]]]:
  """Kind -> the members of one sample of that kind (file names without the key)."""
  jpg, caption = _jpeg(rng), b'a photo of noise'
  word = ''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), 32 * 1024)).encode()
  return {
      'json_array': [('jpg', jpg), ('json', b'[]')],
      'json_string': [('jpg', jpg), ('json', b'"x"')],
      'json_200k_deep': [('jpg', jpg), ('json', b'[' * 200_000 + b']' * 200_000)],
      'json_not_json': [('jpg', jpg), ('txt', caption), ('json', b'{not json')],
      'label_not_int': [('jpg', jpg), ('txt', caption), ('json', b'{"label": "seven"}')],
      'undecodable_image': [('jpg', b'\xff\xd8 not a jpeg'), ('txt', caption)],
      'empty_image': [('jpg', b''), ('txt', caption)],
      'png_bomb_13000px': [('png', _png_bomb()), ('txt', caption)],
      'text_named_jpg': [('jpg', b'just some text, not an image\n' * 20), ('txt', caption)],
      'caption_one_32kb_word': [('jpg', jpg), ('txt', word)],
      'caption_not_utf8': [('jpg', jpg), ('txt', 'caf\xe9'.encode('latin-1'))],
      'missing_caption': [('jpg', jpg)],
  }


def write_shard(path: pathlib.Path, good: int = 24) -> list[str]:
  """The bench shard: `good` good samples with the bad ones spread among them, then a
  truncated last member. Returns the kinds it holds."""
  rng = np.random.default_rng(0)
  bad = bad_samples(rng)
  good_samples = [[('jpg', _jpeg(rng)), ('txt', f'a photo of {CLASSES[i % 4]} noise'.encode()),
                   ('json', json.dumps({'label': i % 4}).encode())] for i in range(good)]
  step = max(good // len(bad), 1)
  samples: list[tuple[str, list[tuple[str, bytes]]]] = []
  for i, sample in enumerate(good_samples):
    samples.append((f'good{i:03d}', sample))
    if i % step == step - 1 and bad:
      kind = next(iter(bad))
      samples.append((kind, bad.pop(kind)))
  samples += list(bad.items())
  samples.append(('truncated_member', [('jpg', _jpeg(rng, 256))]))
  with tarfile.open(path, 'w') as tar:
    for key, members in samples:
      for ext, data in members:
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        cut = tar.offset + tarfile.BLOCKSIZE + info.size // 2  # after a one-block header
        tar.addfile(info, io.BytesIO(data))
  with path.open('r+b') as file:
    file.truncate(cut)  # halfway through the last sample's image
  return [key for key, _ in samples if not key.startswith('good')]


# --- running a command --------------------------------------------------------------------

def _tree_rss(root: int) -> int:
  """Bytes resident in process `root` and all its descendants (from /proc)."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        stat = pathlib.Path(f'/proc/{entry}/stat').read_text()
      except OSError:
        continue
      parent = int(stat.rsplit(')', 1)[1].split()[1])
      children.setdefault(parent, []).append(int(entry))
  total, pending = 0, [root]
  while pending:
    pid = pending.pop()
    pending += children.get(pid, [])
    try:
      status = pathlib.Path(f'/proc/{pid}/status').read_text()
    except OSError:
      continue
    total += next((int(line.split()[1]) * 1024 for line in status.splitlines()
                   if line.startswith('VmRSS:')), 0)
  return total


@dataclasses.dataclass
class Outcome:
  result: str          # 'ok', 'exit N', 'timed out'
  last_line: str       # of stderr, for a command that did not end well
  seconds: float
  peak_rss: int        # bytes, the process tree's
  stdout: str


def run(cmd: list[str], env: dict[str, str], timeout: float) -> Outcome:
  """Runs `cmd` in its own session, sampling its tree's RSS every 0.1 s."""
  start, peak = time.perf_counter(), [0]
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    process = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
    done = threading.Event()

    def sample():
      while not done.wait(0.1):
        peak[0] = max(peak[0], _tree_rss(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
      process.wait(timeout)
      result = 'ok' if process.returncode == 0 else f'exit {process.returncode}'
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      result = 'timed out'
    done.set()
    sampler.join()
    out.seek(0)
    err.seek(0)
    return Outcome(result, '' if result == 'ok' else last_line(err.read()),
                   time.perf_counter() - start, peak[0], out.read())


_PROGRESS = re.compile(r'^.*?\[\d+:\d+[^\]]*\]')  # a tqdm bar, up to its '[elapsed, rate]'


def last_line(stderr: str) -> str:
  """The last line of `stderr` that is not a progress bar (a warning may follow one)."""
  lines = [_PROGRESS.sub('', line).strip() for line in stderr.splitlines()]
  return next((line[:300] for line in reversed(lines) if line), '')


# --- skip counts from whatever a command reports ------------------------------------------

def json_values(text: str) -> list:
  """Every JSON object in `text` (whole lines of JSON Lines, or objects inside other text)."""
  decoder, values, at = json.JSONDecoder(), [], text.find('{')
  while at >= 0:
    try:
      value, end = decoder.raw_decode(text, at)
      values.append(value)
    except ValueError:
      end = at + 1
    at = text.find('{', end)
  return values


def skip_counts(value, scope: str = '') -> dict[str, int]:
  """'scope: kind' -> count from `skipped` objects and `...skipped/KIND` keys in `value`."""
  counts: dict[str, int] = {}

  def add(key: str, count) -> None:
    if isinstance(count, (int, float)) and not isinstance(count, bool):
      counts[key] = max(counts.get(key, 0), int(count))

  if isinstance(value, dict):
    for key, item in value.items():
      if key == 'skipped' and isinstance(item, dict):
        for kind, count in item.items():
          add(f'{scope}{kind}', count)
      elif 'skipped/' in key:
        prefix, kind = key.rsplit('skipped/', 1)
        add(f'{scope}{prefix.rstrip("_/")}: {kind}' if prefix else f'{scope}{kind}', item)
      else:
        for kind, count in skip_counts(item, f'{scope}{key}: ').items():
          add(kind, count)
  elif isinstance(value, list):
    for item in value:
      for kind, count in skip_counts(item, scope).items():
        add(kind, count)
  return counts


def reported_skips(outcome: Outcome, folders: list[pathlib.Path], tmp: pathlib.Path
                   ) -> dict[str, int]:
  """The skip counts in a command's stdout and in the JSON files it wrote under `folders`
  (paths under `tmp` named relative to it)."""
  texts = [outcome.stdout]
  for folder in folders:
    texts += [p.read_text(errors='replace') for p in folder.rglob('*')
              if p.is_file() and p.suffix in ('.json', '.jsonl')]
  counts: dict[str, int] = {}
  for value in (v for text in texts for v in json_values(text)):
    for kind, count in skip_counts(value).items():
      kind = kind.replace(f'{tmp}/', '')
      counts[kind] = max(counts.get(kind, 0), count)
  return counts


# --- the bench ----------------------------------------------------------------------------

def commands(tmp: pathlib.Path, shard: pathlib.Path, classnames: pathlib.Path,
             checkpoint: pathlib.Path, steps: int) -> dict[str, tuple[list[str], list]]:
  """Command name -> (command line, the folders whose JSON files hold its report)."""
  python = sys.executable
  train = [python, '-m', 'clip_jax.train', '--config', str(ROOT / 'configs' / 'demo.py'),
           '--workdir', str(tmp / 'train'), f'--config.total_steps={steps}',
           '--config.batch_size=8', '--config.log_every=1', '--config.model.name=tiny',
           f'--config.data.train={shard}', '--config.data.shuffle_window=16',
           f'--config.eval.zeroshot_shards={shard}', f'--config.eval.classnames={classnames}',
           f'--config.eval_every={steps}', '--config.checkpoint_every=1000',
           '--config.optim.warmup_steps=0', '--config.tensorboard=False']
  embed = [python, '-m', 'clip_jax.embed', '--checkpoint', str(checkpoint), '--shards',
           str(shard), '--out', str(tmp / 'embed'), '--batch_size', '8']
  evaluate = [python, '-m', 'clip_jax.evaluate', '--checkpoint', str(checkpoint),
              '--zeroshot_shards', str(shard), '--classnames', str(classnames),
              '--retrieval_shards', str(shard), '--batch_size', '8']
  return {'train': (train, [tmp / 'train']), 'embed': (embed, [tmp / 'embed']),
          'evaluate': (evaluate, [checkpoint])}


def table(outcomes: dict[str, Outcome], skips: dict[str, dict[str, int]]) -> str:
  names = list(outcomes)
  rows = [['result', *(outcomes[n].result for n in names)],
          ['wall s', *(f'{outcomes[n].seconds:.1f}' for n in names)],
          ['peak RSS MB (process tree)', *(f'{outcomes[n].peak_rss / 2**20:.0f}' for n in names)]]
  for kind in sorted({k for counts in skips.values() for k in counts}):
    rows.append([f'skipped {kind}', *(str(skips[n].get(kind, '')) for n in names)])
  lines = ['| | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  lines += [f'{n}: {outcomes[n].result}: {outcomes[n].last_line}' for n in names
            if outcomes[n].result != 'ok']
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=6, help='training steps')
  parser.add_argument('--timeout', type=float, default=600, help='seconds per command')
  parser.add_argument('--keep', help='write into this new folder and keep it (default: a '
                      'temporary one) to read what the commands wrote')
  args = parser.parse_args()
  import clip_jax
  from clip_jax.checkpoint import save_model
  from clip_jax.models.functional import get_params
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  with tempfile.TemporaryDirectory() as name:
    tmp = pathlib.Path(args.keep or name)
    if args.keep:
      tmp.mkdir()  # a new folder, so nothing already there is overwritten
    shard, classnames = tmp / 'bad.tar', tmp / 'classnames.txt'
    kinds = write_shard(shard)
    classnames.write_text('\n'.join(CLASSES) + '\n')
    model = clip_jax.create_model('tiny')
    save_model(tmp / 'checkpoint', model.cfg, get_params(model))
    print(f'{shard.stat().st_size / 2**20:.1f} MB shard, bad samples: {", ".join(kinds)}',
          flush=True)
    outcomes, skips = {}, {}
    for command, (cmd, folders) in commands(tmp, shard, classnames, tmp / 'checkpoint',
                                            args.steps).items():
      outcomes[command] = run(cmd, env, args.timeout)
      skips[command] = reported_skips(outcomes[command], folders, tmp)
      print(f'{command}: {outcomes[command].result} in {outcomes[command].seconds:.0f} s',
            flush=True)
    print(table(outcomes, skips))


if __name__ == '__main__':
  main()
