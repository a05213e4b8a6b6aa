"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes k tokens one at a time, the target scores all of them in one forward pass, and
the longest acceptable prefix is kept, plus one token from the target.

  generate(target, ids, max_new_tokens=64, draft_model=student, num_draft_tokens=4)

Greedy (temperature 0): a draft token is accepted while it equals the target's argmax, so
the output is the target's own greedy output. Sampling: draft token d, drawn from the
draft's distribution q, is accepted with probability min(1, p(d) / q(d)); at the first
rejection the token is drawn from norm(max(0, p - q)), and when all k pass, from the
target's next distribution: the output is distributed as the target's. Both p and q are
the filtered distributions (temperature, top-k, top-p, min-p) that `generate` samples.

Layout of one round, per row, with t the last token chosen (not yet in either cache) at
position L:
  draft   feeds t, d1, .., dk one at a time (k + 1 steps; the last only caches dk)
  target  feeds [t, d1, .., dk] in one pass: next-token distributions at L .. L + k
  keep    t, d1 .. dn in both caches (n accepted); the other columns are rolled back
Columns are shared by the rows of a batch (layers/kv_cache.py), so a row that kept fewer
than the batch's most leaves empty slots (position -1, invisible to attention) rather
than moving its neighbours; a batch of one never leaves any. Caches are sized for that,
and a sliding-window cache gets slack, so a rolled-back column never evicts one that a
later query still sees.

The prompt's last token plays t for the first round, so every new token, the first
included, comes out of the accept/reject rule.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.generate.request import _seq2seq, check_model, prepare
from jaxlm.generate.sampling import Sampling, process
from jaxlm.layers.kv_cache import KVCache


class SpecState(NamedTuple):
  """The speculative loop's carry."""

  round: jax.Array  # [] rounds so far
  token_B: jax.Array  # last chosen token, not yet in the caches
  lengths_B: jax.Array  # its position
  cache_t: list  # target's KV cache
  cache_d: list  # draft's KV cache
  n_out_B: jax.Array  # tokens emitted so far
  done_B: jax.Array  # row has emitted eos
  out_BN: jax.Array  # [B, N + k + 1]: emitted tokens (pad after eos); N kept at the end
  accepted: jax.Array  # [] draft tokens accepted, summed over active rows and rounds
  row_rounds: jax.Array  # [] active (row, round) pairs


def check_draft(target, draft, num_draft_tokens: int, s: Sampling) -> None:
  """One-line errors for a draft that cannot serve this target."""
  check_model(draft)
  if _seq2seq(target) or _seq2seq(draft):
    raise ConfigError("draft_model: speculative decoding needs decoder-only target and draft "
                      "models (an encoder-decoder was given)")
  vt, vd = target.config.vocab_size, draft.config.vocab_size
  if vt != vd:
    raise ConfigError(f"draft_model: its vocab_size {vd} differs from the target's {vt}; the "
                      "draft must share the target's tokenizer")
  if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or (
      num_draft_tokens < 1):
    raise ConfigError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")
  if s.repetition_penalty not in (None, 1.0):
    raise ConfigError("repetition_penalty is not supported with draft_model (the penalty "
                      "would change inside a round)")


def cache_length(batch: int, prompt: int, max_new_tokens: int, k: int) -> int:
  """Columns the caches need: a batch of one rolls back exactly; a larger batch may leave
  up to k empty slots a round."""
  if batch == 1:
    return prompt + max_new_tokens + 2 * (k + 1)
  return prompt + (max_new_tokens + 2) * (k + 1)


def window_slack(batch: int, window: int | None, k: int) -> int:
  """Extra slots for a sliding-window cache: k + 1 for one row; with empty slots a
  window's worth of positions can span (window + 2) * (k + 1) columns."""
  if window is None:
    return 0
  return k + 1 if batch == 1 else (window + 2) * (k + 1) - window


def rollback(cache, keep_B, k: int):
  """Of the k + 1 columns just written, keeps each row's first keep_B; the rest become
  empty slots, and the write index returns to just past the longest kept run."""
  def fix(c: KVCache) -> KVCache:
    start = c.index - (k + 1)
    j = jnp.arange(k + 1)
    slots_J = (start + j) % c.size
    drop_BJ = j[None] >= keep_B[:, None]
    pos = c.pos.at[:, slots_J].set(jnp.where(drop_BJ, -1, c.pos[:, slots_J]))
    return c.replace(pos=pos, index=start + keep_B.max())
  return jax.tree.map(fix, cache, is_leaf=lambda x: isinstance(x, KVCache))


def _forward(model, ids_BT, pos_BT, cache):
  out = model(ids_BT, jnp.ones_like(ids_BT), position_ids=pos_BT, cache=cache)
  return out.logits.astype(jnp.float32), out.cache


def propose(draft, st: SpecState, key, s: Sampling, k: int):
  """k draft tokens [B, k] and the filtered logits each was drawn from [B, k, V]; k + 1
  steps, the last one only to put dk in the draft's cache."""
  def step(carry, i):
    token_B, cache = carry
    logits_B1V, cache = _forward(draft, token_B[:, None], (st.lengths_B + i)[:, None], cache)
    x_BV = process(logits_B1V[:, 0], None, s)
    nxt_B = (jnp.argmax(x_BV, -1) if s.greedy
             else jax.random.categorical(jax.random.fold_in(key, i), x_BV, axis=-1))
    return (nxt_B.astype(jnp.int32), cache), (nxt_B.astype(jnp.int32), x_BV)

  (_, cache_d), (d_JB, x_JBV) = jax.lax.scan(step, (st.token_B, st.cache_d),
                                             jnp.arange(k + 1))
  return d_JB[:k].T, jnp.moveaxis(x_JBV[:k], 0, 1), cache_d


def verify(p_x_BJV, d_BK, q_x_BKV, key, s: Sampling):
  """(accepted count n [B], emitted tokens [B, k + 1] of which the first n + 1 count).

  p_x: the target's filtered logits at the k + 1 positions; q_x: the draft's at the k
  drafted ones."""
  B, K = d_BK.shape
  if s.greedy:
    tgt_BJ = jnp.argmax(p_x_BJV, -1).astype(jnp.int32)
    n_B = jnp.cumprod(d_BK == tgt_BJ[:, :K], axis=1).sum(1)
    return n_B, tgt_BJ  # accepted draft tokens equal the target's: tgt holds them all
  k_acc, k_res = jax.random.split(key)
  p_BJV = jax.nn.softmax(p_x_BJV, -1)
  q_BKV = jax.nn.softmax(q_x_BKV, -1)
  pick = lambda a_BKV: jnp.take_along_axis(a_BKV, d_BK[..., None], -1)[..., 0]
  p_d_BK, q_d_BK = pick(p_BJV[:, :K]), pick(q_BKV)
  u_BK = jax.random.uniform(k_acc, (B, K))
  ok_BK = u_BK * q_d_BK < p_d_BK  # u < p / q, without dividing by a zero q
  n_B = jnp.cumprod(ok_BK, axis=1).sum(1)
  # The token at position n: the residual max(0, p - q) after a rejection; p after k passes.
  q_pad_BJV = jnp.concatenate([q_BKV, jnp.zeros_like(p_BJV[:, :1])], axis=1)
  res_BV = jnp.take_along_axis(jnp.maximum(p_BJV - q_pad_BJV, 0.0), n_B[:, None, None],
                               1)[:, 0]
  p_n_BV = jnp.take_along_axis(p_BJV, n_B[:, None, None], 1)[:, 0]
  res_BV = jnp.where(res_BV.sum(-1, keepdims=True) > 0, res_BV, p_n_BV)  # p == q: draw p
  last_B = jax.random.categorical(k_res, jnp.log(res_BV), axis=-1).astype(jnp.int32)
  j = jnp.arange(K + 1)
  d_pad_BJ = jnp.concatenate([d_BK, jnp.zeros((B, 1), jnp.int32)], 1)
  return n_B, jnp.where(j[None] < n_B[:, None], d_pad_BJ, last_B[:, None])


def spec_round(target, draft, st: SpecState, key, eos_E, pad, *, s: Sampling, k: int,
               max_new_tokens: int) -> SpecState:
  key = jax.random.fold_in(key, st.round)
  k_draft, k_verify = jax.random.split(key)
  d_BK, q_x_BKV, cache_d = propose(draft, st, k_draft, s, k)
  ids_BJ = jnp.concatenate([st.token_B[:, None], d_BK], axis=1)
  pos_BJ = st.lengths_B[:, None] + jnp.arange(k + 1)
  logits_BJV, cache_t = _forward(target, ids_BJ, pos_BJ, st.cache_t)
  B, J, V = logits_BJV.shape
  p_x_BJV = process(logits_BJV.reshape(B * J, V), None, s).reshape(B, J, V)
  n_B, e_BJ = verify(p_x_BJV, d_BK, q_x_BKV, k_verify, s)

  active_B = ~st.done_B & (st.n_out_B < max_new_tokens)
  j = jnp.arange(J)
  is_eos_BJ = jnp.isin(e_BJ, eos_E)
  after_eos_BJ = jnp.cumsum(is_eos_BJ, axis=1) - is_eos_BJ > 0
  write_BJ = (j[None] <= n_B[:, None]) & ~after_eos_BJ & active_B[:, None]
  N = st.out_BN.shape[1]
  cols_BJ = jnp.where(write_BJ, st.n_out_B[:, None] + j[None], N)  # N: dropped
  out_BN = st.out_BN.at[jnp.arange(B)[:, None], cols_BJ].set(e_BJ, mode="drop")
  emitted_B = write_BJ.sum(1)
  keep_B = jnp.where(active_B, n_B + 1, 1)
  return SpecState(
      round=st.round + 1,
      token_B=jnp.take_along_axis(e_BJ, n_B[:, None], 1)[:, 0],
      lengths_B=st.lengths_B + keep_B,
      cache_t=rollback(cache_t, keep_B, k), cache_d=rollback(cache_d, keep_B, k),
      n_out_B=st.n_out_B + emitted_B,
      done_B=st.done_B | (is_eos_BJ & write_BJ).any(1),
      out_BN=out_BN,
      accepted=st.accepted + jnp.where(active_B, n_B, 0).sum(),
      row_rounds=st.row_rounds + active_B.sum())


def _run(graph_t, params_t, graph_d, params_d, ids_BP, mask_BP, key, eos_E, pad, *,
         max_new_tokens: int, k: int, s: Sampling):
  target, draft = nnx.merge(graph_t, params_t), nnx.merge(graph_d, params_d)
  B, P = ids_BP.shape
  size = cache_length(B, P, max_new_tokens, k)
  ctx_BC, mask_BC = ids_BP[:, :-1], mask_BP[:, :-1]
  pos_BC = jnp.maximum(jnp.cumsum(mask_BC, axis=1) - 1, 0)

  def prefilled(model):
    cache = model.init_cache(B, size, window_slack=window_slack(B, model.config.sliding_window,
                                                                k))
    return model(ctx_BC, mask_BC, position_ids=pos_BC, cache=cache).cache

  st = SpecState(jnp.zeros((), jnp.int32), ids_BP[:, -1].astype(jnp.int32),
                 mask_BC.sum(1).astype(jnp.int32), prefilled(target), prefilled(draft),
                 jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool),
                 jnp.full((B, max_new_tokens + k + 1), pad, jnp.int32),
                 jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  st = jax.lax.while_loop(
      lambda st: jnp.any(~st.done_B & (st.n_out_B < max_new_tokens)),
      lambda st: spec_round(target, draft, st, key, eos_E, pad, s=s, k=k,
                            max_new_tokens=max_new_tokens), st)
  return st.out_BN[:, :max_new_tokens], st.accepted, st.row_rounds, st.round


_compiled_run = jax.jit(_run, static_argnames=("graph_t", "graph_d", "max_new_tokens", "k",
                                               "s"))


def speculative_generate(model, draft_model, input_ids, *, max_new_tokens: int,
                         num_draft_tokens: int = 4, attention_mask=None, s: Sampling,
                         eos_token_id=None, pad_token_id=None, seed: int = 0,
                         return_stats: bool = False):
  """`generate` with a draft model (see the module docstring); same arguments and output.
  With `return_stats`, also {"rounds", "mean_accepted"}: target passes, and draft tokens
  accepted per active row and round."""
  check_draft(model, draft_model, num_draft_tokens, s)
  prep = prepare(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  if (np.asarray(prep.mask_BP).sum(1) == 0).any():
    raise ConfigError("input_ids: speculative decoding needs at least one real token in "
                      "every prompt row")
  graph_t, params_t = nnx.split(model)
  graph_d, params_d = nnx.split(draft_model)
  new_BN, accepted, row_rounds, rounds = _compiled_run(
      graph_t, params_t, graph_d, params_d, prep.ids_BP, prep.mask_BP, jax.random.key(seed),
      prep.eos_E, prep.pad, max_new_tokens=max_new_tokens, k=num_draft_tokens, s=s)
  head = np.asarray(input_ids).reshape(new_BN.shape[0], -1).astype(np.int32)
  tokens = np.concatenate([head, np.asarray(new_BN)], axis=1)
  if not return_stats:
    return tokens
  return tokens, {"rounds": int(rounds),
                  "mean_accepted": float(accepted) / max(int(row_rounds), 1)}
