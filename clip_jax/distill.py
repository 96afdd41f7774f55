"""A frozen teacher for distillation (`config.distill`, OpenCLIP's `--distill-model`).

The teacher is any clip_jax checkpoint or workdir (an imported OpenCLIP model included),
placed on the mesh by the student's sharding rules. The train step embeds each batch with
it, without gradients, and adds `losses.distillation_loss` (OpenCLIP's `DistillClipLoss`)
times `config.distill.weight` to the contrastive loss. It reads the student's batches: the
same tokens (so the same tokenizer and context length) and the student's images,
normalised as the teacher was trained and resized to its resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from clip_jax import accumulate, sharding
from clip_jax import checkpoint as ckpt
from clip_jax.data.transforms import normalize_on_device
from clip_jax.models.config import CLIPConfig
from clip_jax.models.functional import FunctionalModel

Params = dict[str, Any]


def check(config: ml_collections.ConfigDict, student: CLIPConfig) -> None:
  """The `config.distill` checks, before any compute: weight, teacher path, fit, mode."""
  distill, optim = config.distill, config.optim
  if not distill.teacher:
    return
  if distill.weight <= 0:
    raise ValueError(f'config.distill.weight={distill.weight} must be > 0 when '
                     'config.distill.teacher is set.')
  if optim.grad_accum > 1 and optim.grad_accum_mode == 'micro':
    raise ValueError('config.distill.teacher needs config.optim.grad_accum_mode=\'cache\' when '
                     f'config.optim.grad_accum={optim.grad_accum} > 1: \'micro\' scores each '
                     'micro-batch alone, the teacher embeds the whole batch.')
  try:
    teacher = ckpt.load_model_config(distill.teacher)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.distill.teacher={distill.teacher}: {e}') from e
  student_text = (student.text.tokenizer, student.text.context_length)
  if (teacher.text.tokenizer, teacher.text.context_length) != student_text:
    raise ValueError(
        f'config.distill.teacher={distill.teacher} reads tokens of tokenizer '
        f'{teacher.text.tokenizer!r}, context {teacher.text.context_length}; the student '
        f'({config.model.name}) feeds {student_text[0]!r}, context {student_text[1]}.')
  if teacher.text.vocab_size < student.text.vocab_size:
    raise ValueError(f'config.distill.teacher={distill.teacher} has a vocabulary of '
                     f'{teacher.text.vocab_size} tokens, the student {student.text.vocab_size}.')


@dataclasses.dataclass
class Teacher:
  """The teacher's model (execution options of the run) and where its params live."""
  model: FunctionalModel
  shardings: Params

  @classmethod
  def create(cls, cfg: CLIPConfig, mesh: Mesh, rules, dtype: str) -> Teacher:
    """Runs in the student's compute `dtype`; it has no backward pass, so no remat. Its
    params are placed by the student's sharding `rules`; a BatchNorm teacher normalises by
    its running statistics (replicated)."""
    model = FunctionalModel.create(cfg.replace(dtype=dtype, remat='none'))
    return cls(model, sharding.variable_shardings(model.abstract, mesh, rules))

  def embed(self, params: Params, batch: dict, mesh: Mesh, accum: int,
            batch_sharding: NamedSharding) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(image features, text features, log logit scale) of the whole batch, as constants.

    With `accum` > 1 it encodes one micro-batch at a time (`accumulate.split`), so its
    activations are those of a micro-batch, as the student's are.
    """
    if accum == 1:
      return jax.lax.stop_gradient(self._embed(params, batch, mesh))
    micro = jax.tree.map(lambda x: accumulate.split(x, accum, batch_sharding), batch)
    img, txt, scale = jax.lax.map(lambda one: self._embed(params, one, mesh), micro)
    return jax.lax.stop_gradient((accumulate.merge(img, batch_sharding),
                                  accumulate.merge(txt, batch_sharding), scale[0]))

  def _embed(self, params, batch, mesh):
    cfg = self.model.cfg
    images = normalize_on_device(batch['image'], cfg.preprocess)
    size = cfg.vision.image_size
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, 3), 'bilinear')
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for sharding.constrain_batch
      img, txt, scale, _ = self.model.bind(params)(images.astype(cfg.dtype), batch['text'])
    return img, txt, scale


def load(path: str, mesh: Mesh, rules, dtype: str) -> tuple[Teacher, Params]:
  """(teacher, its params on the mesh) from a checkpoint or workdir (see `Teacher.create`)."""
  cfg, params = ckpt.load_params(path)
  teacher = Teacher.create(cfg, mesh, rules, dtype)
  teacher.model.check(params)
  return teacher, jax.device_put(params, teacher.shardings)
