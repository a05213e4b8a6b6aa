"""What the benchmark scripts share: synthetic training batches and writing their JSON
where it was asked for."""

import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jaxlm_cli(args: list[str], log: str) -> float:
  """Runs `python -m jaxlm.main ARGS` from the repository root (output to `log`); exits
  naming the log if it fails; returns its wall seconds."""
  t0 = time.perf_counter()
  with open(log, "w", encoding="utf-8") as f:
    proc = subprocess.run([sys.executable, "-m", "jaxlm.main", *args], cwd=ROOT, stdout=f,
                          stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    sys.exit(f"python -m jaxlm.main {' '.join(args)} failed; see {log}")
  return round(time.perf_counter() - t0, 1)


def write_json(text: str, *paths: str | None, out_name: str | None = None) -> list[str]:
  """Writes `text` to each given path and, when the environment sets OUT (the device
  runner's output folder), to $OUT/out_name; returns the paths written."""
  targets = [p for p in paths if p]
  if out_name and os.environ.get("OUT"):
    targets.append(os.path.join(os.environ["OUT"], out_name))
  for path in targets:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return targets


# ---- synthetic batches (jaxlm's batch formats) ---------------------------------------
def max_predictions(T: int, mask_prob: float = 0.15) -> int:
  """Masked positions per row (= jaxlm.data.objectives.max_predictions; no jaxlm import
  here, so the torch side needs no jax)."""
  return max(1, math.ceil(mask_prob * T))


def bert_batch(rng, B, T, V):
  P = max_predictions(T, 0.15)
  # distinct sorted positions per row (1..T-1), as the real masker produces
  pos = np.stack([np.sort(rng.choice(np.arange(1, T), P, replace=False)) for _ in range(B)])
  return {"input_ids": rng.integers(5, V, (B, T)).astype(np.int32),
          "token_type_ids": (np.arange(T) >= T // 2).astype(np.int32)[None].repeat(B, 0),
          "attention_mask": np.ones((B, T), np.int32),
          "masked_positions": pos.astype(np.int32),
          "masked_ids": rng.integers(5, V, (B, P)).astype(np.int32),
          "masked_weights": np.ones((B, P), np.float32),
          "nsp_label": rng.integers(0, 2, (B,)).astype(np.int32),
          "nsp_weight": np.ones((B,), np.float32)}


def causal_batch(rng, B, T, V):
  ids = rng.integers(5, V, (B, T + 1)).astype(np.int32)
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
          "attention_mask": np.ones((B, T), np.int32), "segment_ids": np.ones((B, T), np.int32),
          "position_ids": np.tile(np.arange(T), (B, 1)).astype(np.int32),
          "loss_weights": np.ones((B, T), np.float32)}
