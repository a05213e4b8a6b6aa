"""jaxlm: transformer language models in JAX/Flax NNX, from one shared layer library."""

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError, DataError, JaxlmError
from jaxlm.generate import generate
from jaxlm.models.auto import build_model
from jaxlm.pretrained import from_pretrained, save_pretrained

__all__ = ["ConfigError", "DataError", "JaxlmError", "ModelConfig", "Runtime", "build_model",
           "from_pretrained", "generate", "load_tokenizer", "prune", "quantize", "save_pretrained"]
__version__ = "0.1.0"


def load_tokenizer(path: str, *, lowercase: bool | None = None):
  """The tokenizer in `path`: HF tokenizer.json (any model type), SentencePiece *.model or
  BERT vocab.txt, or a directory holding one. See `jaxlm.data.tokenizer.Tokenizer.load`."""
  # Imported on use: `import jaxlm` stays free of sentencepiece (absent from the HF venv).
  from jaxlm.data.tokenizer import load_tokenizer as load  # pylint: disable=import-outside-toplevel
  return load(path, lowercase=lowercase)


def quantize(model, mode: str, group_size: int = 128, **kwargs):
  """Weight-only quantization by module swap: "int8", "int4" (per group of `group_size`
  inputs) or "bf16". See `jaxlm.compress.quantize.quantize`."""
  from jaxlm.compress.quantize import quantize as run  # pylint: disable=import-outside-toplevel
  return run(model, mode, group_size, **kwargs)


def prune(model, method: str = "magnitude", sparsity: float | None = None,
          pattern: str = "unstructured", **kwargs):
  """Zeroes block weights by "magnitude" or "wanda" ("unstructured" or "2:4"); returns
  (model, report). See `jaxlm.compress.prune.prune`."""
  from jaxlm.compress.prune import prune as run  # pylint: disable=import-outside-toplevel
  return run(model, method, sparsity, pattern, **kwargs)
