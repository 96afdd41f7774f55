"""clip_jax: CLIP and SigLIP training and inference in JAX/Flax, interchangeable with OpenCLIP."""

from clip_jax.api import create_model, get_tokenizer, load
from clip_jax.models.clip import CLIP
from clip_jax.models.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clip_jax.models.presets import get_config, list_models

__all__ = ['CLIP', 'CLIPConfig', 'PreprocessConfig', 'TextConfig', 'VisionConfig', 'create_model',
           'get_config', 'get_tokenizer', 'list_models', 'load']
