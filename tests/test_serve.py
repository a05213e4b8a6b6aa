"""The OpenAI-compatible server (jaxlm/serve): the same tokens as `jaxlm.generate`, alone or
batched; the official `openai` client; 200+ hostile requests answered 4xx; a dropped
stream frees its slot; a full queue is 429; a wrong key is 401; SIGTERM drains and exits 0.
Everything binds 127.0.0.1 and stops by itself."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import jaxlm
from conftest import REPO
from jaxlm.serve.engine import Engine, Request

EOS = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A random Llama (2 layers, 32 wide, 2,048 positions) with a word-level tokenizer
  ("w0" ... "w252") and a chat template."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  d = tmp_path_factory.mktemp("serve") / "llama"
  cfg = jaxlm.ModelConfig(model_type="llama", architectures=["LlamaForCausalLM"], causal=True,
                          vocab_size=256, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                          max_position_embeddings=2048, hidden_act="silu", norm_type="rmsnorm",
                          norm_position="pre", mlp_type="gated", mlp_bias=False,
                          attention_bias=False, position_embedding_type="rope",
                          layer_norm_eps=1e-6, type_vocab_size=0, tie_word_embeddings=False,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          bos_token_id=1, eos_token_id=EOS, initializer_range=0.5)
  jaxlm.save_pretrained(jaxlm.build_model(cfg, seed=3), str(d))
  words = ["[UNK]", "[PAD]", "</s>"] + [f"w{i}" for i in range(253)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(d / "tokenizer.json"))
  template = ("{% for m in messages %}w7 {{ m['content'] }} {% endfor %}"
              "{% if add_generation_prompt %}w9{% endif %}")
  (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
  return d


class InProcess:
  """uvicorn on a thread, over a pre-bound 127.0.0.1 socket."""

  def __init__(self, model_dir, **flags):
    import uvicorn
    from jaxlm.serve.__main__ import build, parse
    args = parse([f"--model={model_dir}", *[f"--{k}={v}" for k, v in flags.items()]])
    self.app, _ = build(args)
    self.sock = socket.socket()
    self.sock.bind(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
    self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                timeout_graceful_shutdown=2))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.time() + 120
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
      time.sleep(0.05)
    self.engine = self.app.state.server.engine

  def stop(self):
    self.server.should_exit = True
    self.thread.join(30)


@pytest.fixture(scope="module")
def server(model_dir):
  srv = InProcess(model_dir, slots=16, max_len=2048, max_queue=4, max_body=65536)
  yield srv
  srv.stop()


@pytest.fixture(scope="module")
def model_and_tok(model_dir):
  return jaxlm.from_pretrained(str(model_dir)), jaxlm.load_tokenizer(str(model_dir))


def _reference(model, ids, max_tokens, **kw):
  """jaxlm.generate on the prompt alone, cut at eos."""
  new = jaxlm.generate(model, np.asarray([ids]), max_new_tokens=max_tokens, **kw)[0, len(ids):]
  new = new.tolist()
  return new[:new.index(EOS)] if EOS in new else new


def test_same_tokens_alone_and_batched_with_15_others(server, model_and_tok):
  model, tok = model_and_tok
  rng = np.random.default_rng(0)
  prompts = [" ".join(f"w{i}" for i in rng.integers(0, 253, size=n))
             for n in (1, 3, 5, 7, 9, 12, 15, 17, 20, 24, 31, 33, 40, 47, 64, 70)]
  want = [tok.decode(_reference(model, tok.encode(p), 24)) for p in prompts]
  body = {"prompt": prompts, "max_tokens": 24, "temperature": 0}
  steps = server.engine.steps
  batched = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
  assert [c["text"] for c in batched["choices"]] == want
  assert server.engine.steps - steps <= 25  # one shared decode loop, not 16 in turn
  for p, w in zip(prompts[::5], want[::5]):
    alone = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": p},
                       timeout=60).json()
    assert alone["choices"][0]["text"] == w
  # A sampled request draws what generate(seed=...) draws for the prompt alone.
  ids = tok.encode(prompts[3])
  want = tok.decode(_reference(model, ids, 12, temperature=0.8, top_k=40, top_p=0.9, seed=5))
  r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
      "prompt": prompts[3], "max_tokens": 12, "temperature": 0.8, "top_k": 40, "top_p": 0.9,
      "seed": 5}).json()
  assert r["choices"][0]["text"] == want


def test_engine_rows_of_a_sliding_window_model_match_generate():
  """Mistral (window 4): every row writes its own ring-buffer column."""
  model = jaxlm.from_pretrained(str(REPO / "tests/fixtures/hf/mistral"))
  engine = Engine(model, slots=3, max_len=64).start(warmup=False)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 256, size=n).tolist() for n in (2, 9, 21, 30, 5)]
  got = {i: [] for i in range(len(prompts))}
  done = threading.Semaphore(0)

  def emit(i):
    return lambda ev: (got[i].append(ev.token) if ev.token is not None else None,
                       done.release() if ev.finish else None)

  engine.submit_many([(Request(p, 20), emit(i)) for i, p in enumerate(prompts)])
  for _ in prompts:
    assert done.acquire(timeout=60)
  engine.close()
  for i, p in enumerate(prompts):
    assert got[i] == _reference(model, p, 20), i


def test_the_openai_client(server, model_and_tok):
  openai = pytest.importorskip("openai")
  model, tok = model_and_tok
  client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
  assert [m.id for m in client.models.list()] == ["llama"]
  prompt = "w1 w2 w3 w4 w5"
  full = client.completions.create(model="llama", prompt=prompt, max_tokens=20, temperature=0,
                                   logprobs=2)
  text = full.choices[0].text
  assert text == tok.decode(_reference(model, tok.encode(prompt), 20))
  assert len(full.choices[0].logprobs.token_logprobs) == full.usage.completion_tokens
  assert full.usage.prompt_tokens == 5
  chunks = client.completions.create(model="llama", prompt=prompt, max_tokens=20,
                                     temperature=0, stream=True)
  assert "".join(c.choices[0].text for c in chunks) == text
  # A stop string: the text ends before it, streamed or not.
  stop = " ".join(text.split()[3:5])
  cut = client.completions.create(model="llama", prompt=prompt, max_tokens=20, temperature=0,
                                  stop=[stop])
  assert cut.choices[0].text == text[:text.index(stop)]
  assert cut.choices[0].finish_reason == "stop"
  streamed = client.completions.create(model="llama", prompt=prompt, max_tokens=20,
                                       temperature=0, stop=[stop], stream=True)
  assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
  # Chat: the template renders "w7 <content> w9".
  messages = [{"role": "user", "content": "w11 w12"}]
  chat = client.chat.completions.create(model="llama", messages=messages, max_tokens=16,
                                        temperature=0)
  want = tok.decode(_reference(model, tok.encode("w7 w11 w12 w9"), 16))
  assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
  chunks = list(client.chat.completions.create(model="llama", messages=messages, max_tokens=16,
                                               temperature=0, stream=True))
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
  assert chunks[-1].choices[0].finish_reason in ("stop", "length")
  two = client.completions.create(model="llama", prompt=prompt, max_tokens=8, n=2,
                                  temperature=0)
  assert [c.text for c in two.choices] == [text[:len(two.choices[0].text)]] * 2


def _hostile_requests():
  """(description, method, path, kwargs for httpx) of malformed or hostile requests."""
  ok = {"prompt": "w1 w2", "max_tokens": 4}
  bad_values = {
      "prompt": [None, 1.5, True, {}, [], [[]], [1, "a"], [[-1]], [10**9], "", " ",
                 "\ud800", ["w1", 3], [[1, 2], "w1"], ["w1"] * 65, "w1 " * 3000],
      "max_tokens": [-1, 0, -(10**30), 10**30, 1.5, "16", True, [], 2048, 10**6],
      "temperature": [-0.1, 2.5, "hot", float("inf"), [], {}, True, 1e308 * 10],
      "top_p": [0, -1, 1.5, "x", True, []],
      "top_k": [-1, 1.5, "5", 10**30, True],
      "n": [0, -3, 17, 10**9, 1.5, "2"],
      "stop": [1, [1], ["a"] * 5, [""], {"a": 1}, [None]],
      "seed": [2**31, -(2**31) - 1, 10**40, "1", 1.5],
      "stream": ["yes", 1, None, []],
      "logprobs": [-1, 6, 10**9, "2", 1.5, True],
      "echo": [True, "x"],
      "presence_penalty": [0.5, -1, "x"],
      "frequency_penalty": [1, "x"],
      "model": [1, [], {}],
      "user": [1, []],
      "stream_options": [1, {"bogus": True}, {"include_usage": "yes"}],
  }
  out = []
  for field, values in bad_values.items():
    for v in values:
      body = {**ok, field: v}
      try:
        content = json.dumps(body).encode()
      except ValueError:
        content = json.dumps(body, allow_nan=True).encode()
      out.append((f"{field}={str(v)[:20]}", "POST", "/v1/completions",
                  {"content": content, "headers": {"content-type": "application/json"}}))
  for extra in ("bogus", "prompt_tokens", "functions", "__proto__", "suffix", "best_of"):
    out.append((f"unknown {extra}", "POST", "/v1/completions", {"json": {**ok, extra: 1}}))
  for missing in ("prompt",):
    out.append((f"missing {missing}", "POST", "/v1/completions",
                {"json": {k: v for k, v in ok.items() if k != missing}}))
  raw = [b"", b"{", b"}", b"null", b"[]", b"42", b'"prompt"', b"{'prompt': 'w1'}",
         b'{"prompt": "w1",}', b'{"prompt": "w1"} trailing', b'{"prompt": NaN}',
         b'{"prompt": "w1", "max_tokens": NaN}', b'{"prompt": "w1", "temperature": Infinity}',
         b'{"prompt": "\xff\xfe w1"}', b'{"prompt": "w1 \xc3\x28"}', b"\x00\x01\x02",
         b'{"prompt": "w1", "prompt": 5}', b"[" * 10000, b'{"a":' * 5000,
         b'{"prompt": "w1", "max_tokens": 1' + b"0" * 5000 + b"}",
         b'{"prompt": "\\ud800"}', b'{"prompt": "\\udfff w1"}']
  for b in raw:
    out.append((f"raw {b[:20]!r}", "POST", "/v1/completions",
                {"content": b, "headers": {"content-type": "application/json"}}))
  out.append(("oversized body", "POST", "/v1/completions",
              {"json": {"prompt": "w1 " * 40000, "max_tokens": 4}}))
  out.append(("oversized chunked body", "POST", "/v1/completions",
              {"content": iter([b'{"prompt": "' + b"w1 " * 30000 + b'"}'])}))
  chat_ok = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 4}
  chat_bad = [{"messages": []}, {"messages": "w1"}, {"messages": [{"role": "user"}]},
              {"messages": [{"role": "robot", "content": "w1"}]},
              {"messages": [{"role": "user", "content": 5}]},
              {"messages": [{"role": "user", "content": "w1", "extra": 1}]},
              {**chat_ok, "top_logprobs": 9}, {**chat_ok, "logprobs": "yes"},
              {**chat_ok, "max_tokens": -5}, {**chat_ok, "prompt": "w1"},
              {"messages": [{"role": "user", "content": "\ud800"}]}, {}]
  for body in chat_bad:
    out.append((f"chat {str(body)[:30]}", "POST", "/v1/chat/completions", {"json": body}))
  valid = json.dumps({**ok, "temperature": 0.5, "stop": ["w9"]}).encode()
  for cut in range(1, len(valid)):  # every truncation of a valid body
    out.append((f"truncated at {cut}", "POST", "/v1/completions",
                {"content": valid[:cut], "headers": {"content-type": "application/json"}}))
  wrong = {"a string": "x", "an object": {"k": 1}, "a list": [1.5], "null": None}
  for field in ("max_tokens", "temperature", "top_p", "top_k", "n", "seed", "logprobs"):
    for what, v in wrong.items():
      if v is None and field in ("max_tokens", "seed", "logprobs"):  # null: the default
        continue
      out.append((f"{field} as {what}", "POST", "/v1/completions", {"json": {**ok, field: v}}))
  for path, method in (("/v1/completions", "GET"), ("/v1/models", "POST"), ("/nope", "GET"),
                       ("/v1/engines", "GET"), ("/../etc/passwd", "GET"),
                       ("/v1/completions/x", "POST"), ("/metrics", "DELETE")):
    out.append((f"{method} {path}", method, path, {}))
  return out


def test_200_hostile_requests_get_4xx_and_the_server_still_serves(server):
  cases = _hostile_requests()
  assert len(cases) >= 200
  with httpx.Client(base_url=server.url, timeout=60) as c:
    for what, method, path, kw in cases:
      if "json" in kw:  # ASCII-escaped, so lone surrogates reach the server
        kw = {"content": json.dumps(kw["json"]).encode(),
              "headers": {"content-type": "application/json"}}
      r = c.request(method, path, **kw)
      assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
      if r.status_code not in (404, 405):
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"], what
    # A Content-Length far past the limit is refused before any body is read.
    host, port = server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
      sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                   b"application/json\r\nContent-Length: 999999999\r\n\r\n{}")
      assert sock.recv(64).startswith(b"HTTP/1.1 413 ")
    r = c.post("/v1/completions", json={"prompt": "w1 w2", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
  assert server.engine.active_slots == 0


def _metric(url: str, name: str) -> float:
  text = httpx.get(f"{url}/metrics").text
  return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name + " ")))


def test_a_dropped_stream_frees_its_slot_and_a_full_queue_is_429(server):
  url, body = f"{server.url}/v1/completions", {"prompt": "w1 w2", "max_tokens": 2000,
                                               "temperature": 0, "stream": True}
  clients = [httpx.Client(timeout=60) for _ in range(20)]
  streams = []
  try:
    for c in clients:  # 16 decode, 4 wait (max_queue=4)
      streams.append(c.send(c.build_request("POST", url, json=body), stream=True))
    lines = streams[0].iter_lines()
    assert next(lines).startswith("data: ")  # it is streaming
    assert _metric(server.url, "jaxlm_active_slots") == 16
    assert _metric(server.url, "jaxlm_queue_depth") == 4
    r = httpx.post(url, json={**body, "stream": False, "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
  finally:
    for s in streams:
      s.close()
    for c in clients:
      c.close()
  deadline = time.time() + 10
  while _metric(server.url, "jaxlm_active_slots") or _metric(server.url, "jaxlm_queue_depth"):
    assert time.time() < deadline, "dropped streams kept their slots"
    time.sleep(0.05)
  generated = _metric(server.url, "jaxlm_generated_tokens_total")
  time.sleep(0.3)
  assert _metric(server.url, "jaxlm_generated_tokens_total") == generated  # nothing decodes


@pytest.mark.slow
def test_api_key_and_sigterm_drain(model_dir):
  port = _free_port()
  env = {**os.environ, "JAXLM_API_KEY": "s3cret"}
  proc = subprocess.Popen([sys.executable, "-m", "jaxlm.serve", f"--model={model_dir}",
                           f"--port={port}", "--slots=2", "--grace=20", "--quantize=int8",
                           "--log_level=warning"],
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 180
    while True:
      assert proc.poll() is None, proc.stdout.read()[-3000:]
      assert time.time() < deadline, "the server did not come up"
      try:
        if httpx.get(f"{url}/health").status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.2)
    body = {"prompt": "w1", "max_tokens": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Bearer s3cre"}):
      r = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
      assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 8, "temperature": 0},
                   headers=auth)
    # --quantize=int8 serves what generate gives the int8 model.
    tok = jaxlm.load_tokenizer(str(model_dir))
    int8 = jaxlm.quantize(jaxlm.from_pretrained(str(model_dir)), "int8")
    assert r.json()["choices"][0]["text"] == tok.decode(_reference(int8, tok.encode("w1"), 8))
    # SIGTERM during a stream: the stream completes, then the process exits 0.
    with httpx.stream("POST", f"{url}/v1/completions", headers=auth, timeout=60,
                      json={"prompt": "w1", "max_tokens": 300, "temperature": 0,
                            "stream": True}) as s:
      lines = s.iter_lines()
      first = next(lines)
      assert first.startswith("data: ")
      proc.send_signal(signal.SIGTERM)
      rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    text = "".join(json.loads(ln[len("data: "):])["choices"][0]["text"] for ln in rest[:-1])
    first = json.loads(first[len("data: "):])["choices"][0]["text"]
    assert first + text == tok.decode(_reference(int8, tok.encode("w1"), 300))  # not cut
    assert proc.wait(timeout=30) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
