"""Trains a sentencepiece tokenizer on a caption corpus (one caption per line).

  python -m clip_jax.data.train_tokenizer --captions captions.txt --vocab_size 32000 \
      --out my_tokenizer.model

The id layout follows SigLIP's T5 vocabulary (pad=0, eos=1, unk=2, no bos), and captions
are canonicalised the way `SentencePieceTokenizer` canonicalises them at run time, so the
model is trained on exactly the text it will see.
"""

from __future__ import annotations

import argparse
import io

from etils import epath

from clip_jax.cli import positive_int, user_errors
from clip_jax.data.tokenizers import clean_canonicalize


def train_tokenizer(captions: str, vocab_size: int, out: str, model_type: str = 'unigram',
                    character_coverage: float = 0.9995) -> epath.Path:
  import sentencepiece
  captions_path, out_path = epath.Path(captions), epath.Path(out)
  if not captions_path.is_file():
    raise FileNotFoundError(f'Captions file {captions_path} does not exist.')
  if out_path.suffix != '.model':
    raise ValueError(f'--out must end in .model, got {out_path}')
  lines = (clean_canonicalize(line) for line in captions_path.read_text().splitlines())
  sentences = [line for line in lines if line]
  if not sentences:
    raise ValueError(f'Captions file {captions_path} holds no non-empty caption.')
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=character_coverage, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'sentencepiece could not train on {captions_path} with '
                     f'--vocab_size={vocab_size}: {e}') from e
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_bytes(model.getvalue())
  return out_path


@user_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--captions', required=True, help='text file, one caption per line')
  parser.add_argument('--vocab_size', type=positive_int, required=True)
  parser.add_argument('--out', required=True, help='output path ending in .model')
  parser.add_argument('--model_type', default='unigram', choices=['unigram', 'bpe'])
  parser.add_argument('--character_coverage', type=float, default=0.9995,
                      help='fraction of characters covered; rarer ones become pieces of unk')
  args = parser.parse_args(argv)
  path = train_tokenizer(args.captions, args.vocab_size, args.out, args.model_type,
                         args.character_coverage)
  print(f'Wrote the sentencepiece tokenizer {path} (vocab_size {args.vocab_size}, '
        f'{args.model_type}). Next: train with --config.model.text.tokenizer={path}')


if __name__ == '__main__':
  main()
