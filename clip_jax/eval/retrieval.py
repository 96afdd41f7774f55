"""Image<->text retrieval recall@1/5/10, with several captions per image.

Captions of a sample: the `captions` list of its `.json` when present, else the lines of
its `.txt`. image->text counts a hit when any of the image's captions ranks in the top k;
text->image when the caption's image does.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from clip_jax.data.tar_samples import RawSample
from clip_jax.eval import skips
from clip_jax.eval.inputs import ImageInput, Row

KS = (1, 5, 10)


def captions_of(record: RawSample, skipped: skips.Skipped) -> list[str] | None:
  """The sample's captions; None (counted as `bad_caption`) when its `.json` is no object."""
  where = f'{record.shard}:{record.key}'
  if record.meta:
    meta = skips.json_object(record.meta, where, skipped)
    if meta is None:
      return None
    captions = meta.get('captions')
    if isinstance(captions, list) and captions:
      return [str(c) for c in captions]
  return [line for line in record.caption.splitlines() if line.strip()]


def retrieval_examples(spec: str, inputs: ImageInput, skipped: skips.Skipped | None = None
                       ) -> Iterator[tuple[Row, list[str]]]:
  """(image row, captions) of every sample with at least one caption; bad samples are
  counted into `skipped` and named."""
  skipped = skipped if skipped is not None else skips.Skipped()
  for sample in skips.samples(spec, skipped):
    captions = captions_of(sample, skipped)
    if captions:  # an image without a caption has nothing to be retrieved by
      image = skips.decoded(sample.image, inputs.decode_size, f'{sample.shard}:{sample.key}',
                            skipped)
      if image is not None:
        yield inputs(image), captions


def recall_at_k(image_features: np.ndarray, text_features: np.ndarray,
                text_to_image: np.ndarray) -> dict[str, float]:
  """Recall@{1,5,10} in both directions from normalised features. A rank counts the
  candidates scoring strictly higher than the true one, in both directions: ties (identical
  captions, which the demo repeats) go to the true match, so the metric does not depend on
  how a sort orders equal scores or on how the features were batched."""
  scores = image_features @ text_features.T  # [images, texts]
  results = {}
  # text -> image: rank of the true image among all images, per caption.
  true = scores[text_to_image, np.arange(len(text_to_image))]
  t2i_rank = (scores > true[None, :]).sum(0)
  # image -> text: rank of the image's best-scoring own caption among all captions.
  own = text_to_image[None, :] == np.arange(len(scores))[:, None]
  best_own = np.where(own, scores, -np.inf).max(1)
  i2t_rank = (scores > best_own[:, None]).sum(1)
  for k in KS:
    results[f'image_to_text_R@{k}'] = float((i2t_rank < k).mean())
    results[f'text_to_image_R@{k}'] = float((t2i_rank < k).mean())
  return results
