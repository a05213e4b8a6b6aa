"""From next-token logits to a token: Hugging Face's logits processors and warpers, in
Hugging Face's order, as pure functions of [B, V] arrays (traced inside the decode loop).

  repetition penalty -> (sampling only) temperature -> top-k -> top-p -> min-p -> draw

Greedy decoding (temperature 0) applies the repetition penalty and takes the argmax (the
first of equal maxima, as torch does).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The sampling settings (hashable: a static argument of the compiled loop)."""

  temperature: float = 0.0  # 0: greedy
  top_k: int | None = None
  top_p: float | None = None
  min_p: float | None = None
  repetition_penalty: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ConfigError(f"generate.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ConfigError(f"generate.top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}")
    if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
      raise ConfigError(f"generate.min_p must be in [0, 1], got {self.min_p}")
    if self.repetition_penalty is not None and self.repetition_penalty <= 0:
      raise ConfigError(f"generate.repetition_penalty must be positive, got "
                        f"{self.repetition_penalty}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def repetition_penalty(logits_BV, seen_BV, penalty: float):
  """CTRL's penalty on tokens already in the sequence: positive logits divided by it,
  negative ones multiplied (HF RepetitionPenaltyLogitsProcessor)."""
  penalized = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
  return jnp.where(seen_BV, penalized, logits_BV)


def top_k(logits_BV, k):
  """Keeps the k largest logits (and any tied with the k-th); k: an int, or one per row
  ([B] int array, 0 = keep all)."""
  if isinstance(k, int):
    k = min(k, logits_BV.shape[-1])
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  else:
    V = logits_BV.shape[-1]
    k_B1 = jnp.where((k <= 0) | (k > V), V, k)[:, None]
    kth_B1 = jnp.take_along_axis(-jnp.sort(-logits_BV, axis=-1), k_B1 - 1, axis=-1)
  return jnp.where(logits_BV < kth_B1, NEG_INF, logits_BV)


def top_p(logits_BV, p):
  """Nucleus (p: a float, or [B, 1] per row): keeps the most likely tokens whose probabilities sum to at least p (HF:
  drops, in ascending order, those whose cumulative probability stays <= 1 - p; the most
  likely token always stays)."""
  order_BV = jnp.argsort(logits_BV, axis=-1)  # ascending
  sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
  cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
  drop_sorted_BV = (cum_BV <= 1.0 - p).at[..., -1].set(False)
  drop_BV = jnp.zeros_like(drop_sorted_BV).at[
      jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(drop_sorted_BV)
  return jnp.where(drop_BV, NEG_INF, logits_BV)


def min_p(logits_BV, p: float):
  """Drops tokens less likely than p times the most likely one (the top one stays)."""
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  keep_BV = probs_BV >= p * probs_BV.max(-1, keepdims=True)
  return jnp.where(keep_BV, logits_BV, NEG_INF)


def process(logits_BV, seen_BV, s: Sampling):
  """The filtered logits a token is drawn from (float32, -inf where filtered out)."""
  x = logits_BV.astype(jnp.float32)
  if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
    x = repetition_penalty(x, seen_BV, s.repetition_penalty)
  if s.greedy:
    return x
  if s.temperature != 1.0:
    x = x / s.temperature
  if s.top_k is not None:
    x = top_k(x, s.top_k)
  if s.top_p is not None and s.top_p < 1.0:
    x = top_p(x, s.top_p)
  if s.min_p is not None and s.min_p > 0.0:
    x = min_p(x, s.min_p)
  return x


def choose(logits_BV, seen_BV, key, s: Sampling):
  """(token [B], its log-probability under the distribution it was drawn from [B])."""
  x = process(logits_BV, seen_BV, s)
  token_B = jnp.argmax(x, -1) if s.greedy else jax.random.categorical(key, x, axis=-1)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(x, -1), token_B[:, None], -1)[:, 0]
  return token_B.astype(jnp.int32), logp_B


def choose_rows(logits_BV, key_B, temperature_B, top_k_B, top_p_B):
  """`choose` with settings per row, as arrays (a serving batch mixes requests): row b is
  greedy where temperature_B[b] == 0, else drawn with its own key after temperature,
  top-k (0 = off) and top-p (1 = off). A row's token equals what `choose` gives it alone
  with the same key. Returns (token [B], the model's own log-softmax [B, V])."""
  x = logits_BV.astype(jnp.float32)
  greedy_B = temperature_B == 0.0
  argmax_B = jnp.argmax(x, -1).astype(jnp.int32)

  def draw(_):  # sorting [B, V] costs ~40 ms on a CPU at V=8k: only when a row filters
    y = x / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    filters = jnp.any(~greedy_B & ((top_k_B > 0) | (top_p_B < 1.0)))
    y = jax.lax.cond(filters, lambda y: top_p(top_k(y, top_k_B), top_p_B[:, None]),
                     lambda y: y, y)
    drawn_B = jax.vmap(lambda k, row: jax.random.categorical(k, row[None])[0])(key_B, y)
    return jnp.where(greedy_B, argmax_B, drawn_B).astype(jnp.int32)

  token_B = jax.lax.cond(jnp.all(greedy_B), lambda _: argmax_B, draw, None)
  return token_B, jax.nn.log_softmax(x, -1)
