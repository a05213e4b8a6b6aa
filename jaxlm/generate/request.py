"""A generation request checked against the model and laid out for the compiled loops
(decode.py and speculative.py): left-padded to a prompt-length bucket, eos and pad ids
resolved from the arguments or the model's config."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxlm.errors import ConfigError

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(n: int) -> int:
  """The padded prompt length for an n-token prompt."""
  return next((b for b in BUCKETS if b >= n), -(-n // 1024) * 1024)


def _seq2seq(model) -> bool:
  return hasattr(model, "encode") and hasattr(model, "decode")


def check_model(model) -> None:
  if not hasattr(model, "init_cache"):
    raise ConfigError(f"{type(model).__name__} has no LM head to generate with: generation "
                      "needs a decoder-only (causal LM) or encoder-decoder model")


def longrope_switch(cfg) -> int | None:
  """The length past which a longrope model (Phi-3) rotates with its long factors, or None.
  Each forward call picks one set, by its largest position (as transformers does), so a
  KV cache written before the switch holds keys rotated the short way."""
  scaling = cfg.rope_scaling or {}
  if cfg.position_embedding_type != "rope" or scaling.get("rope_type") != "longrope":
    return None
  return scaling["original_max_position_embeddings"]


def switch_step(cfg, prompt_len: int, max_new_tokens: int, *, recompute: bool) -> int | None:
  """The decode step (tokens generated so far) whose input first sits past a longrope
  switch, if the generation crosses it: the prefill is at most the switch length and the
  last step's input (at prompt + new - 2) past it. transformers' Phi-3 drops its cache
  there and recomputes the whole sequence with the long factors; `recompute` says the
  caller does the same (jaxlm.generate), else such a request is refused."""
  switch = longrope_switch(cfg)
  if switch is None or not prompt_len <= switch < prompt_len + max_new_tokens - 1:
    return None
  if not recompute:
    raise ConfigError(
        f"a {prompt_len}-token prompt with max_new_tokens={max_new_tokens} crosses "
        f"rope_scaling.original_max_position_embeddings={switch}, where longrope switches "
        "to its long factors and the cache must be recomputed (jaxlm.generate does; this "
        f"path does not): generate at most {switch + 1 - prompt_len} tokens here")
  return switch - prompt_len + 1


class Prepared(NamedTuple):
  ids_BP: np.ndarray  # left-padded (right-padded for an encoder) to a bucket
  mask_BP: np.ndarray
  eos_E: np.ndarray
  pad: int
  start_id: int | None
  switch_step: int | None = None  # recompute the cache at this decode step (longrope)


def _ids_list(x) -> list[int]:
  if x is None:
    return []
  return [int(i) for i in (x if isinstance(x, (list, tuple, np.ndarray)) else [x])]


def prepare(model, input_ids, attention_mask=None, *, max_new_tokens: int,
            eos_token_id=None, pad_token_id=None, recompute_switch: bool = False) -> Prepared:
  """Checks the request against the model and lays the batch out for the compiled loop.
  `recompute_switch`: the caller recomputes the cache at a longrope switch (switch_step)."""
  check_model(model)
  cfg = model.config
  ids = np.asarray(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ConfigError(f"input_ids must be [batch, length] token ids, got shape {ids.shape}")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ConfigError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  lengths = mask.sum(1)
  limit = cfg.max_position_embeddings
  if lengths.max() > limit:
    raise ConfigError(f"a prompt of {int(lengths.max())} tokens is longer than the model's "
                      f"context (max_position_embeddings={limit})")
  if not _seq2seq(model) and lengths.max() + max_new_tokens > limit:
    raise ConfigError(f"max_new_tokens={max_new_tokens} after a {int(lengths.max())}-token "
                      f"prompt runs past max_position_embeddings={limit}")
  switch = None if _seq2seq(model) else switch_step(cfg, int(lengths.max()), max_new_tokens,
                                                    recompute=recompute_switch)
  eos = _ids_list(cfg.eos_token_id if eos_token_id is None else eos_token_id)
  pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
  pad = int(pad if pad is not None else (eos[0] if eos else 0))
  P = bucket(int(lengths.max()))
  out_ids = np.full((ids.shape[0], P), pad, np.int32)
  out_mask = np.zeros((ids.shape[0], P), np.int32)
  for b in range(ids.shape[0]):  # each row's real tokens, in order, at its right end
    real = ids[b][mask[b] > 0]
    if _seq2seq(model):
      out_ids[b, :len(real)], out_mask[b, :len(real)] = real, 1
    elif len(real):
      out_ids[b, P - len(real):], out_mask[b, P - len(real):] = real, 1
  start = cfg.decoder_start_token_id if _seq2seq(model) else None
  # -1 never matches a token: a fixed-size eos array without any eos id.
  return Prepared(out_ids, out_mask, np.asarray(eos or [-1], np.int32), pad, start, switch)
