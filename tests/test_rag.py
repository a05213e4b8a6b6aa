"""The RAG pipeline: Pipeline.answer against generate on the fitted prompt, the baseline
without retrieval, --mode=index and --mode=rag through the library and the CLI, and their
bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from jaxlm import ConfigError, ModelConfig, build_model, experiment, save_pretrained
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.generate import generate
from jaxlm.retrieval import BM25Retriever, Pipeline, Template, chunk_documents, load
from jaxlm.retrieval import cli as rag_cli

SCENES = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.",
    "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n"
    "The evil that men do lives after them;\nThe good is oft interred with their bones.",
    "If music be the food of love, play on;\nGive me excess of it, that, surfeiting,\n"
    "The appetite may sicken, and so die.\nThat strain again! it had a dying fall."]
TEMPLATE = "Complete the line.\n{context}Line: {question}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A directory of scene files (data.source), a tiny random GPT-2 with its tokenizer."""
  root = tmp_path_factory.mktemp("rag")
  src = root / "scenes"
  src.mkdir()
  for i, text in enumerate(SCENES):
    (src / f"scene{i}.txt").write_text(text * 3, encoding="utf-8")
  tok = train_tokenizer(SCENES * 10, kind="wordpiece", vocab_size=300)
  gen = build_model(ModelConfig(
      model_type="gpt2", architectures=["GPT2LMHeadModel"], causal=True,
      vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=128, hidden_act="gelu_new",
      norm_type="layernorm", norm_position="pre", position_embedding_type="absolute",
      type_vocab_size=0, tie_word_embeddings=True, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, eos_token_id=tok.sep_id, pad_token_id=tok.pad_id),
      seed=0)
  gen_dir = root / "gen"
  save_pretrained(gen, str(gen_dir))
  tok.save(str(gen_dir))
  chunks = chunk_documents(SCENES, tok, 24, 0)
  return {"root": root, "src": str(src), "tok": tok, "gen": gen, "gen_dir": str(gen_dir),
          "bm25": BM25Retriever().index(chunks)}


def config(setup, **rag):
  c = experiment.base_config()
  c.data.source = setup["src"]
  c.data.clean.min_chars = 10
  c.generate.update(max_new_tokens=6, batch_size=4)
  c.rag.update({**dict(tokenizer=setup["gen_dir"], generator=setup["gen_dir"],
                       chunk_tokens=24, template=TEMPLATE, k=2, stop=""), **rag})
  return c


def greedy_answer(gen, tok, prompt: str, max_new_tokens: int) -> str:
  ids = tok.encode(prompt + "\n")
  out = np.asarray(generate(gen, np.asarray([ids], np.int32), max_new_tokens=max_new_tokens,
                            eos_token_id=tok.sep_id, pad_token_id=tok.pad_id))[0, len(ids):]
  new = out.tolist()
  return tok.decode(new[:new.index(tok.sep_id)] if tok.sep_id in new else new).strip()


def test_pipeline_answers_as_generate_does_on_the_fitted_prompt(setup):
  bm25, gen, tok = setup["bm25"], setup["gen"], setup["tok"]
  rag = Pipeline(bm25, gen, tok, Template(TEMPLATE), k=2, max_new_tokens=6)
  questions = ["the slings and arrows", "lend me your ears", "the food of love"]
  answers = rag.answer_batch(questions)
  ids_QK, _ = bm25.search(questions, 2)
  for q, a, ids in zip(questions, answers, ids_QK.tolist()):
    assert a.passages == tuple(ids)  # both fit in 128 - 6 tokens
    assert all(bm25.texts[i].strip() in a.prompt for i in ids)
    assert a.prompt.endswith(f"Line: {q}") and a.prompt.index(bm25.texts[ids[0]].strip()) < \
        a.prompt.index(bm25.texts[ids[1]].strip())
    assert a.text == greedy_answer(gen, tok, a.prompt, 6)
  assert rag.answer(questions[1]) == answers[1]  # batch of one: same prompt, same tokens
  base = rag.answer(questions[0], retrieve=False)  # the baseline: an empty context
  assert base.passages == () and base.prompt == TEMPLATE.format(context="", question=questions[0])
  assert base.text == greedy_answer(gen, tok, base.prompt, 6)


def test_pipeline_drops_the_lowest_ranked_passages_to_fit(setup):
  bm25, gen, tok = setup["bm25"], setup["gen"], setup["tok"]
  small = build_model(gen.config.replace(max_position_embeddings=80), seed=1)
  rag = Pipeline(bm25, small, tok, Template(TEMPLATE), k=4, max_new_tokens=6)
  (prompt, used), = rag.prompts(["the winter of our discontent"])
  ids, _ = bm25.search(["the winter of our discontent"], 4)
  assert 0 < len(used) < 4 and used == tuple(ids[0, :len(used)].tolist())
  assert len(tok.encode(prompt + "\n")) <= 80 - 6
  with pytest.raises(ConfigError, match="max_new_tokens=80 leaves no room"):
    Pipeline(bm25, small, tok, k=2, max_new_tokens=80)
  with pytest.raises(ConfigError, match="k must be a non-negative integer"):
    Pipeline(bm25, small, tok, k=-1)


def test_index_and_rag_modes(setup, tmp_path):
  wd = tmp_path / "wd"
  cfg = config(setup)
  path = rag_cli.build_index(cfg, str(wd), log=lambda _: None)
  r = load(path)
  assert isinstance(r, BM25Retriever) and len(r.texts) >= len(SCENES)
  assert {c.doc_id for c in r.chunks} == {os.path.join(setup["src"], f"scene{i}.txt")
                                         for i in range(len(SCENES))}
  before = sorted(os.listdir(path))
  with pytest.raises(ConfigError, match="already holds an index; pass --fresh"):
    rag_cli.build_index(cfg, str(wd), log=lambda _: None)
  assert sorted(os.listdir(path)) == before  # nothing lost
  rag_cli.build_index(cfg, str(wd), fresh=True, log=lambda _: None)
  assert len([n for n in os.listdir(wd) if n.startswith("index.old-")]) == 1  # moved aside

  prompts = tmp_path / "q.txt"
  prompts.write_text("lend me your ears\nthe food of love\n", encoding="utf-8")
  out = tmp_path / "answers.jsonl"
  rag_cli.run(cfg, str(wd), prompt=None, prompts_file=str(prompts), output=str(out))
  rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
  pipe = rag_cli.pipeline(cfg, str(wd))
  for row, q in zip(rows, ["lend me your ears", "the food of love"], strict=True):
    a = pipe.answer(q)
    assert row["prompt"] == q and row["answer"] == a.text and row["passages"] == list(a.passages)
    assert row["documents"] == [pipe.retriever.chunks[i].doc_id for i in a.passages]


def test_rag_bad_input(setup, tmp_path):
  cfg = config(setup)
  with pytest.raises(ConfigError, match="no index in .*--mode=index"):
    rag_cli.pipeline(cfg, str(tmp_path / "none"))
  with pytest.raises(ConfigError, match="rag.encoder: rag.retriever='dense' needs"):
    rag_cli.build_index(config(setup, retriever="dense"), str(tmp_path / "d"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("   \n", encoding="utf-8")
  c = config(setup)
  c.data.source = str(empty)
  with pytest.raises(ConfigError, match="empty corpus"):
    rag_cli.build_index(c, str(tmp_path / "e"))
  with pytest.raises(ConfigError, match="has no {question} field"):
    Template("Passages: {context}")
  rag_cli.build_index(cfg, str(tmp_path / "wd"), log=lambda _: None)
  with pytest.raises(ConfigError, match="rag.template: .* neither a format string"):
    rag_cli.pipeline(config(setup, template="no/such/template.txt"), str(tmp_path / "wd"))
  with pytest.raises(ConfigError, match="exactly one of --prompt or --prompts_file"):
    rag_cli.run(cfg, str(tmp_path / "wd"), prompt=None, prompts_file=None, output=None)


def test_the_cli_without_an_index_is_a_one_line_error(setup, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxlm.main", "--mode=rag", "--config=configs/rag.py",
       f"--workdir={tmp_path}", f"--config.rag.generator={setup['gen_dir']}",
       "--prompt=lend me your ears"], cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 2, proc.stderr
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "no index in" in err[0] and "--mode=index" in err[0]
