"""Caption generation (`clip_jax.models.generate`, `python -m clip_jax.caption`) against the
uncached decoder and OpenCLIP's own `CoCa.generate` on the same weights."""

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import clip_jax
from clip_jax.checkpoint import save_model
from clip_jax.data.tokenizers import CLIPTokenizer
from clip_jax.import_open_clip import import_state_dict
from clip_jax.models import generate as G
from clip_jax.models.functional import get_params, model_from_params
from tests.reference import open_clip_model, state_dict_numpy

EOS = G.EOS_ID


def _images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


LOCCA = {'decoder.embed_tokens': True, 'decoder.image_positions': 16}  # the pooler's 16 tokens


@pytest.mark.parametrize('overrides', [{}, LOCCA], ids=['coca', 'locca'])
def test_cached_steps_give_the_uncached_logits(overrides):
  """Every position's logits from the key-value cache equal `caption_logits` (teacher forced,
  whole sequence); a pad id inside the text exercises CoCa's key mask."""
  model = clip_jax.create_model('tiny-coca', **overrides)
  images = jnp.asarray(_images(2, model.cfg.vision.image_size))
  tokens = np.random.default_rng(1).integers(1, 49406, size=(2, 8)).astype(np.int32)
  tokens[:, 0], tokens[1, 5] = G.SOT_ID, 0
  tokens = jnp.asarray(tokens)
  if overrides:
    want = model.caption_logits(images, tokens, decoder_tokens=tokens)[-1]
  else:
    want = model.caption_logits(images, tokens)[-1]
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, cache, t: G.decode_step(nnx.merge(graphdef, state), cache,
                                                       tokens, t))
  cache = G.init_cache(model, images, tokens.shape[1])
  got = []
  for t in range(tokens.shape[1] - 1):
    logits, cache = step(state, cache, jnp.int32(t))
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, 1), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.fixture
def open_clip_generate(monkeypatch):
  """OpenCLIP's `CoCa.generate` with the installed transformers: OpenCLIP 3.3 turns generation
  off when `BeamSearchScorer` cannot be imported (transformers 5 removed it), though its
  greedy and sampling loop only needs the logits processors every version has."""
  import open_clip.coca_model as coca
  import transformers
  monkeypatch.setattr(coca, '_has_transformers', True)
  monkeypatch.setattr(coca, 'GENERATION_TYPES', {
      'top_k': transformers.TopKLogitsWarper, 'top_p': transformers.TopPLogitsWarper,
      'beam_search': 'beam_search'})
  try:
    from transformers.generation.beam_search import BeamSearchScorer
    monkeypatch.setattr(coca, 'BeamSearchScorer', BeamSearchScorer, raising=False)
    beams = True
  except ImportError:
    beams = False

  def generate(model, images, **kwargs):
    if kwargs.get('generation_type') == 'beam_search' and not beams:
      pytest.skip('OpenCLIP beam search needs transformers < 5 (BeamSearchScorer)')
    with torch.no_grad():
      out = model.generate(torch.from_numpy(images).permute(0, 3, 1, 2), **kwargs).numpy()
    # OpenCLIP cuts the batch after its longest sequence; clip_jax pads to seq_len.
    return np.pad(out, ((0, 0), (0, kwargs.get('seq_len', 30) - out.shape[1])))
  return generate


def _paired(name, layers, eos_weight):
  """OpenCLIP's CoCa and the clip_jax model with the same weights. Random weights seldom pick
  `<end_of_text>`; `eos_weight` points its decoder column along the final LayerNorm's bias,
  so that captions end at different lengths."""
  torch_model = open_clip_model(name, layers, layers)
  with torch.no_grad():
    proj = torch_model.text_decoder.text_projection  # seeded by `open_clip_model`
    bias = torch_model.text_decoder.ln_final.bias
    proj[:, EOS] = eos_weight * bias / bias.norm()
  overrides = {'vision.layers': layers, 'text.layers': layers, 'decoder.layers': layers}
  cfg = clip_jax.get_config(name, **(overrides if layers else {}))
  return torch_model, model_from_params(cfg, import_state_dict(cfg, state_dict_numpy(torch_model)))


def _ends(tokens):
  return [int(np.argmax(row == EOS)) if EOS in row else None for row in tokens]


@pytest.mark.parametrize('generation_type', ['greedy', 'beam_search'])
def test_tiny_coca_generation_matches_open_clip(open_clip_generate, generation_type):
  """Greedy (OpenCLIP: top_k=1) and beam search (its defaults: 6 beams in 3 groups) give
  OpenCLIP's tokens. With the repetition penalty the captions vary, and end at 10 to 21
  tokens or (beam search) not at all: padding after the end, hypotheses of different
  lengths and unended beams."""
  torch_model, model = _paired('tiny-coca', None, 4.0)
  images = _images(4, 64)
  kwargs = dict(repetition_penalty=1.5)
  want = open_clip_generate(torch_model, images, generation_type=(
      'top_k' if generation_type == 'greedy' else generation_type), **kwargs)
  got = np.asarray(model.generate(jnp.asarray(images), generation_type=generation_type,
                                  **kwargs))
  np.testing.assert_array_equal(got, want)
  ends = _ends(got)
  assert len(set(ends)) >= 3 and all(e is None or e >= 5 for e in ends), ends


def test_coca_vit_b32_greedy_matches_open_clip(open_clip_generate):
  """coca_ViT-B-32 (2 layers per tower): greedy captions equal OpenCLIP's, token for token,
  with OpenCLIP's defaults (no repetition penalty): long sequences of varied tokens."""
  torch_model, model = _paired('coca_ViT-B-32', 2, 0.0)
  images = _images(2, 224)
  want = open_clip_generate(torch_model, images, generation_type='top_k', top_k=1, seq_len=16)
  got = np.asarray(model.generate(jnp.asarray(images), generation_type='greedy', seq_len=16))
  np.testing.assert_array_equal(got, want)
  assert all(len(set(row[1:-1])) > 1 for row in got), got


def test_beam_search_finds_the_exhaustive_best():
  """On an 8-token vocabulary, beams wide enough to keep every sequence give the best of
  all of them by OpenCLIP's score: summed raw logits over the length (the end token
  counted), `<end_of_text>` forbidden before `min_seq_len`, unended ones at full length."""
  vocab, sot, eos, seq_len, min_len = 8, 6, 7, 5, 3
  model = clip_jax.create_model('tiny-coca', **{'decoder.vocab_size': vocab,
                                                'text.vocab_size': vocab})
  images = _images(2, model.cfg.vision.image_size)
  settings = dict(seq_len=seq_len, min_seq_len=min_len, sot_id=sot, eos_id=eos, pad_id=0)
  got = np.asarray(model.generate(jnp.asarray(images), generation_type='beam_search',
                                  num_beams=2800, num_beam_groups=1, **settings))
  words = [w for w in range(vocab) if w != eos]
  bodies = np.array([[sot, *body] for body in itertools.product(words, repeat=seq_len - 1)])
  for image, row in zip(images, got):
    logits = np.asarray(model.caption_logits(
        jnp.asarray(np.repeat(image[None], len(bodies), 0)),
        jnp.asarray(np.concatenate([bodies, bodies[:, :1]], 1)))[-1])  # [N, seq_len, vocab]
    words_so_far = np.concatenate([np.zeros((len(bodies), 1)), np.take_along_axis(
        logits[:, :-1], bodies[:, 1:, None], 2)[..., 0].cumsum(1)], 1)  # [N, seq_len]
    ending = [(words_so_far[:, n] + logits[:, n, eos]) / (n + 2)  # n words, then the end
              for n in range(min_len - 1, seq_len - 1)]
    candidates = [(scores.max(), [*bodies[scores.argmax(), :n + 1], eos])
                  for n, scores in zip(range(min_len - 1, seq_len - 1), ending)]
    unended = words_so_far[:, -1] / seq_len
    candidates.append((unended.max(), list(bodies[unended.argmax()])))
    best_seq = max(candidates, key=lambda c: c[0])[1]
    np.testing.assert_array_equal(row, np.pad(best_seq, (0, seq_len - len(best_seq))))


@pytest.mark.parametrize('generation_type,limit', [('top_k', 3), ('top_p', 0.6)])
def test_sampling_stays_in_the_top_tokens(generation_type, limit):
  """Every sampled token is among the top k, or inside the nucleus (the top tokens whose
  probability before it is under top_p), of the uncached logits; a key repeats its
  samples, another key gives others. The temperature (2) applies after the cut."""
  model = clip_jax.create_model('tiny-coca')
  images = jnp.asarray(_images(3, 64))
  kwargs = dict(generation_type=generation_type, temperature=2.0, seq_len=16,
                **{'top_k' if generation_type == 'top_k' else 'top_p': limit})
  got = np.asarray(model.generate(images, key=jax.random.key(1), **kwargs))
  np.testing.assert_array_equal(got, model.generate(images, key=jax.random.key(1), **kwargs))
  assert (got != np.asarray(model.generate(images, key=jax.random.key(2), **kwargs))).any()
  logits = np.array(model.caption_logits(images, jnp.asarray(got))[-1])[:, :-1]
  logits[:, :4, EOS] = -np.inf  # min_seq_len 5
  for row, row_logits in zip(got, logits):
    assert row[-1] == EOS and EOS not in row[:-1]  # forced at the last position
    for token, lg in zip(row[1:-1], row_logits):
      order = np.argsort(-lg)
      rank = int(np.nonzero(order == token)[0][0])
      if generation_type == 'top_k':
        assert rank < limit
      else:
        probs = np.exp(lg[order] - lg.max())
        probs /= probs.sum()
        assert probs[:rank].sum() < limit + 1e-6


def test_prefix_and_sharded_batch():
  """A prefix starts every sequence; with the batch sharded over 8 devices each generation
  type gives the single-device tokens."""
  model = clip_jax.create_model('tiny-coca')
  images = _images(8, 64)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(images, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      'data')))
  prefix = jnp.asarray([G.SOT_ID, 320, 1929])
  for generation_type in ('greedy', 'top_p', 'beam_search'):
    kwargs = dict(generation_type=generation_type, seq_len=12, top_p=0.9, text=prefix)
    want = np.asarray(model.generate(jnp.asarray(images), **kwargs))
    np.testing.assert_array_equal(want[:, :3], np.broadcast_to(prefix, (8, 3)))
    np.testing.assert_array_equal(np.asarray(model.generate(sharded, **kwargs)), want)


def test_decode_matches_open_clip():
  """A generated sequence's text: OpenCLIP's `decode(ids).split('<end_of_text>')[0]` without
  the start token."""
  import open_clip

  from clip_jax.caption import caption_text
  tokenizer = CLIPTokenizer()
  ids = tokenizer(['A photo of two red stars, isn\'t it? 3.5 café'])[0]
  want = open_clip.decode(torch.from_numpy(ids)).split('<end_of_text>')[0]
  assert caption_text(tokenizer, ids, EOS) == want.replace('<start_of_text>', '').strip()


def _caption(*args):
  return subprocess.run([sys.executable, '-m', 'clip_jax.caption', *map(str, args)],
                        check=False, capture_output=True, text=True, timeout=300)


def test_caption_cli(tmp_path):
  """One `PATH<TAB>caption` line per image in order (here greedy, 2 images per batch);
  one-line errors for a missing image and for a model without a decoder."""
  cfg = clip_jax.get_config('tiny-coca')
  save_model(tmp_path / 'coca', cfg, get_params(clip_jax.create_model(cfg)))
  paths = []
  for i, color in enumerate(['red', 'blue', 'green']):
    paths.append(tmp_path / f'{i}.png')
    Image.new('RGB', (80, 60), color).save(paths[-1])
  result = _caption('--checkpoint', tmp_path / 'coca', *paths, '--generation_type', 'greedy',
                    '--seq_len', 10, '--batch_size', 2)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [line.split('\t')[0] for line in lines] == list(map(str, paths))
  assert all(line.split('\t')[1] for line in lines)

  result = _caption('--checkpoint', tmp_path / 'coca', paths[0], tmp_path / 'missing.jpg')
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f'error: No such image file: {tmp_path / "missing.jpg"}']

  tiny = clip_jax.get_config('tiny')
  save_model(tmp_path / 'clip', tiny, get_params(clip_jax.create_model(tiny)))
  result = _caption('--checkpoint', tmp_path / 'clip', paths[0])
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1
  assert 'no caption decoder (config.model.decoder' in result.stderr
