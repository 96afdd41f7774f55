r"""SigLIP 2 NaFlex: each image at its own aspect ratio, at a sequence length drawn per batch.

  python -m clip_jax.train \
      --config configs/siglip2_naflex.py:model=naflexvit_so400m_patch16_siglip \
      --workdir gs://BUCKET/runs/naflex_so400m \
      --config.data.train='gs://BUCKET/webli/{00000..09999}.tar' \
      --config.model.text.tokenizer=gs://BUCKET/gemma_tokenizer.model

Variants (`:ARGS`): `model=` naflexvit_base_patch16_siglip (default) or
naflexvit_so400m_patch16_siglip (timm's trunks with SigLIP 2's text towers; the Gemma
sentencepiece model is the user's, `model.text.tokenizer`); `tokens=` the token budget per
global batch (default 32,768 x 256: a batch of 32,768 at 256 tokens, 8,192 at 1,024);
`samples=` (default 9B). Each batch draws its length from 256, 576 and 1,024
(`data.naflex.seq_lens`) and holds as many images as the budget allows at it, so every
step does about the same work; one step is compiled per length. Steps = samples / the
batch at the shortest length (`batch_size`). The SigLIP recipe otherwise (configs/siglip.py:
sigmoid ring loss, lr 1e-3, b2 0.95, wd 1e-4, whole images: its `squash` augmentation keeps
a NaFlex image uncropped at its own aspect ratio). To start from a fixed-resolution SigLIP 2
checkpoint as SigLIP 2 did, import it under the NaFlex preset (`python -m
clip_jax.import_open_clip --model naflexvit_so400m_patch16_siglip --checkpoint
ViT-SO400M-16-SigLIP2-256.safetensors --out DIR`) and pass `--config.init_from=DIR`.
Expected: not reproduced here (no data); the CPU demo's NaFlex run is in docs/models.md.
"""

from clip_jax.config_base import parse_arg
from configs import siglip

SEQ_LENS = (256, 576, 1024)


def get_config(arg=None):
  args = parse_arg(arg, model='naflexvit_base_patch16_siglip', tokens=32768 * 256,
                   samples=int(9e9))
  batch_size = args.tokens // min(SEQ_LENS)  # the batch at the shortest length
  c = siglip.get_config(f'model={args.model},batch_size={batch_size},samples={args.samples}')
  c.data.naflex.seq_lens = SEQ_LENS
  c.data.naflex.max_tokens_per_batch = args.tokens
  return c
