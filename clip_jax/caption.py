"""Captions images with a checkpoint's caption decoder (CoCa), one line per image.

  python -m clip_jax.caption --checkpoint DIR IMAGE [IMAGE ...] \
      [--generation_type beam_search|greedy|top_k|top_p] [--seq_len 30] [--top_k 1] \
      [--top_p 0.1] [--temperature 1.0] [--num_beams 6] [--num_beam_groups 3] [--seed 0] \
      [--batch_size 16] [--ema]

prints `PATH<TAB>caption` per image, in the order given. The defaults are OpenCLIP's
`CoCa.generate` (docs/captioning.md); DIR is a checkpoint or a training workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

import clip_jax
from clip_jax.checkpoint import load_model_config, resolve_checkpoint
from clip_jax.cli import naming, positive_int, user_errors
from clip_jax.data import locca
from clip_jax.data.tokenizers import CLIPTokenizer, Tokenizer
from clip_jax.models.generate import GENERATION_TYPES, Settings


def caption_text(tokenizer: Tokenizer, ids: Sequence[int], eos_id: int) -> str:
  """The text of one generated sequence: its tokens before the first `<end_of_text>`
  (OpenCLIP's README: `decode(ids).split('<end_of_text>')[0]`), without the start token."""
  ids = [int(i) for i in ids]
  return tokenizer.decode(ids[:ids.index(eos_id)] if eos_id in ids else ids)


def caption_files(checkpoint: str, paths: Sequence[str], settings: Settings, *, seed: int = 0,
                  batch_size: int = 16, ema: bool = False) -> list[str]:
  """One caption per image file, generated `batch_size` images at a time."""
  missing = [p for p in paths if not epath.Path(p).is_file()]
  if missing:
    raise FileNotFoundError(f'No such image file: {missing[0]}')
  with naming('--checkpoint'):
    source = resolve_checkpoint(checkpoint)
    if load_model_config(source).decoder is None:
      raise ValueError(f'{source}: the model has no caption decoder (config.model.decoder is '
                       'None); train a CoCa preset such as model=coca_ViT-B-32.')
    model, preprocess, tokenizer = clip_jax.load(str(source), ema=ema)
  if not isinstance(tokenizer, CLIPTokenizer):
    raise ValueError(f'{source}: captions need the model\'s CLIP BPE tokenizer (start and end '
                     f'of text tokens); this model has {type(tokenizer).__name__}.')
  # The model's own tokenizer's ids (a trained vocabulary, such as the demo's, renumbers them).
  settings = dataclasses.replace(settings, sot_id=tokenizer.sot_id, eos_id=tokenizer.eot_id)
  assert model.decoder is not None  # checked on the config above
  decoder = model.decoder.cfg
  prefix = (locca.prompt('caption', None, locca.spec_of_decoder(
      decoder.vocab_size, decoder.context_length, tokenizer)) if decoder.embed_tokens else None)
  key = jax.random.key(seed)
  captions = []
  for start in range(0, len(paths), batch_size):
    images = jnp.asarray(np.stack([preprocess(_open(p)) for p in paths[start:start + batch_size]]))
    start_ids = None if prefix is None else jnp.asarray(prefix)
    ids = np.asarray(model.generate(images, start_ids, key=jax.random.fold_in(key, start),
                                    **vars(settings)))
    if prefix is not None:  # LocCa: drop its task token, keep <start_of_text> first
      ids = np.concatenate([ids[:, :1], ids[:, len(prefix):]], axis=1)
    captions += [caption_text(tokenizer, row, settings.eos_id) for row in ids]
  return captions


def _open(path: str) -> Image.Image:
  try:
    with Image.open(path) as image:
      return image.convert('RGB')
  except OSError as e:  # PIL's UnidentifiedImageError included
    raise ValueError(f'{path}: not a readable image ({e})') from e


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  defaults = Settings()
  parser = argparse.ArgumentParser(prog='python -m clip_jax.caption', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='clip_jax checkpoint or workdir')
  parser.add_argument('images', nargs='+', help='image files')
  parser.add_argument('--generation_type', choices=GENERATION_TYPES,
                      default=defaults.generation_type)
  parser.add_argument('--seq_len', type=positive_int, default=defaults.seq_len,
                      help='maximum tokens per caption, start and end included')
  parser.add_argument('--top_k', type=positive_int, default=defaults.top_k)
  parser.add_argument('--top_p', type=float, default=defaults.top_p)
  parser.add_argument('--temperature', type=float, default=defaults.temperature)
  parser.add_argument('--num_beams', type=positive_int, default=defaults.num_beams)
  parser.add_argument('--num_beam_groups', type=positive_int, default=defaults.num_beam_groups)
  parser.add_argument('--seed', type=int, default=0, help='random key of top_k/top_p sampling')
  parser.add_argument('--batch_size', type=positive_int, default=16)
  parser.add_argument('--ema', action='store_true', help='the EMA of the params')
  return parser.parse_args(argv)


@user_errors
def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  settings = Settings(generation_type=args.generation_type, seq_len=args.seq_len,
                      top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                      num_beams=args.num_beams, num_beam_groups=args.num_beam_groups)
  captions = caption_files(args.checkpoint, args.images, settings, seed=args.seed,
                           batch_size=args.batch_size, ema=args.ema)
  for path, caption in zip(args.images, captions):
    print(f'{path}\t{caption}')


if __name__ == '__main__':
  main()
