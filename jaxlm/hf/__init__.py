"""Hugging Face checkpoints in and out.

Each family module (bert.py, llama.py, ...) registers a `Family`: how its config.json
maps to a ModelConfig and how its tensor names and layouts map to jaxlm's flat
parameter names ("model.layers.0.attn.q.kernel"), both ways. `load` and `save` in
`jaxlm.hf.convert` are the only entry points the rest of jaxlm uses.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxlm.config import ModelConfig

Tensors = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF model family. `architectures` are the HF class names it handles; jaxlm
  uses the same names (`ModelConfig.architectures`, `jaxlm.models.auto.ARCHITECTURES`)."""

  name: str
  architectures: tuple[str, ...]
  config_from_hf: Callable[[dict], ModelConfig]
  config_to_hf: Callable[[ModelConfig, str], dict]  # (cfg, hf class name) -> config.json
  params_from_hf: Callable[[Tensors, ModelConfig, str], Tensors]
  params_to_hf: Callable[[Tensors, ModelConfig, str], Tensors]


FAMILIES: dict[str, Family] = {}  # HF class name -> Family


def register(family: Family) -> Family:
  for arch in family.architectures:
    FAMILIES[arch] = family
  return family
