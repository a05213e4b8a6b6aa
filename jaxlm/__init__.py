"""jaxlm: transformer language models in JAX/Flax NNX, from one shared layer library."""

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError, DataError, JaxlmError
from jaxlm.generate import generate
from jaxlm.models.auto import build_model
from jaxlm.pretrained import from_pretrained, save_pretrained

__all__ = ["ModelConfig", "Runtime", "ConfigError", "DataError", "JaxlmError", "build_model",
           "from_pretrained", "save_pretrained", "generate", "load_tokenizer"]
__version__ = "0.1.0"


def load_tokenizer(path: str, *, lowercase: bool | None = None):
  """The tokenizer in `path`: HF tokenizer.json (any model type), SentencePiece *.model or
  BERT vocab.txt, or a directory holding one. See `jaxlm.data.tokenizer.Tokenizer.load`."""
  # Imported on use: `import jaxlm` stays free of sentencepiece (absent from the HF venv).
  from jaxlm.data.tokenizer import load_tokenizer as load  # pylint: disable=import-outside-toplevel
  return load(path, lowercase=lowercase)
