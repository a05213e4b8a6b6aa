"""Hugging Face checkpoints in and out: one small module per family.

Each family module (llama.py, gpt2.py, ...) describes, as a `Family`, how its config.json
maps to a ModelConfig and how its tensor names and layouts map to jaxlm's flat parameter
names ("model.layers.0.attn.q.kernel"), both ways; most do it with one `TensorMap`
(common.py; llama.py is the model to copy). Nothing here builds or imports a model:
`jaxlm.pretrained` loads and saves directories with these mappings.

A new family is a module here plus one entry in the import list below.
"""

from __future__ import annotations

import os

from jaxlm.config import read_json_object
from jaxlm.errors import DataError
from jaxlm.hf import (bert, bloom, cohere, dbrx, falcon, gemma, gpt2, gpt_neox, llama, mixtral,
                      mpt, phi3, qwen2, t5)
from jaxlm.hf.family import Family, Tensors

__all__ = ["FAMILIES", "Family", "Tensors", "family_of", "read_hf_config"]

FAMILIES: dict[str, Family] = {  # HF class name -> Family
    arch: fam
    for module in (bert, bloom, cohere, dbrx, falcon, gemma, gpt2, gpt_neox, llama, mixtral,
                   mpt, phi3, qwen2, t5)
    for fam in module.FAMILIES
    for arch in fam.architectures
}


def family_of(arch: str, source: str) -> Family:
  if arch not in FAMILIES:
    raise DataError(f"{source}: unknown architecture {arch!r}; supported: {sorted(FAMILIES)}")
  return FAMILIES[arch]


def read_hf_config(directory: str) -> dict:
  if not os.path.exists(os.path.join(directory, "config.json")):
    raise DataError(f"{directory}: no config.json")
  return read_json_object(os.path.join(directory, "config.json"), DataError)
