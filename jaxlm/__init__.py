"""jaxlm: transformer language models in JAX/Flax NNX, from one shared layer library."""

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, DataError, JaxlmError
from jaxlm.models.auto import build_model, from_pretrained, save_pretrained

__all__ = ["ModelConfig", "ConfigError", "DataError", "JaxlmError", "build_model",
           "from_pretrained", "save_pretrained"]
__version__ = "0.1.0"
