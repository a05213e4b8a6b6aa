"""Build a model from its config; `from_pretrained` / `save_pretrained` for directories.

An architecture with a Hugging Face family (`jaxlm/hf/`) is saved and loaded in HF
format, so transformers reads what we write. Anything else is a jaxlm export:
`config.json` (ModelConfig) plus `model.safetensors` named by module path
("bert.layers.0.attn.q.kernel").
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, DataError
from jaxlm.models import decoder, encoder, encoder_decoder

WEIGHTS_NAME = "model.safetensors"

# Architecture names are Hugging Face class names; each module lists its own.
ARCHITECTURES = {**encoder.ARCHITECTURES, **decoder.ARCHITECTURES, **encoder_decoder.ARCHITECTURES}


def build_model(cfg: ModelConfig, *, seed: int = 0) -> nnx.Module:
  arch = (cfg.architectures or ["BertForPreTraining"])[0]
  if arch not in ARCHITECTURES:
    raise ConfigError(f"model.architectures: unknown architecture {arch!r}; "
                      f"known: {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[arch](cfg, rngs=nnx.Rngs(params=seed))


def build_abstract_model(cfg: ModelConfig) -> nnx.Module:
  """The model with shape-only parameters: no random init for weights about to be loaded."""
  return nnx.eval_shape(lambda: build_model(cfg))


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  state = nnx.state(model, nnx.Param)
  return {".".join(str(k) for k in path): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(state)}


def _hf_family(arch: str | None):
  from jaxlm.hf import FAMILIES
  from jaxlm.hf.convert import _discover
  _discover()
  return FAMILIES.get(arch)


def _hf_expressible(cfg: ModelConfig):
  """The HF family that can write this config, or None (then we write a jaxlm export)."""
  arch = (cfg.architectures or [None])[0]
  fam = _hf_family(arch)
  if fam is None:
    return None
  try:
    fam.config_to_hf(cfg, arch)
  except ConfigError:  # e.g. a BERT with rotary positions: transformers' BertModel has none
    return None
  return fam


def save_pretrained(model: nnx.Module, directory: str) -> str:
  """Writes HF format where transformers can express the model, else a jaxlm export;
  returns which ("hf" or "jaxlm")."""
  if _hf_expressible(model.config) is not None:
    from jaxlm.hf import convert
    convert.save(model, directory)
    return "hf"
  os.makedirs(directory, exist_ok=True)
  model.config.save_pretrained(directory)
  save_file(flat_params(model), os.path.join(directory, WEIGHTS_NAME))
  return "jaxlm"


def load_params(model: nnx.Module, tensors: dict[str, np.ndarray], source: str) -> nnx.Module:
  """Copies tensors into the model by path; names the tensor on any mismatch."""
  state = nnx.state(model, nnx.Param)
  expected = dict(nnx.to_flat_state(state))
  for path, var in expected.items():
    name = ".".join(str(k) for k in path)
    if name not in tensors:
      raise DataError(f"{source}: missing tensor {name!r}")
    value = tensors[name]
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise DataError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                      f"expected {tuple(var.get_value().shape)}")
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
  names = {".".join(str(k) for k in p) for p in expected}
  extra = sorted(set(tensors) - names)
  if extra:
    raise DataError(f"{source}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
  nnx.update(model, state)
  return model


def from_pretrained(directory: str) -> nnx.Module:
  """Loads a Hugging Face model directory or a jaxlm export."""
  from jaxlm.hf.convert import read_hf_config
  from jaxlm.hf.io import check_weights
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such model directory")
  check_weights(directory)
  raw = read_hf_config(directory)
  arch = (raw.get("architectures") or [None])[0]
  # Only ModelConfig.to_dict writes these keys (attention_backend: older exports).
  native = "attention_impl" in raw or "attention_backend" in raw
  if not native and _hf_family(arch) is not None:
    from jaxlm.hf import convert
    return convert.load(directory)
  if arch is not None and arch not in ARCHITECTURES:
    raise DataError(f"{directory}/config.json: unknown architecture {arch!r}; supported: "
                    f"{sorted(ARCHITECTURES)}")
  cfg = ModelConfig.from_pretrained(directory)
  path = os.path.join(directory, WEIGHTS_NAME)
  return load_params(build_abstract_model(cfg), load_file(path), path)
