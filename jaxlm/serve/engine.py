"""Continuous batching on the KV cache (the JetStream / vLLM pattern), on its own thread.

A fixed set of `slots` rows decode together: one compiled step feeds every row's last
token through a [slots, max_len] cache and samples each row with its own settings. A new
request is prefilled alone (its prompt left-padded to a length bucket, so one program
per bucket) into a fresh one-row cache, which then replaces a free row of the shared one
(`KVCache.put_row`; each row writes at its own column). Rows that finished or were
cancelled are free at once; their stale contents are overwritten by the next insert, and
until then they compute garbage nobody reads.

  engine = Engine(model, slots=16, max_len=512)
  engine.start()
  handle = engine.submit(Request(ids, max_tokens=32), emit)   # emit(Event) on the thread
  engine.cancel(handle); engine.close(grace=5.0)

At temperature 0 a row's tokens are `jaxlm.generate`'s for its prompt alone; a sampled
row draws with fold_in(key(seed), step), as `generate` does for a one-row batch.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.generate.request import _seq2seq, bucket, check_model, longrope_switch
from jaxlm.generate.sampling import choose_rows
from jaxlm.layers.kv_cache import KVCache

TOP_LOGPROBS = 5  # OpenAI's most alternatives per token


class QueueFull(Exception):
  """The queue holds `max_queue` requests already (HTTP 429)."""


class Closed(Exception):
  """The engine is shutting down (HTTP 503)."""


@dataclasses.dataclass
class Request:
  """One sequence to generate (an OpenAI choice)."""

  ids: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  seed: int = 0
  submitted: float = 0.0  # time.monotonic() at submit
  cancelled: bool = False  # set from any thread; the engine frees the slot at its next step


class Event(NamedTuple):
  """What the engine tells a request's `emit`: a token, or the end ("stop": eos,
  "length": max_tokens, "cancelled", or "error" with a message in `error`)."""

  token: int | None
  logprob: float = 0.0
  top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their log-probs
  finish: str | None = None
  error: str | None = None


class State(NamedTuple):
  """The decode batch on the device (one row a slot)."""

  cache: list
  token_B: jax.Array  # last token (the next step's input)
  pos_B: jax.Array  # its position
  step_B: jax.Array  # tokens generated so far (the key's fold-in)
  seed_B: jax.Array
  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array


def _choose(logits_BV, seed_B, step_B, st_like):
  """Tokens, their log-probs and the top alternatives, each row by its own settings."""
  temperature_B, top_k_B, top_p_B = st_like
  keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed_B, step_B)
  token_B, logp_BV = choose_rows(logits_BV, keys, temperature_B, top_k_B, top_p_B)
  lp_B = jnp.take_along_axis(logp_BV, token_B[:, None], -1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(logp_BV, min(TOP_LOGPROBS, logp_BV.shape[-1]))
  return token_B, (token_B, lp_B, top_ids, top_lp)


def _insert(graphdef, params, st: State, ids_1P, mask_1P, slot, settings, *, max_len):
  """Prefills one prompt into a fresh one-row cache and puts it in row `slot`."""
  model = nnx.merge(graphdef, params)
  seed, temperature, top_k, top_p = settings
  pos_1P = jnp.maximum(jnp.cumsum(mask_1P, axis=1) - 1, 0)
  out = model(ids_1P, mask_1P, position_ids=pos_1P, cache=model.init_cache(1, max_len))
  zero = jnp.zeros((1,), jnp.int32)
  token_1, emitted = _choose(out.logits[:, -1], seed[None], zero,
                             (temperature[None], top_k[None], top_p[None]))
  cache = jax.tree.map(lambda big, one: big.put_row(slot, one), st.cache, out.cache,
                       is_leaf=lambda x: isinstance(x, KVCache))
  put = lambda a, v: a.at[slot].set(v)
  st = State(cache, put(st.token_B, token_1[0]), put(st.pos_B, mask_1P.sum()),
             put(st.step_B, 1), put(st.seed_B, seed), put(st.temperature_B, temperature),
             put(st.top_k_B, top_k), put(st.top_p_B, top_p))
  return st, emitted


def _step(graphdef, params, st: State):
  """One token for every row (free rows compute garbage nobody reads)."""
  model = nnx.merge(graphdef, params)
  token_B1 = st.token_B[:, None]
  out = model(token_B1, jnp.ones_like(token_B1), position_ids=st.pos_B[:, None],
              cache=st.cache)
  token_B, emitted = _choose(out.logits[:, 0], st.seed_B, st.step_B,
                             (st.temperature_B, st.top_k_B, st.top_p_B))
  st = st._replace(cache=out.cache, token_B=token_B, pos_B=st.pos_B + 1, step_B=st.step_B + 1)
  return st, emitted


@dataclasses.dataclass
class _Slot:
  request: Request
  emit: Callable[[Event], None]
  generated: int = 0


class Engine:
  """Continuous batching over `slots` rows of up to `max_len` tokens each (prompt and
  output); at most `max_queue` requests wait beyond the free slots."""

  def __init__(self, model, *, slots: int = 16, max_len: int | None = None,
               max_queue: int = 256, eos_token_id=None):
    check_model(model)
    if _seq2seq(model):
      raise ConfigError(f"the server runs decoder-only LMs; {type(model).__name__} is an "
                        "encoder-decoder (use jaxlm.generate)")
    cfg = model.config
    limit = cfg.max_position_embeddings
    self.max_len = min(max_len or limit, limit)
    if slots < 1 or self.max_len < 2 or max_queue < 1:
      raise ConfigError(f"slots ({slots}) and max_queue ({max_queue}) must be >= 1 and "
                        f"max_len ({self.max_len}) >= 2")
    switch = longrope_switch(cfg)
    if switch is not None and self.max_len > switch:  # one factor set per batched step
      raise ConfigError(f"max_len={self.max_len} is past rope_scaling."
                        f"original_max_position_embeddings={switch}: longrope switches "
                        "factors for the whole batch there; serve with max_len <= it")
    self.slots, self.max_queue = slots, max_queue
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    self.vocab_size = cfg.vocab_size
    self._graphdef, self._params = nnx.split(model)
    cache = [jax.tree.map(lambda c: c.per_row(), layer,
                          is_leaf=lambda x: isinstance(x, KVCache))
             for layer in model.init_cache(slots, self.max_len)]
    zeros_i = jnp.zeros((slots,), jnp.int32)
    state = State(cache, zeros_i, zeros_i, zeros_i, zeros_i,
                  jnp.zeros((slots,), jnp.float32), zeros_i, jnp.ones((slots,), jnp.float32))
    self._state = jax.tree.map(jnp.copy, state)  # one buffer a leaf: the steps donate them
    self._insert = jax.jit(_insert, static_argnames=("graphdef", "max_len"), donate_argnums=2)
    self._step = jax.jit(_step, static_argnames="graphdef", donate_argnums=2)
    self._free = list(range(slots))
    self._active: dict[int, _Slot] = {}
    self._pending: collections.deque = collections.deque()
    self._cond = threading.Condition()
    self._closing = False
    self._thread: threading.Thread | None = None
    self.steps = 0  # decode steps run (tests, metrics)

  # -- the caller's side (any thread) --

  @property
  def queue_depth(self) -> int:
    return len(self._pending)

  @property
  def active_slots(self) -> int:
    return len(self._active)

  def submit_many(self, items: list[tuple[Request, Callable[[Event], None]]]) -> None:
    """Queues requests, all or none: QueueFull if they do not fit, Closed when closing."""
    for req, _ in items:
      if not req.ids or len(req.ids) + req.max_tokens > self.max_len or req.max_tokens < 1:
        raise ConfigError(f"a {len(req.ids)}-token prompt with max_tokens={req.max_tokens} "
                          f"does not fit max_len={self.max_len}")
    with self._cond:
      if self._closing:
        raise Closed("the server is shutting down")
      if len(self._pending) + len(items) - len(self._free) > self.max_queue:
        raise QueueFull(f"{len(self._pending)} requests are waiting (max_queue="
                        f"{self.max_queue})")
      now = time.monotonic()
      for req, emit in items:
        req.submitted = now
        self._pending.append((req, emit))
      self._cond.notify()

  def submit(self, req: Request, emit: Callable[[Event], None]) -> Request:
    self.submit_many([(req, emit)])
    return req

  def cancel(self, req: Request) -> None:
    """Frees the request's slot before the next step (or drops it from the queue)."""
    with self._cond:
      req.cancelled = True
      self._cond.notify()

  @property
  def started(self) -> bool:
    """Whether `start` has run (the engine thread exists)."""
    return self._thread is not None

  def start(self, warmup: bool = True) -> Engine:
    if warmup:  # compile the step and the smallest prefill before the first request
      self._run_insert(0, Request([self.pad], 1))
      jax.block_until_ready(self._run_step()[0])
    self._thread = threading.Thread(target=self._loop, name="jaxlm-engine", daemon=True)
    self._thread.start()
    return self

  def close(self, grace: float = 0.0) -> None:
    """Stops taking requests, lets the running ones finish for up to `grace` seconds,
    cancels the rest and stops the thread."""
    with self._cond:
      self._closing = True
      self._cond.notify()
    deadline = time.monotonic() + grace
    while (self._active or self._pending) and time.monotonic() < deadline:
      time.sleep(0.01)
    with self._cond:
      for req, _ in list(self._pending):
        req.cancelled = True
      for s in self._active.values():
        s.request.cancelled = True
      self._cond.notify()
    if self._thread is not None:
      self._thread.join(timeout=30)

  # -- the engine thread --

  def _run_insert(self, slot: int, req: Request):
    P = bucket(len(req.ids))
    ids = np.full((1, P), self.pad, np.int32)
    mask = np.zeros((1, P), np.int32)
    ids[0, P - len(req.ids):], mask[0, P - len(req.ids):] = req.ids, 1
    settings = (np.int32(req.seed), np.float32(req.temperature), np.int32(req.top_k),
                np.float32(req.top_p))
    self._state, emitted = self._insert(self._graphdef, self._params, self._state, ids, mask,
                                        np.int32(slot), settings, max_len=self.max_len)
    return jax.device_get(emitted)

  def _run_step(self):
    """Launches a step (asynchronously); returns its output and who it was for."""
    self._state, emitted = self._step(self._graphdef, self._params, self._state)
    self.steps += 1
    return emitted, dict(self._active)

  def _deliver_step(self, launched) -> None:
    emitted, live = launched
    emitted = jax.device_get(emitted)
    for slot, s in live.items():  # a slot freed and refilled since launch: not its output
      if self._active.get(slot) is s and not s.request.cancelled:
        self._deliver(slot, emitted, slot)

  def _deliver(self, slot: int, emitted, row: int) -> None:
    """Hands row `row` of a step's output to the slot's request; frees finished slots."""
    s = self._active[slot]
    token_B, lp_B, top_ids, top_lp = emitted
    token = int(token_B[row])
    s.generated += 1
    if token in self.eos:
      finish, event = "stop", Event(None, finish="stop")
    else:
      top = tuple((int(i), float(p)) for i, p in zip(top_ids[row], top_lp[row]))
      finish = "length" if s.generated >= s.request.max_tokens else None
      event = Event(token, float(lp_B[row]), top, finish)
    _safe(s.emit, event)
    if finish is not None:
      self._release(slot)

  def _release(self, slot: int) -> None:
    del self._active[slot]
    self._free.append(slot)

  def _admit(self) -> None:
    while self._free:
      with self._cond:
        if not self._pending:
          return
        req, emit = self._pending.popleft()
      if req.cancelled:
        _safe(emit, Event(None, finish="cancelled"))
        continue
      slot = self._free.pop()
      self._active[slot] = _Slot(req, emit)
      self._deliver(slot, self._run_insert(slot, req), 0)

  def _loop(self) -> None:
    """Step k+1 is launched before step k's tokens are handed out, so the host's work
    overlaps the device's; a row that finished at step k computes one step nobody reads."""
    inflight = None
    while True:
      with self._cond:
        while not (self._pending or self._active or self._closing or inflight):
          self._cond.wait()
        if self._closing and not (self._pending or self._active or inflight):
          return
      try:
        for slot in [k for k, s in self._active.items() if s.request.cancelled]:
          _safe(self._active[slot].emit, Event(None, finish="cancelled"))
          self._release(slot)
        self._admit()
        launched = self._run_step() if self._active else None
        if inflight is not None:
          self._deliver_step(inflight)
        inflight = launched
      except Exception as e:  # noqa: BLE001 (a device error ends every request, not the server)
        inflight = None
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        for slot in list(self._active):
          _safe(self._active[slot].emit, Event(None, finish="error", error=msg))
          self._release(slot)


def _safe(emit, event: Event) -> None:
  try:
    emit(event)
  except RuntimeError:  # the receiving event loop is gone (shutdown)
    pass
