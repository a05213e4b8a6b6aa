"""Reading and writing safetensors checkpoints (single file or sharded index). Pickle
checkpoints are refused: unpickling runs arbitrary code."""

from __future__ import annotations

import json
import os

from safetensors.numpy import load_file, save_file

from jaxlm.errors import DataError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
            "flax_model.msgpack")


def check_weights(directory: str) -> None:
  """Fails early, before any config parsing, on a directory without safetensors."""
  if os.path.exists(os.path.join(directory, SINGLE)) or os.path.exists(
      os.path.join(directory, INDEX)):
    return
  for name in _PICKLES:
    if os.path.exists(os.path.join(directory, name)):
      raise DataError(
          f"{directory}: only {name} found, and jaxlm never unpickles checkpoints (it can run "
          "arbitrary code). Convert it once with transformers: AutoModel.from_pretrained(dir)"
          ".save_pretrained(out_dir) writes model.safetensors")
  raise DataError(f"{directory}: no {SINGLE} or {INDEX}")


def load_safetensors(path: str) -> dict:
  """One safetensors file; a truncated or garbled file, or a dtype NumPy cannot hold, is
  a one-line DataError naming it."""
  try:
    return load_file(path)
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
    msg = " ".join(str(e).split())
    raise DataError(f"{path}: not a readable safetensors file ({msg[:200]})") from None


def read_tensors(directory: str) -> dict:
  """All tensors of a checkpoint directory as NumPy arrays (memory-mapped reads)."""
  check_weights(directory)
  single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
  if os.path.exists(single):
    return load_safetensors(single)
  try:
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise DataError(f"{index}: not a safetensors index ({e})") from None
  out = {}
  for shard in sorted(set(weight_map.values())):
    path = os.path.join(directory, shard)
    if not os.path.exists(path):
      raise DataError(f"{index}: shard {shard!r} is missing")
    out.update(load_safetensors(path))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise DataError(f"{index}: tensor {missing[0]!r} is listed but not in any shard")
  return out


def write_tensors(tensors: dict, directory: str) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, SINGLE)
  save_file({k: v for k, v in tensors.items()}, path, metadata={"format": "pt"})
  return path
