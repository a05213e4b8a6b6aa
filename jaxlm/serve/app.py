"""The HTTP side: a Starlette app speaking the OpenAI API over an `Engine`.

The asyncio side only validates, queues and streams: each choice is an engine Request
whose events come back through `loop.call_soon_threadsafe` to one queue per HTTP request.
Client mistakes are 4xx with OpenAI's error body, never 500s; a stream whose client goes
away cancels its requests, which frees their slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import time

import pydantic
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxlm.errors import ConfigError
from jaxlm.serve import api
from jaxlm.serve.engine import Closed, Engine, Event, QueueFull, Request
from jaxlm.serve.text import Detokenizer

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers probe it)


class ClientError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.param, self.headers = status, param, headers


def _error_response(status: int, message: str, param=None, headers=None) -> JSONResponse:
  kind = {401: "authentication_error", 429: "rate_limit_error",
          503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500
                                          else "server_error")
  return JSONResponse(api.error(message, kind=kind, param=param), status_code=status,
                      headers=headers)


class Metrics:
  """Prometheus series, in the app's own registry (several apps in one process)."""

  def __init__(self, engine: Engine):
    r = self.registry = CollectorRegistry()
    Gauge("jaxlm_queue_depth", "Requests waiting for a slot", registry=r).set_function(
        lambda: engine.queue_depth)
    Gauge("jaxlm_active_slots", "Decode slots in use", registry=r).set_function(
        lambda: engine.active_slots)
    Gauge("jaxlm_slots", "Decode slots", registry=r).set(engine.slots)
    Gauge("jaxlm_decode_steps", "Decode steps run (tokens / steps = mean batch)",
          registry=r).set_function(lambda: engine.steps)
    self.tokens = Counter("jaxlm_generated_tokens", "Tokens generated", registry=r)
    self.requests = Counter("jaxlm_requests", "HTTP requests answered", ["code"], registry=r)
    self.ttft = Histogram("jaxlm_time_to_first_token_seconds", "Request to first token",
                          buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
    self.itl = Histogram("jaxlm_inter_token_latency_seconds", "Between a choice's tokens",
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                         registry=r)


class _Guard:
  """ASGI middleware: the bearer-token check (constant time) and 4xx/5xx counting."""

  def __init__(self, app, api_key: str | None, metrics: Metrics):
    self.app, self.key, self.metrics = app, api_key, metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def counted(message):
      if message["type"] == "http.response.start":
        self.metrics.requests.labels(str(message["status"])).inc()
      await send(message)

    if self.key and scope["path"] not in OPEN_PATHS:
      scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
      if not (hmac.compare_digest(token, self.key.encode()) & (scheme.lower() == b"bearer")):
        return await _error_response(401, "missing or wrong API key (Authorization: Bearer "
                                     "KEY)", headers={"WWW-Authenticate": "Bearer"})(
                                         scope, receive, counted)
    await self.app(scope, receive, counted)


class Server:
  """The routes, over one engine and tokenizer."""

  def __init__(self, engine: Engine, tokenizer, *, model_name: str, chat_template=None,
               max_body: int = 1 << 20):
    self.engine, self.tok, self.model_name = engine, tokenizer, model_name
    self.chat_template, self.max_body = chat_template, max_body
    self.metrics = Metrics(engine)
    self.draining = False

  # -- request parsing --

  async def _body(self, request: HTTPRequest, cls):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_body):
      raise ClientError(413, f"the request body is over {self.max_body} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > self.max_body:
        raise ClientError(413, f"the request body is over {self.max_body} bytes")
      chunks.append(chunk)
    try:
      return cls.model_validate_json(b"".join(chunks))
    except pydantic.ValidationError as e:
      err = e.errors(include_url=False)[0]
      where = ".".join(str(p) for p in err["loc"]) or None
      raise ClientError(400, f"{where or 'body'}: {err['msg']}" if where else err["msg"],
                        where) from None

  def _encode(self, text: str, param: str) -> list[int]:
    try:
      text.encode("utf-8")
    except UnicodeEncodeError:
      raise ClientError(400, f"{param} is not valid UTF-8 text", param) from None
    ids = self.tok.encode(text)
    if not ids:
      raise ClientError(400, f"{param} encodes to no tokens", param)
    return ids

  def _requests(self, body, prompts: list[list[int]]) -> list[tuple[int, Request]]:
    """(prompt index, engine Request) for every choice: n per prompt."""
    max_tokens = body.max_completion_tokens or body.max_tokens or 16
    limit = self.engine.max_len
    out = []
    for p, ids in enumerate(prompts):
      if any(not 0 <= t < self.engine.vocab_size for t in ids):
        raise ClientError(400, f"prompt token ids must be in [0, {self.engine.vocab_size})",
                          "prompt")
      if len(ids) + max_tokens > limit:
        raise ClientError(400, f"this model's context is {limit} tokens; the prompt has "
                          f"{len(ids)} and max_tokens is {max_tokens}", "max_tokens")
      for k in range(body.n):
        seed = (body.seed + k) % 2**31 if body.seed is not None else random.randrange(2**31)
        out.append((p, Request(ids, max_tokens, body.temperature, body.top_k, body.top_p,
                               seed)))
    return out

  def _submit(self, reqs: list[Request]) -> asyncio.Queue:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emitter(i):
      return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

    if self.draining:
      raise ClientError(503, "the server is shutting down")
    try:
      self.engine.submit_many([(r, emitter(i)) for i, r in enumerate(reqs)])
    except QueueFull as e:
      raise ClientError(429, f"the server is busy ({e}); retry later",
                        headers={"Retry-After": "1"}) from None
    except Closed:
      raise ClientError(503, "the server is shutting down") from None
    except ConfigError as e:
      raise ClientError(400, str(e)) from None
    return queue

  async def _events(self, reqs: list[Request], queue: asyncio.Queue, stops: list[str]):
    """Yields (choice index, text delta, Event) as tokens come, and a final
    (index, rest, Event with finish) per choice; cancels what is left if abandoned."""
    detok = [Detokenizer(self.tok, stops) for _ in reqs]
    last = [None] * len(reqs)
    open_ = len(reqs)
    try:
      while open_:
        i, ev = await queue.get()
        if detok[i].finished:
          continue
        now = time.monotonic()
        if ev.token is not None:
          self.metrics.tokens.inc()
          if last[i] is None:
            self.metrics.ttft.observe(now - reqs[i].submitted)
          else:
            self.metrics.itl.observe(now - last[i])
          last[i] = now
          delta, stopped = detok[i].push(ev.token)
          if stopped:
            self.engine.cancel(reqs[i])
            ev = ev._replace(finish="stop")
        else:
          delta = ""
        if ev.finish is not None:
          if ev.finish == "error":
            raise RuntimeError(ev.error)
          delta += detok[i].finish()
          open_ -= 1
        yield i, delta, ev
    finally:
      for r in reqs:
        if not r.cancelled:
          self.engine.cancel(r)

  # -- endpoints --

  async def completions(self, request: HTTPRequest):
    body = await self._body(request, api.CompletionRequest)
    p = body.prompt
    if isinstance(p, str):
      prompts = [self._encode(p, "prompt")]
    elif p and isinstance(p[0], int):
      prompts = [list(p)]
    else:
      prompts = [self._encode(x, "prompt") if isinstance(x, str) else list(x) for x in p]
    return await self._answer(body, prompts, chat=False)

  async def chat(self, request: HTTPRequest):
    if self.chat_template is None:
      raise ClientError(404, "this model's tokenizer has no chat template; use "
                        "/v1/completions")
    body = await self._body(request, api.ChatRequest)
    from jaxlm.retrieval.prompt import render_chat  # noqa: PLC0415 (jinja2, chat only)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
      text = render_chat(self.chat_template, messages)
    except ConfigError as e:
      raise ClientError(400, f"messages: {e}", "messages") from None
    return await self._answer(body, [self._encode(text, "messages")], chat=True)

  async def _answer(self, body, prompts, *, chat: bool):
    pairs = self._requests(body, prompts)
    reqs = [r for _, r in pairs]
    queue = self._submit(reqs)
    rid = api.new_id("chatcmpl" if chat else "cmpl")
    top_n = (body.top_logprobs or 0) if chat else body.logprobs
    want_logprobs = body.logprobs if chat else body.logprobs is not None
    events = self._events(reqs, queue, body.stops())
    prompt_tokens = sum(len(ids) for ids in prompts) * body.n
    if body.stream:
      include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))
      return StreamingResponse(
          self._stream(events, rid, chat, want_logprobs, top_n, len(reqs),
                       prompt_tokens if include_usage else None),
          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, finishes = [""] * len(reqs), [None] * len(reqs)
    lps, generated = [[] for _ in reqs], 0
    async for i, delta, ev in events:
      texts[i] += delta
      generated += ev.token is not None
      if ev.token is not None and want_logprobs:
        lps[i].append(ev)
      if ev.finish is not None:
        finishes[i] = "length" if ev.finish == "length" else "stop"
    choices = []
    for i in range(len(reqs)):
      lp = self._logprobs(lps[i], chat, top_n) if want_logprobs else None
      if chat:
        choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": lp, "finish_reason": finishes[i]})
      else:
        choices.append({"index": i, "text": texts[i], "logprobs": lp,
                        "finish_reason": finishes[i]})
    return JSONResponse(api.envelope("chat.completion" if chat else "text_completion", rid,
                                     self.model_name, choices,
                                     usage=api.usage(prompt_tokens, generated)))

  async def _stream(self, events, rid, chat, want_logprobs, top_n, n_choices, prompt_tokens):
    kind = "chat.completion.chunk" if chat else "text_completion"
    chunk = lambda choices, **kw: "data: " + json.dumps(
        api.envelope(kind, rid, self.model_name, choices, **kw)) + "\n\n"
    generated = 0
    try:
      if chat:
        for i in range(n_choices):
          yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}])
      async for i, delta, ev in events:
        generated += ev.token is not None
        lp = (self._logprobs([ev], chat, top_n) if want_logprobs and ev.token is not None
              else None)
        finish = None if ev.finish is None else ("length" if ev.finish == "length"
                                                 else "stop")
        if not delta and lp is None and finish is None:
          continue
        if chat:
          choice = {"index": i, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                    "finish_reason": finish}
        else:
          choice = {"index": i, "text": delta, "logprobs": lp, "finish_reason": finish}
        yield chunk([choice])
      if prompt_tokens is not None:
        yield chunk([], usage=api.usage(prompt_tokens, generated))
    except RuntimeError as e:  # the engine failed mid-stream: say so in the stream
      yield "data: " + json.dumps(api.error(str(e), kind="server_error")) + "\n\n"
    yield "data: [DONE]\n\n"

  def _logprobs(self, evs: list[Event], chat: bool, top_n: int):
    piece = lambda t: self.tok.decode([t], skip_special=False)
    if chat:
      return {"content": [
          {"token": piece(e.token), "logprob": e.logprob,
           "bytes": list(piece(e.token).encode()),
           "top_logprobs": [{"token": piece(t), "logprob": p, "bytes": list(piece(t).encode())}
                            for t, p in e.top[:top_n]]} for e in evs]}
    return {"tokens": [piece(e.token) for e in evs],
            "token_logprobs": [e.logprob for e in evs],
            "top_logprobs": [{piece(t): p for t, p in e.top[:top_n]} for e in evs]
            if top_n else None,
            "text_offset": []}

  async def models(self, request: HTTPRequest):
    return JSONResponse({"object": "list", "data": [
        {"id": self.model_name, "object": "model", "created": 0, "owned_by": "jaxlm"}]})

  async def health(self, request: HTTPRequest):
    if self.draining:
      return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok", "slots": self.engine.slots,
                         "active_slots": self.engine.active_slots,
                         "queue_depth": self.engine.queue_depth})

  async def metrics_text(self, request: HTTPRequest):
    return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(engine: Engine, tokenizer, *, model_name: str = "jaxlm", api_key=None,
               chat_template: str | None = None, max_body: int = 1 << 20,
               grace: float = 5.0) -> Starlette:
  """The ASGI app (run it with uvicorn). The engine is started by the app's lifespan if it
  is not running yet, and closed (after `grace` seconds for running requests) at its end."""
  import contextlib  # noqa: PLC0415

  srv = Server(engine, tokenizer, model_name=model_name, chat_template=chat_template,
               max_body=max_body)

  def guarded(fn):
    async def endpoint(request):
      try:
        return await fn(request)
      except ClientError as e:
        return _error_response(e.status, str(e), e.param, e.headers)
    return endpoint

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if not engine.started:
      await asyncio.to_thread(engine.start)
    yield
    srv.draining = True
    await asyncio.to_thread(engine.close, grace)

  async def http_error(request, exc: HTTPException):
    return _error_response(exc.status_code, str(exc.detail))

  async def server_error(request, exc: Exception):
    return _error_response(500, f"internal error: {type(exc).__name__}")

  app = Starlette(routes=[
      Route("/v1/completions", guarded(srv.completions), methods=["POST"]),
      Route("/v1/chat/completions", guarded(srv.chat), methods=["POST"]),
      Route("/v1/models", srv.models, methods=["GET"]),
      Route("/health", srv.health, methods=["GET"]),
      Route("/metrics", srv.metrics_text, methods=["GET"]),
  ], lifespan=lifespan, exception_handlers={HTTPException: http_error,
                                            Exception: server_error})
  app.state.server = srv
  app.add_middleware(_Guard, api_key=api_key, metrics=srv.metrics)
  return app
