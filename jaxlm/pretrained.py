"""`from_pretrained` / `save_pretrained`: model directories in and out.

This module sits above both `jaxlm.models` (which builds models and knows nothing of
checkpoints) and `jaxlm.hf` (which maps Hugging Face names and configs and builds
nothing), and is the one place that dispatches between them:

- an architecture whose Hugging Face class can express the config is saved and loaded
  in HF format (config.json + model.safetensors that transformers reads);
- anything else (e.g. a BERT with rotary positions) is a jaxlm export: config.json (a
  ModelConfig, marked with `jaxlm_export`) plus model.safetensors named by module path
  ("bert.layers.0.attn.q.kernel").

How a model runs (compute dtype, attention backend, remat) is never saved: the caller
picks it (`Runtime`).

A quantized model (jaxlm.quantize) is always a jaxlm export: model.safetensors holds the
packed codes and scales by module path ("model.layers.0.attn.q.qweight", "...scales"),
and config.json a `quantization_config` ({"quant_method": "jaxlm", "mode": "int4", ...});
loading builds the float model shape-only, applies the same swap, and fills it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from flax import nnx
from safetensors.numpy import save_file

from jaxlm import hf
from jaxlm.config import EXPORT_MARKER, ModelConfig, Runtime
from jaxlm.errors import ConfigError, DataError
from jaxlm.hf.io import check_weights, load_safetensors, read_tensors, write_tensors
from jaxlm.models import auto, base
from jaxlm.params import flat_params, load_params, param_shapes

WEIGHTS_NAME = "model.safetensors"
QUANT_KEY = "quantization_config"


def _hf_family(cfg: ModelConfig) -> hf.Family | None:
  """The HF family that can write this config, or None (then we write a jaxlm export)."""
  arch = (cfg.architectures or [None])[0]
  fam = hf.FAMILIES.get(arch)
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
  cfg = model.config
  quant = getattr(model, "quantization", None)  # compress.quantize.QuantConfig
  fam = _hf_family(cfg) if quant is None else None
  os.makedirs(directory, exist_ok=True)
  if quant is not None:
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
      f.write(json.dumps({**cfg.to_dict(), EXPORT_MARKER: 1, QUANT_KEY: quant.to_json()},
                         indent=2, sort_keys=True) + "\n")
    save_file(flat_params(model), os.path.join(directory, WEIGHTS_NAME),
              metadata={"format": "jaxlm"})
    return "jaxlm"
  if fam is not None:
    arch = cfg.architectures[0]
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
      json.dump(fam.config_to_hf(cfg, arch), f, indent=2, sort_keys=True)
    write_tensors(fam.params_to_hf(flat_params(model), cfg, arch), directory)
    return "hf"
  cfg.save_pretrained(directory)
  save_file(flat_params(model), os.path.join(directory, WEIGHTS_NAME))
  return "jaxlm"


# models/ cannot import this module (it imports models/): model.save_pretrained(dir)
# reaches it through this hook, set whenever jaxlm is imported.
base.PreTrainedModel.saver = staticmethod(save_pretrained)


def resolve_dir(path: str) -> str:
  """A jaxlm workdir's exported model (PATH/model), or PATH itself."""
  inner = os.path.join(path, "model")
  return inner if os.path.isfile(os.path.join(inner, "config.json")) else path


def is_export(raw: dict) -> bool:
  """Whether a config.json dict is a jaxlm export (new marker, or the runtime keys that
  exports carried before it)."""
  return EXPORT_MARKER in raw or bool({"attention_impl", "attention_backend"} & set(raw))


def load_config(directory: str) -> tuple[ModelConfig, hf.Family | None]:
  """(the directory's ModelConfig, its HF family or None for a jaxlm export)."""
  raw = hf.read_hf_config(directory)
  raw.pop(QUANT_KEY, None)  # read_quantization's; checked there
  arch = (raw.get("architectures") or [None])[0]
  if not is_export(raw):
    if arch is None:
      raise DataError(f"{directory}/config.json: no 'architectures' entry to pick a model class")
    fam = hf.family_of(arch, f"{directory}/config.json")
    try:
      return fam.config_from_hf(raw).replace(architectures=[arch]), fam
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
      raise ConfigError(f"{directory}/config.json: a field has the wrong type or value "
                        f"({type(e).__name__}: {e})") from None
  if arch is not None and arch not in auto.ARCHITECTURES:
    raise DataError(f"{directory}/config.json: unknown architecture {arch!r}; supported: "
                    f"{sorted(auto.ARCHITECTURES)}")
  # Old exports also carry how they ran (LEGACY_RUNTIME_KEYS): from_dict drops it, and
  # the caller's Runtime decides.
  try:
    return ModelConfig.from_dict(raw, hf=True), None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{directory}/config.json: a field has the wrong type or value "
                      f"({type(e).__name__}: {e})") from None


def read_quantization(directory: str):
  """The QuantConfig in `directory`/config.json (compress.quantize), or None for a float
  model; a quantization_config jaxlm did not write (GPTQ, AWQ, ...) is a DataError."""
  raw = hf.read_hf_config(directory)
  if QUANT_KEY not in raw:
    return None
  from jaxlm.compress.quantize import QuantConfig
  return QuantConfig.from_json(raw[QUANT_KEY], f"{directory}/config.json")


def from_pretrained(directory: str, *, dtype: str | None = None,
                    attention_impl: str | None = None, remat: str | None = None,
                    runtime: Runtime | None = None) -> nnx.Module:
  """Loads a Hugging Face model directory or a jaxlm export.

  `dtype` (compute dtype), `attention_impl` and `remat` choose how the model runs
  (defaults: float32, "xla", "none"); parameters keep the checkpoint's dtype.
  """
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such model directory")
  check_weights(directory)
  runtime = (runtime or Runtime()).replace(dtype=dtype, attention_impl=attention_impl,
                                           remat=remat)
  cfg, fam = load_config(directory)
  quant = read_quantization(directory)
  if quant is not None:
    from jaxlm.compress.quantize import quantize  # compress imports models
    model = nnx.eval_shape(lambda: quantize(auto.build_model(cfg, runtime=runtime),
                                            **dataclasses.asdict(quant)))
    path = os.path.join(directory, WEIGHTS_NAME)
    return load_params(model, load_safetensors(path), path)
  model = auto.build_abstract_model(cfg, runtime=runtime)
  if fam is None:
    path = os.path.join(directory, WEIGHTS_NAME)
    return load_params(model, load_safetensors(path), path)
  arch = cfg.architectures[0]
  shapes = param_shapes(model)
  tensors = fam.params_from_hf(read_tensors(directory), cfg, arch, shapes)
  fresh = sorted(set(shapes) - set(tensors))  # optional tensors the file lacks (a pooler)
  if fresh:
    init = flat_params(auto.build_model(cfg, runtime=runtime))
    tensors = {**tensors, **{k: init[k] for k in fresh}}
    print(f"warning: {directory}: {', '.join(fresh)} not in the checkpoint; newly "
          f"initialized (as transformers does for {arch})", file=sys.stderr)
  return load_params(model, tensors, directory)
