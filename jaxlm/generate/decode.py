"""Text generation: one parallel prefill of the prompt into a KV cache, then one compiled
`lax.while_loop` of single-token decode steps that stops when every row has finished.

  generate(model, input_ids, max_new_tokens=32)          # greedy
  generate(model, input_ids, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1)

Batches are left-padded (a row's tokens sit at the right end; positions count from its
first real token), and the prompt is padded on to a length bucket, so prompts of
different lengths within a bucket reuse one compiled program. A row that emits an eos
token is padded after it. Draws use `fold_in(key(seed), step)`: reproducible, and no
host round trip inside the loop. `stream` runs the same prefill and step from Python,
yielding tokens as they come (for a terminal).

Decoder-only models and encoder-decoders (T5: the encoder runs once; every decoder
layer caches its cross-attention keys and values at the first step) share the loop. A
longrope model (Phi-3) whose generation crosses original_max_position_embeddings
recomputes its cache there, as transformers does (`recompute_step`); `stream` and
speculative decoding refuse such a request.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.generate.request import _seq2seq, prepare
from jaxlm.generate.sampling import Sampling, choose
from jaxlm.generate.speculative import speculative_generate

class State(NamedTuple):
  """The decode loop's carry."""

  step: jax.Array  # [] tokens generated so far
  token_B: jax.Array  # the last token of each row
  lengths_B: jax.Array  # real tokens so far = the next token's position
  cache: list
  done_B: jax.Array  # row has emitted eos
  seen_BV: jax.Array  # tokens in each row so far (repetition penalty); [B, 1] if unused
  out_BN: jax.Array  # generated tokens (pad after eos)
  logp_BN: jax.Array  # their log-probabilities


def _take(state: State, token_B, logp_B, eos_E, pad) -> State:
  """Records the chosen tokens (pad for finished rows) and who has finished."""
  token_B = jnp.where(state.done_B, pad, token_B)
  logp_B = jnp.where(state.done_B, 0.0, logp_B)
  seen = state.seen_BV
  if seen.shape[1] > 1:
    seen = seen.at[jnp.arange(seen.shape[0]), token_B].set(True)
  return state._replace(
      step=state.step + 1, token_B=token_B, done_B=state.done_B | jnp.isin(token_B, eos_E),
      seen_BV=seen, out_BN=state.out_BN.at[:, state.step].set(token_B),
      logp_BN=state.logp_BN.at[:, state.step].set(logp_B))


def prefill(model, ids_BP, mask_BP, key, eos_E, pad, *, max_new_tokens: int, s: Sampling,
            start_id: int | None = None) -> State:
  """Runs the prompt through the model in one parallel pass, filling the cache, and
  chooses the first new token."""
  B = ids_BP.shape[0]
  if _seq2seq(model):
    enc_BSD = model.encode(ids_BP, mask_BP)
    cache = model.init_cache(B, max_new_tokens)
    start_B1 = jnp.full((B, 1), start_id, jnp.int32)
    out = model.decode(start_B1, enc_BSD, mask_BP, cache=cache)
    lengths_B = jnp.ones((B,), jnp.int32)
  else:
    P = ids_BP.shape[1]
    pos_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    cache = model.init_cache(B, P + max_new_tokens)
    out = model(ids_BP, mask_BP, position_ids=pos_BP, cache=cache)
    lengths_B = mask_BP.sum(1).astype(jnp.int32)
  V = out.logits.shape[-1]
  seen_BV = jnp.zeros((B, V if s.repetition_penalty not in (None, 1.0) else 1), bool)
  if seen_BV.shape[1] > 1:  # what HF penalizes: the decoder's own sequence so far
    seen_BV = (seen_BV.at[:, start_id].set(True) if _seq2seq(model)
               else seen_BV.at[jnp.arange(B)[:, None], ids_BP].max(mask_BP > 0))
  state = State(jnp.zeros((), jnp.int32), jnp.zeros((B,), jnp.int32), lengths_B, out.cache,
                jnp.zeros((B,), bool), seen_BV, jnp.full((B, max_new_tokens), pad, jnp.int32),
                jnp.zeros((B, max_new_tokens), jnp.float32))
  token_B, logp_B = choose(out.logits[:, -1], seen_BV, jax.random.fold_in(key, 0), s)
  return _take(state, token_B, logp_B, eos_E, pad)


def decode_step(model, state: State, key, eos_E, pad, *, s: Sampling, mask_BS=None) -> State:
  """Feeds each row's last token through the cache and chooses the next one."""
  token_B1 = state.token_B[:, None]
  if _seq2seq(model):
    out = model.decode(token_B1, None, mask_BS, cache=state.cache)
  else:
    out = model(token_B1, jnp.ones_like(token_B1), position_ids=state.lengths_B[:, None],
                cache=state.cache)
  state = state._replace(cache=out.cache, lengths_B=state.lengths_B + 1)
  token_B, logp_B = choose(out.logits[:, 0], state.seen_BV,
                           jax.random.fold_in(key, state.step), s)
  return _take(state, token_B, logp_B, eos_E, pad)


def recompute_step(model, state: State, ids_BP, mask_BP, key, eos_E, pad, *, s: Sampling,
                   max_new_tokens: int, step: int) -> State:
  """`decode_step` as transformers' Phi-3 takes it where a longrope model crosses its
  switch (request.switch_step): the cache is dropped and the whole sequence so far, the
  prompt and the `step` tokens generated, runs again, its last position now past the
  switch, so every key is rotated with the long factors from here on."""
  B, P = ids_BP.shape
  ids_BT = jnp.concatenate([ids_BP, state.out_BN[:, :step]], axis=1)
  mask_BT = jnp.concatenate([mask_BP, jnp.ones((B, step), mask_BP.dtype)], axis=1)
  pos_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
  out = model(ids_BT, mask_BT, position_ids=pos_BT,
              cache=model.init_cache(B, P + max_new_tokens))
  state = state._replace(cache=out.cache, lengths_B=state.lengths_B + 1)
  token_B, logp_B = choose(out.logits[:, -1], state.seen_BV,
                           jax.random.fold_in(key, state.step), s)
  return _take(state, token_B, logp_B, eos_E, pad)


def _run(graphdef, params, ids_BP, mask_BP, key, eos_E, pad, *, max_new_tokens, s,
         start_id, switch_step=None):
  model = nnx.merge(graphdef, params)
  state = prefill(model, ids_BP, mask_BP, key, eos_E, pad, max_new_tokens=max_new_tokens,
                  s=s, start_id=start_id)
  mask = mask_BP if _seq2seq(model) else None

  def step(st):
    return decode_step(model, st, key, eos_E, pad, s=s, mask_BS=mask)

  def body(st):
    if switch_step is None:
      return step(st)
    return jax.lax.cond(st.step == switch_step, lambda x: recompute_step(
        model, x, ids_BP, mask_BP, key, eos_E, pad, s=s, max_new_tokens=max_new_tokens,
        step=switch_step), step, st)

  state = jax.lax.while_loop(lambda st: (st.step < max_new_tokens) & ~jnp.all(st.done_B),
                             body, state)
  return state.out_BN, state.logp_BN


_compiled_run = jax.jit(_run, static_argnames=("graphdef", "max_new_tokens", "s", "start_id",
                                               "switch_step"))


def generate(model, input_ids, *, max_new_tokens: int, attention_mask=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int = 0, return_scores: bool = False, draft_model=None,
             num_draft_tokens: int = 4):
  """Generates up to `max_new_tokens` tokens after each prompt.

  Args:
    model: a decoder-only LM (DecoderForCausalLM) or an encoder-decoder (T5).
    input_ids: int [B, P] prompts (or [P]); rows shorter than P are padded, left or right,
      as `attention_mask` (1 = real token) says.
    temperature: 0 is greedy; else the logits are divided by it and then filtered by
      `top_k`, `top_p` and `min_p` (Hugging Face's order) before a draw.
    repetition_penalty: CTRL's penalty on tokens already in the row (prompt included).
    eos_token_id, pad_token_id: one id or a list of eos ids; defaults from model.config.
    seed: the draws depend on it alone (and the step): the same seed, the same tokens.
    return_scores: also return each new token's log-probability under the distribution
      it was chosen from.
    draft_model: a smaller decoder with the same vocabulary: speculative decoding
      (generate/speculative.py), `num_draft_tokens` proposed per target pass. The output
      is the target's greedy output, or distributed as the target's samples.

  Returns:
    [B, P + max_new_tokens] for a decoder-only model (the prompts as given, then the new
    tokens), [B, 1 + max_new_tokens] for an encoder-decoder (decoder start token, then the
    new tokens), as transformers' `generate` returns; rows are padded after their eos.
    With `return_scores`, (tokens, log_probs [B, max_new_tokens]).
  """
  s = Sampling(temperature, top_k, top_p, min_p, repetition_penalty)
  if draft_model is not None:
    if return_scores:
      raise ConfigError("return_scores is not available with draft_model")
    return speculative_generate(model, draft_model, input_ids, max_new_tokens=max_new_tokens,
                                num_draft_tokens=num_draft_tokens,
                                attention_mask=attention_mask, s=s, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id, seed=seed)
  prep = prepare(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, recompute_switch=True)
  graphdef, params = nnx.split(model)
  new_BN, logp_BN = _compiled_run(graphdef, params, prep.ids_BP, prep.mask_BP,
                                  jax.random.key(seed), prep.eos_E, prep.pad,
                                  max_new_tokens=max_new_tokens, s=s, start_id=prep.start_id,
                                  switch_step=prep.switch_step)
  new_BN = np.asarray(new_BN)
  if _seq2seq(model):
    head = np.full((new_BN.shape[0], 1), prep.start_id, np.int32)
  else:
    head = np.asarray(input_ids).reshape(new_BN.shape[0], -1).astype(np.int32)
  tokens = np.concatenate([head, new_BN], axis=1)
  return (tokens, np.asarray(logp_BN)) if return_scores else tokens


_stream_prefill = jax.jit(lambda graphdef, params, *a, **kw: prefill(
    nnx.merge(graphdef, params), *a, **kw),
    static_argnames=("graphdef", "max_new_tokens", "s", "start_id"))
_stream_step = jax.jit(lambda graphdef, params, *a, **kw: decode_step(
    nnx.merge(graphdef, params), *a, **kw), static_argnames=("graphdef", "s"))


def stream(model, input_ids, *, max_new_tokens: int, attention_mask=None, seed: int = 0,
           eos_token_id=None, pad_token_id=None, **sampling) -> Iterator[np.ndarray]:
  """Like `generate`, but yields each step's new tokens [B] as soon as they exist (the
  same prefill and step, compiled once each, driven from Python)."""
  s = Sampling(**sampling)
  prep = prepare(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  graphdef, params = nnx.split(model)
  key = jax.random.key(seed)
  state = _stream_prefill(graphdef, params, prep.ids_BP, prep.mask_BP, key, prep.eos_E,
                          prep.pad, max_new_tokens=max_new_tokens, s=s, start_id=prep.start_id)
  mask = prep.mask_BP if _seq2seq(model) else None
  while True:
    yield np.asarray(state.token_B)
    if int(state.step) >= max_new_tokens or bool(np.all(state.done_B)):
      return
    state = _stream_step(graphdef, params, state, key, prep.eos_E, prep.pad, s=s, mask_BS=mask)
