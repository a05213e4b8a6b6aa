"""The architecture registry: a Hugging Face class name -> the jaxlm class that builds it.

Loading and saving checkpoints is not here: `jaxlm.pretrained` (above models/ and hf/)
does that.
"""

from __future__ import annotations

from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.models import decoder, encoder, encoder_decoder

# Architecture names are Hugging Face class names; each module lists its own.
ARCHITECTURES = {**encoder.ARCHITECTURES, **decoder.ARCHITECTURES, **encoder_decoder.ARCHITECTURES}


def build_model(cfg: ModelConfig, *, runtime: Runtime | None = None, seed: int = 0) -> nnx.Module:
  """The model `cfg.architectures[0]` names (BertForPreTraining by default), randomly
  initialized from `seed`, running as `runtime` says (default: float32, XLA attention)."""
  arch = (cfg.architectures or ["BertForPreTraining"])[0]
  if arch not in ARCHITECTURES:
    raise ConfigError(f"model.architectures: unknown architecture {arch!r}; "
                      f"known: {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[arch](cfg, rngs=nnx.Rngs(params=seed), runtime=runtime or Runtime())


def build_abstract_model(cfg: ModelConfig, *, runtime: Runtime | None = None) -> nnx.Module:
  """The model with shape-only parameters: no random init for weights about to be loaded."""
  return nnx.eval_shape(lambda: build_model(cfg, runtime=runtime))
