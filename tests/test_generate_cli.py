"""`python -m jaxlm.main --mode=generate`: from a trained workdir and from a Hugging Face
directory, one prompt or a prompts file, and every bad request as one line with exit 2."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxlm
from conftest import REPO, fixture, fresh_workdir

pytestmark = pytest.mark.slow
GPT2_TINY = f"--config={REPO / 'configs/gpt2_small.py'}:tiny"
GENERATE = f"--config={REPO / 'configs/generate.py'}"


def run_main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "jaxlm.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
  wd = fresh_workdir(tmp_path_factory.mktemp("gen"), tiny_corpus)
  r = run_main(GPT2_TINY, f"--workdir={wd}", "--config.train.steps=10",
               "--config.train.eval_every=10", "--config.eval.samples=1")
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """The gpt2 fixture plus a word-level tokenizer.json within its 256-token vocabulary."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  d = tmp_path_factory.mktemp("hf") / "gpt2"
  shutil.copytree(fixture("gpt2"), d)
  words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(200)] + "the king said to".split()
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(d / "tokenizer.json"))
  return d


def _rows(text):
  return [json.loads(x) for x in text.splitlines() if x.strip()]


def _snapshot(d):
  return sorted((str(p.relative_to(d)), p.stat().st_mtime_ns) for p in d.rglob("*"))


def test_generate_from_a_trained_workdir(trained, tmp_path):
  wd = trained
  before = _snapshot(wd)
  r = run_main(GPT2_TINY, f"--workdir={wd}", "--mode=generate", "--prompt=The king said",
               "--config.generate.max_new_tokens=8")
  assert r.returncode == 0, r.stderr[-2000:]
  (row,) = _rows(r.stdout)  # not a terminal: one JSON line
  assert row["prompt"] == "The king said" and len(row["tokens"]) == 8
  # The same tokens as the library call on the exported model.
  model = jaxlm.from_pretrained(str(wd / "model"))
  tok = jaxlm.load_tokenizer(str(wd / "model"))
  ids = np.asarray([tok.encode("The king said")])
  want = jaxlm.generate(model, ids, max_new_tokens=8)[0, ids.shape[1]:]
  assert row["tokens"] == want.tolist() and row["completion"] == tok.decode(want.tolist())
  # A prompts file (plain lines, then JSONL) in batches of 2, written to --output.
  plain, jsonl, out = tmp_path / "p.txt", tmp_path / "p.jsonl", tmp_path / "out.jsonl"
  prompts = ["The king said", "ROMEO", "What light", "Good morrow, cousin", "Exit"]
  plain.write_text("\n".join(prompts) + "\n")
  jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                           for i, p in enumerate(prompts)))
  for f in (plain, jsonl):
    r = run_main(GPT2_TINY, f"--workdir={wd}", "--mode=generate", f"--prompts_file={f}",
                 f"--output={out}", "--config.generate.batch_size=2",
                 "--config.generate.max_new_tokens=6")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(out.read_text())
    assert [x["prompt"] for x in rows] == prompts and all(len(x["tokens"]) == 6 for x in rows)
    assert rows[0]["tokens"] == want[:6].tolist()  # batching does not change greedy tokens
  assert _snapshot(wd) == before  # generation reads the workdir, never writes to it


def test_generate_from_a_hugging_face_directory(hf_dir):
  r = run_main(GENERATE, f"--config.model.init_from={hf_dir}", "--mode=generate",
               "--prompt=the king said to w5", "--config.generate.max_new_tokens=5",
               "--config.generate.temperature=0.8", "--config.generate.top_k=10")
  assert r.returncode == 0, r.stderr[-2000:]
  (row,) = _rows(r.stdout)
  assert len(row["tokens"]) == 5 and all(0 <= t < 256 for t in row["tokens"])


def test_bad_requests_exit_2_with_one_line(hf_dir, tmp_path):
  bert = tmp_path / "bert"
  shutil.copytree(fixture("bert_mlm"), bert)
  shutil.copy(hf_dir / "tokenizer.json", bert / "tokenizer.json")
  no_tok = tmp_path / "no_tok"
  shutil.copytree(fixture("gpt2"), no_tok)
  long_prompt = " ".join(["w1"] * 100)  # the fixture's context is 64 positions
  base = [GENERATE, f"--config.model.init_from={hf_dir}", "--mode=generate"]
  cases = [
      (base + [f"--prompt={long_prompt}"], "longer than the model's context"),
      (base + ["--prompt=w1 w2", "--config.generate.max_new_tokens=100"],
       "past max_position_embeddings"),
      (base + ["--prompt=w1", "--config.generate.top_p=0.0"], "top_p must be in (0, 1]"),
      (base + ["--prompt=w1", "--config.generate.top_p=1.5"], "top_p must be in (0, 1]"),
      (base + ["--prompt=w1", "--config.generate.temperature=-0.5"], "temperature must be >= 0"),
      ([GENERATE, f"--config.model.init_from={bert}", "--mode=generate", "--prompt=w1"],
       "BertForMaskedLM has no LM head"),
      ([GENERATE, f"--config.model.init_from={no_tok}", "--mode=generate", "--prompt=w1"],
       "no tokenizer in"),
      (base, "exactly one of --prompt or --prompts_file"),
  ]
  for args, message in cases:
    r = run_main(*args, timeout=120)
    assert r.returncode == 2, (args, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, (args, lines)


def test_one_prompt_on_a_terminal_streams_the_same_completion(hf_dir, capsys):
  from jaxlm.generate import cli
  model = jaxlm.from_pretrained(str(hf_dir))
  tok = jaxlm.load_tokenizer(str(hf_dir))
  ids = tok.encode("the king said to w5")
  kw = dict(max_new_tokens=7, temperature=0.0, seed=0)
  cli._stream_one(model, tok, ids, 0, kw)
  printed = capsys.readouterr().out
  want = jaxlm.generate(model, np.asarray([ids]), max_new_tokens=7)[0, len(ids):].tolist()
  eos = model.config.eos_token_id
  want = want[:want.index(eos)] if eos in want else want
  assert printed == tok.decode(want) + "\n"
