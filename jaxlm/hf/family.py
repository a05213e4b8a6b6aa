"""What a Hugging Face family module provides: the `Family` record."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxlm.config import ModelConfig

Tensors = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF model family. `architectures` are the HF class names it handles; jaxlm
  uses the same names (`ModelConfig.architectures`, `jaxlm.models.auto.ARCHITECTURES`).

  `params_from_hf(tensors, cfg, arch, expected)` gets `expected`, the jaxlm parameter
  shapes of the model `cfg` builds (by dotted name), from the caller: the mappings never
  build models themselves.
  """

  name: str
  architectures: tuple[str, ...]
  config_from_hf: Callable[[dict], ModelConfig]
  config_to_hf: Callable[[ModelConfig, str], dict]  # (cfg, hf class name) -> config.json
  params_from_hf: Callable[[Tensors, ModelConfig, str, dict[str, tuple]], Tensors]
  params_to_hf: Callable[[Tensors, ModelConfig, str], Tensors]
