"""T5 span corruption end to end: the pipeline on a corpus, config checks, and the tiny
T5 config training on the embedded corpus."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import experiment, tasks
from jaxlm.data import pipeline
from jaxlm.data.corpus import prepare_corpus
from jaxlm.data.objectives import uncorrupt
from jaxlm.errors import ConfigError
from jaxlm.models import auto
from jaxlm.train import loop
from jaxlm.train.evaluator import Evaluator

from configs import gpt2_small, t5_small
from conftest import quiet

WORDS = "the king queen sword crown night storm ghost blood honour love death".split()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  rng = np.random.default_rng(0)
  for d in range(80):
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + f" doc{d}."
             for _ in range(int(rng.integers(3, 30)))]
    (src / f"doc{d:02d}.txt").write_text("\n".join(lines))
  cfg = t5_small.get_config("tiny")
  cfg.data.source = str(src)
  cfg.data.max_seq_len = 32
  cfg.tokenizer.vocab_size = 200
  wd = tmp_path_factory.mktemp("wd")
  return prepare_corpus(cfg.data, cfg.tokenizer, str(wd / "data"), log=quiet), cfg


def test_span_batches_reconstruct_the_packed_rows(small):
  c, cfg = small
  tok = c.tokenizer
  raw, enc, dec = pipeline.span_shapes(cfg.data)
  assert (raw, enc, dec) == (34, 32, 8)  # 5 noise tokens in 2 spans
  sentinels = pipeline.sentinel_ids(tok, cfg.data.num_sentinels)
  ids = pipeline.span_model_ids(tok, cfg.data.num_sentinels)
  # The trained tokenizer has no <extra_id_i>: they are appended, <extra_id_0> last.
  assert ids["vocab_size"] == tok.vocab_size + 100 and sentinels[0] == ids["vocab_size"] - 1
  assert min(sentinels) == tok.vocab_size and ids["decoder_start_token_id"] == tok.pad_id
  rows = pipeline.causal_rows(c, "validation", raw, seed=3)
  batches = list(tasks.get("span_corruption").eval_batches(c, "validation", cfg.data,
                                       batch_size=8, seed=3))
  n = 0
  for batch in batches:
    assert batch["input_ids"].shape == (8, enc) and batch["targets"].shape == (8, dec)
    for b in range(8):
      if not batch["example_weight"][b]:
        continue
      row = rows(n)
      original = row["input_ids"][row["segment_ids"] > 0]
      n_in, n_out = int(batch["attention_mask"][b].sum()), int(batch["loss_weights"][b].sum())
      assert batch["input_ids"][b, n_in - 1] == ids["eos_token_id"]
      got = uncorrupt(batch["input_ids"][b, :n_in - 1], batch["targets"][b, :n_out - 1],
                      sentinels)
      assert got == original.tolist()
      n += 1
  assert n == len(rows)
  # Over the split, about 15% of the tokens are corrupted.
  noise = sum(int(b["loss_weights"].sum()) for b in batches) - n * 2  # minus eos and >=1 sentinel
  assert 0.08 < noise / sum(len(rows(i)["input_ids"]) for i in range(n)) < 0.2


def test_span_iterator_resumes_exactly(small):
  c, cfg = small
  it = tasks.get("span_corruption").train_iterator(c, cfg.data, batch_size=4, seed=0)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = tasks.get("span_corruption").train_iterator(c, cfg.data, batch_size=4, seed=0)
  it2.set_state(state)
  for a in want:
    b = next(it2)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_span_objective_needs_an_encoder_decoder():
  cfg = gpt2_small.get_config("tiny")
  cfg.train.objective = "span_corruption"
  with pytest.raises(ConfigError, match="encoder-decoder"):
    experiment.validate(cfg)
  cfg = t5_small.get_config("tiny")
  cfg.train.objective = "causal"
  with pytest.raises(ConfigError, match="train.objective"):
    experiment.validate(cfg)
  cfg = t5_small.get_config("tiny")
  cfg.data.num_sentinels = 3
  with pytest.raises(ConfigError, match="data.num_sentinels"):
    experiment.validate(cfg)
  cfg.data.num_sentinels = 100
  cfg.data.noise_density = 1.5
  with pytest.raises(ConfigError, match="data.noise_density"):
    experiment.validate(cfg)


def test_t5_small_builds_abstractly_with_the_published_size():
  cfg = t5_small.get_config()
  model_cfg = experiment.validate(cfg).replace(vocab_size=32128)  # T5's vocabulary
  model = auto.build_abstract_model(model_cfg)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 60_506_624  # transformers' T5ForConditionalGeneration t5-small


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """configs/t5_small.py:tiny trained once: (workdir, val loss at init, report)."""
  cfg = t5_small.get_config("tiny")
  wd = tmp_path_factory.mktemp("t5_tiny")
  corpus, model, task = loop.setup(cfg, str(wd))
  graphdef, params = nnx.split(model, nnx.Param)
  before = Evaluator(corpus, cfg, graphdef, task, model.config.vocab_size)(params,
                                                                        "validation")
  return wd, before["loss"], loop.train(cfg, str(wd))


@pytest.mark.slow
def test_tiny_t5_span_corruption_lowers_val_loss(trained):
  wd, before, rep = trained
  assert rep["val_loss"] < before - 1.0, (before, rep["val_loss"])
  assert rep["val_perplexity"] < rep["unigram_perplexity"]
  np.testing.assert_allclose(rep["val_perplexity"], np.exp(rep["val_loss"]), rtol=1e-9)
  assert len(rep["samples"]) == 2
  assert rep["samples"][0]["input"].count("<extra_id_") >= 1
  assert rep["samples"][0]["target"].startswith("<extra_id_0>")
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "val_loss" in r] == [40, 80]
  # The export reloads (HF format) with the same validation loss.
  model = jaxlm.from_pretrained(str(wd / "model"))
  assert model.config.decoder_start_token_id == model.config.pad_token_id


@pytest.mark.slow
def test_t5_resume_and_eval_reproduce_the_report(trained, tmp_path, capsys):
  src, _, rep = trained
  wd = tmp_path / "resumed"
  shutil.copytree(src, wd)
  shutil.rmtree(wd / "checkpoints" / "80")
  cfg = t5_small.get_config("tiny")
  cfg.eval.samples = 0
  capsys.readouterr()
  again = loop.train(cfg, str(wd))
  assert f"resuming from checkpoint at step 40 in {wd}" in capsys.readouterr().err
  assert again["val_loss"] == rep["val_loss"]
  out = loop.evaluate(cfg, str(wd))
  np.testing.assert_allclose(out["test_loss"], rep["test_loss"], rtol=1e-6)
