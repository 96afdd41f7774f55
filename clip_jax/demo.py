"""Zero-shot demo: a model names the colour and shape in new generated images.

  python -m clip_jax.demo --checkpoint /tmp/clip_demo     # after training configs/demo.py
  python -m clip_jax.demo                                  # a random-init tiny model

Images are drawn like the demo dataset's held-out split (one group of shapes); each is
classified among the 40 colour x shape classes by a zero-shot text classifier. A
random-init model sits near chance (2.5%); the trained demo model is far above it.

A model with a caption decoder also captions each image (greedy): CoCa from
`<start_of_text>`, LocCa from its caption task token; LocCa's decoder further answers the
referring task (the group's phrase -> its box) and the grounded one (the box -> a phrase).
The scores (`decoder_scores`) count captions and phrases that name exactly the drawn
class (the demo grammar's parser, `data.locca.shape_classes`) and boxes within IoU 0.5.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import clip_jax
from clip_jax.cli import naming, positive_int, user_errors
from clip_jax.data import locca
from clip_jax.data.make_demo import CLASSNAMES, Scene, draw_scene
from clip_jax.eval.inputs import ImageInput
from clip_jax.eval.zeroshot import build_classifier

TEMPLATES = ('a photo of a {}.', 'a {}.')


def zero_shot(model, preprocess, tokenizer, images: list[Image.Image], labels: list[str]
              ) -> np.ndarray:
  """Class probabilities [images, labels] from a zero-shot classifier over the labels."""
  classifier = build_classifier(lambda t: model.encode_text(jnp.asarray(t), normalize=True),
                                tokenizer, labels, TEMPLATES)
  pixels = jnp.asarray(np.stack([preprocess(im) for im in images]))
  image_features = model.encode_image(pixels, normalize=True)
  logits = jnp.exp(model.logit_scale[...]) * image_features @ classifier.T
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def _generate(model, pixels: jax.Array, prefixes: list[np.ndarray], eos_id: int,
              seq_len: int) -> list[list[int]]:
  """Greedy continuations (the ids after each prefix, up to eos), batched by prefix length."""
  out: list[list[int]] = [[] for _ in prefixes]
  for length in sorted({len(p) for p in prefixes}):
    rows = [i for i, p in enumerate(prefixes) if len(p) == length]
    ids = np.asarray(model.generate(
        pixels[np.asarray(rows)], jnp.asarray(np.stack([prefixes[i] for i in rows])),
        generation_type='greedy', seq_len=seq_len, min_seq_len=0, sot_id=int(prefixes[0][0]),
        eos_id=eos_id, pad_id=0))
    for i, row in zip(rows, ids):
      tail = [int(t) for t in row[length:]]
      out[i] = tail[:tail.index(eos_id)] if eos_id in tail else tail
  return out


def decoder_scores(model, preprocess, tokenizer, scenes: list[Scene]) -> dict[str, float]:
  """Held-out captioning (and LocCa's referring and grounded) accuracy on demo scenes."""
  pixels = jnp.asarray(np.stack([preprocess(s.image) for s in scenes]))
  classes = [{o['class'] for o in s.objects} for s in scenes]
  sot, eos = tokenizer.sot_id, tokenizer.eot_id
  seq_len = min(model.decoder.cfg.context_length, model.text.cfg.context_length)
  d = model.decoder.cfg
  spec = (locca.spec_of_decoder(d.vocab_size, d.context_length, tokenizer)
          if d.embed_tokens else None)
  start = locca.prompt('caption', None, spec) if spec else np.asarray([sot], np.int32)
  captions = _generate(model, pixels, [start] * len(scenes), eos, seq_len)
  scores = {'caption_accuracy': float(np.mean([
      locca.shape_classes(tokenizer.decode(c)) == want for c, want in zip(captions, classes)]))}
  if spec is None:
    return scores
  first = [s.objects[0] for s in scenes]
  boxes = _generate(model, pixels, [locca.prompt('referring', o['phrase'], spec) for o in first],
                    eos, seq_len)
  found = [locca.box_from_tokens(b, spec) for b in boxes]
  scores['referring_accuracy'] = float(np.mean([
      box is not None and locca.iou(box, tuple(o['box'])) >= 0.5 for box, o in zip(found, first)]))
  phrases = _generate(model, pixels, [locca.prompt('grounded', tuple(o['box']), spec)
                                      for o in first], eos, seq_len)
  scores['grounded_accuracy'] = float(np.mean([
      locca.shape_classes(tokenizer.decode(p)) == {o['class']} for p, o in zip(phrases, first)]))
  return scores


@user_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', help='clip_jax checkpoint or training workdir')
  parser.add_argument('--model', default='tiny', help='preset for a random-init model')
  parser.add_argument('--images', type=positive_int, default=12)
  parser.add_argument('--seed', type=int, default=123)
  args = parser.parse_args(argv)
  if args.checkpoint:
    with naming('--checkpoint'):
      model, preprocess, tokenizer = clip_jax.load(args.checkpoint)
  else:
    with naming('--model'):
      model = clip_jax.create_model(args.model)
    preprocess = ImageInput.of(model.cfg).normalized
    tokenizer = clip_jax.get_tokenizer(args.model)
  rng = np.random.default_rng(args.seed)
  scenes = [draw_scene(rng, 64, groups=1) for _ in range(args.images)]
  probs = zero_shot(model, preprocess, tokenizer, [s.image for s in scenes], CLASSNAMES)
  print(f'{"image":>5}  {"true class":<16} {"predicted":<16} p(predicted)')
  for i, (scene, p) in enumerate(zip(scenes, probs)):
    print(f'{i:>5}  {CLASSNAMES[scene.label]:<16} {CLASSNAMES[p.argmax()]:<16} {p.max():.3f}')
  accuracy = np.mean([p.argmax() == s.label for p, s in zip(probs, scenes)])
  print(f'zero-shot top-1: {accuracy:.1%} over {len(CLASSNAMES)} classes (chance '
        f'{1 / len(CLASSNAMES):.1%}; {"trained" if args.checkpoint else "random init"})')
  if model.decoder is not None:
    for name, value in decoder_scores(model, preprocess, tokenizer, scenes).items():
      print(f'{name.replace("_", " ")}: {value:.1%}')


if __name__ == '__main__':
  main()
