"""`load` / `save` of Hugging Face model directories, dispatching on the HF class name."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil

import jaxlm.hf
from jaxlm.errors import DataError
from jaxlm.hf import FAMILIES, Family
from jaxlm.hf.io import read_tensors, write_tensors

_NOT_FAMILIES = {"common", "convert", "io"}


def _discover() -> None:
  """Imports every family module in jaxlm/hf; each registers itself."""
  for info in pkgutil.iter_modules(jaxlm.hf.__path__):
    if info.name not in _NOT_FAMILIES:
      importlib.import_module(f"jaxlm.hf.{info.name}")


def family_of(arch: str, source: str) -> Family:
  _discover()
  if arch not in FAMILIES:
    raise DataError(f"{source}: unknown architecture {arch!r}; supported: {sorted(FAMILIES)}")
  return FAMILIES[arch]


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(f"{directory}: no config.json") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None


def load(directory: str):
  """Builds the jaxlm model for an HF directory (config.json + safetensors)."""
  from jaxlm.models.auto import build_abstract_model, load_params
  hf_cfg = read_hf_config(directory)
  archs = hf_cfg.get("architectures") or []
  if not archs:
    raise DataError(f"{directory}/config.json: no 'architectures' entry to pick a model class")
  fam = family_of(archs[0], f"{directory}/config.json")
  cfg = fam.config_from_hf(hf_cfg).replace(architectures=[archs[0]])
  tensors = fam.params_from_hf(read_tensors(directory), cfg, archs[0])
  return load_params(build_abstract_model(cfg), tensors, directory)


def save(model, directory: str) -> None:
  """Writes config.json + model.safetensors that transformers loads."""
  from jaxlm.models.auto import flat_params
  cfg = model.config
  arch = (cfg.architectures or [""])[0]
  fam = family_of(arch, "save_pretrained")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(fam.config_to_hf(cfg, arch), f, indent=2, sort_keys=True)
  write_tensors(fam.params_to_hf(flat_params(model), cfg, arch), directory)
