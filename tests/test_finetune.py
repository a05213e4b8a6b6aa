"""Fine-tuning: the embedded labeled tasks (split by play), the head model built on a
pretrained one, freezing, LoRA's trainable share, the tasks' metrics, --mode=finetune
and --mode=eval end to end, and the one-line errors for bad input."""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default, finetune_genre, finetune_next_speaker, finetune_who_speaks
from conftest import quiet
from jaxlm import experiment, tasks
from jaxlm.config import ModelConfig
from jaxlm.data import labeled
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, DataError
from jaxlm.evals.metrics import ConfusionMatrix
from jaxlm.models import auto
from jaxlm.params import flat_params
from jaxlm.peft import lora
from jaxlm.pretrained import save_pretrained
from jaxlm.tasks import sft
from jaxlm.train import finetune, loop
from jaxlm.train.steps import make_train_step


def tiny_bert_config(vocab: int, **kw) -> ModelConfig:
  return ModelConfig(architectures=["BertForPreTraining"], vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


@pytest.fixture(scope="module")
def tok(tiny_corpus):
  from jaxlm.data.corpus import load_corpus
  return load_corpus(str(tiny_corpus)).tokenizer


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory, tok):
  """A tiny random BertForPreTraining export with the tiny corpus's tokenizer."""
  d = tmp_path_factory.mktemp("bert") / "model"
  model = auto.build_model(tiny_bert_config(tok.vocab_size), seed=3)
  save_pretrained(model, str(d))
  tok.save(str(d))
  return d, model


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory, tok):
  d = tmp_path_factory.mktemp("gpt") / "model"
  cfg = ModelConfig(model_type="gpt2", architectures=["GPT2LMHeadModel"], causal=True,
                    vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                    hidden_act="gelu_new", norm_position="pre", layer_norm_eps=1e-5,
                    type_vocab_size=0, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_id,
                    eos_token_id=tok.sep_id)
  save_pretrained(auto.build_model(cfg, seed=4), str(d))
  tok.save(str(d))
  return d


# ---- data ------------------------------------------------------------------------------------
def test_genre_split_is_by_play_and_stratified(tok):
  data = labeled.embedded("genre", tok, max_seq_len=64, seed=0)
  plays = data.manifest["plays"]
  seen = collections.Counter(p for split in plays.values() for p in split)
  assert max(seen.values()) == 1 and len(seen) == 38  # every play in exactly one split
  genres_in_test = {p.split("/")[0] for p in plays["test"]}
  assert genres_in_test == set(data.labels) and len(data.labels) == 6
  for split, recs in data.records.items():  # records carry their play: never crosses
    assert {r["play"] for r in recs} <= set(plays[split])
  assert all(31 <= len(r["ids"]) <= 62 for r in data.records["train"])  # windows of 62
  # Another seed draws other plays, still one per genre in test.
  other = labeled.embedded("genre", tok, max_seq_len=64, seed=1).manifest["plays"]["test"]
  assert other != plays["test"] and {p.split("/")[0] for p in other} == set(data.labels)


def test_who_speaks_answer_spans_name_the_speaker_of_the_quoted_line(tok):
  data = labeled.embedded("who_speaks", tok, max_seq_len=64, seed=0)
  recs = data.records["validation"][:200]
  assert len(recs) == 200
  for r in recs:
    s, e = r["answer_span"]
    assert tok.decode(r["context"][s:e + 1]) == tok.decode(tok.encode(r["answer"]))
    assert len(r["question"]) + len(r["context"]) + 3 <= 64
    assert r["answer"] in r["speakers"] and len(set(r["speakers"])) >= 2
    top = collections.Counter(r["speakers"]).most_common(1)[0][1]
    assert collections.Counter(r["speakers"])[r["baseline"]] == top


def test_next_speaker_records_and_packing_weights_only_the_response(tok):
  recs = labeled.next_speaker_records(list(labeled.embedded_scenes()[:3]))
  assert all(r["prompt"].endswith(labeled.NEXT_SPEAKER_INSTRUCTION) for r in recs)
  pairs = [([5, 6, 7], [8, 9, 1]), ([10, 11], [12, 1]), ([13, 14, 15, 16], [17, 1])]
  rows = sft.pack(pairs, 12, 0, seed=0)
  assert sorted(len(r) for r in rows) == [1, 2]
  for row in rows:
    out = sft.packed_row(row, 12, 0)
    predicted = out["targets"][out["loss_weights"] > 0].tolist()
    assert predicted == [t for _, r in row for t in r]  # exactly the responses (+ eos)
    assert (out["segment_ids"][out["loss_weights"] > 0] > 0).all()


def test_sft_chat_messages_and_empty_response(tmp_path, gpt_export):
  prompt, response = sft.chat_to_pair(
      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
       {"role": "assistant", "content": "Hello."}], "x")
  assert prompt == "system: Be brief.\nuser: Hi?" and response == "Hello."
  path = tmp_path / "sft.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": "a", "split": s})
                            for i, s in enumerate(["train", "validation", "test"] * 2))
                  + "\n" + json.dumps({"prompt": "q", "response": " ", "split": "train"}) + "\n")
  cfg = _cfg(finetune_next_speaker, "tiny", gpt_export, data={"source": str(path)},
             finetune={"dataset": ""})
  with pytest.raises(DataError, match=r"train example 2 has an empty response") as e:
    tasks.get("sft").prepare_data(cfg, None, str(tmp_path), quiet)
  assert "\n" not in str(e.value)


# ---- the head model ------------------------------------------------------------------------
def test_load_body_copies_the_encoder_and_lists_the_rest_once(bert_export):
  _, pre = bert_export
  cfg = pre.config.replace(architectures=["BertForSequenceClassification"], num_labels=6)
  model = auto.build_model(cfg, seed=9)
  lines = []
  info = finetune.load_body(model, pre, "PRE", lines.append)
  mine, theirs = flat_params(model), flat_params(pre)
  body = [n for n in mine if n.startswith("bert.")]
  assert body and all(np.array_equal(mine[n], theirs[n]) for n in body)
  assert info["missing"] == sorted(n for n in mine if not n.startswith("bert."))
  assert info["unexpected"] == sorted(n for n in theirs if n.startswith(("mlm.", "nsp.")))
  assert len(lines) == 2 and "classifier" in lines[0] and "nsp.classifier.kernel" in lines[1]


def test_mismatched_checkpoint_names_the_first_tensor_and_both_shapes(bert_export):
  _, pre = bert_export
  wide = pre.config.replace(architectures=["BertForSequenceClassification"], hidden_size=48,
                            num_labels=3)
  with pytest.raises(ConfigError) as e:
    finetune.load_body(auto.build_model(wide, seed=0), pre, "PRE", quiet)
  msg = str(e.value)
  assert "bert.embeddings.norm.bias" in msg or "bert.embeddings" in msg, msg
  assert "(32,)" in msg or "32)" in msg
  assert "48" in msg and "\n" not in msg


@pytest.mark.parametrize("freeze,frozen_prefixes", [
    ("all_but_head", ("bert.",)),
    ("embeddings", ("bert.embeddings.",)),
    ("layers:1", ("bert.embeddings.", "bert.layers.0.")),
])
def test_freezing_trains_only_the_rest(bert_export, tok, freeze, frozen_prefixes):
  _, pre = bert_export
  cfg = pre.config.replace(architectures=["BertForSequenceClassification"], num_labels=3)
  model = auto.build_model(cfg, seed=0)
  exp = experiment.base_config()
  exp.finetune.freeze = freeze
  graphdef, params, frozen = finetune.split(model, finetune.trainable(exp, model))
  names = lambda st: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(st)}  # noqa: E731
  assert all(n.startswith(frozen_prefixes) for n in names(frozen) if "kernel" in n)
  assert not any(n.startswith(frozen_prefixes) for n in names(params))
  assert any(n.startswith("classifier") for n in names(params))
  # One step: the frozen state is an input, never an output; the trained part moves.
  tx = optax.sgd(0.5)
  step = make_train_step(graphdef, tx, tasks.get("classify"), seed=0, dropout=False)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(5, tok.vocab_size, (4, 16)).astype(np.int32),
           "attention_mask": np.ones((4, 16), np.int32),
           "token_type_ids": np.zeros((4, 16), np.int32),
           "label": np.array([0, 1, 2, 1], np.int32)}
  before = jax.tree.map(np.asarray, params)
  new, _, m = step(jax.tree.map(jnp.copy, params), tx.init(params), batch, 0, frozen)
  assert np.isfinite(float(m["loss"]))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.tree.map(np.asarray, new))
  assert any(jax.tree.leaves(moved))


def test_lora_rank8_qv_trains_under_2_percent_of_the_main_job_bert():
  """The acceptance share, on the main job's shapes (configs/default.py, 4096 tokens)."""
  mc = experiment.model_config(default.get_config()).replace(
      vocab_size=4096, architectures=["BertForSequenceClassification"], num_labels=6)
  model = auto.build_model(mc, seed=0)
  total = lora.count_params(model)
  exp = finetune_genre.get_config("lora")
  lora.apply_lora(model, finetune.lora_config(exp), rngs_seed=0)
  filt = finetune.trainable(exp, model)
  _, params, frozen = finetune.split(model, filt)
  trained = sum(x.size for x in jax.tree.leaves(params))
  L, D, C, r = mc.num_hidden_layers, mc.hidden_size, 6, 8
  assert trained == L * 2 * r * (D + D) + (D * C + C)  # q and v adapters, plus the head
  assert trained / total <= 0.02, trained / total
  tx, _ = finetune.make_optimizer(exp.train, exp.finetune, params)
  opt_elems = sum(x.size for x in jax.tree.leaves(tx.init(params)) if x.ndim)
  assert opt_elems == 2 * trained  # Adam's two moments, for the trained part only


def test_head_learning_rate_labels_the_head(bert_export):
  _, pre = bert_export
  model = auto.build_model(pre.config.replace(architectures=["BertForSequenceClassification"],
                                              num_labels=3), seed=0)
  _, params = nnx.split(model, nnx.Param)
  exp = experiment.base_config()
  exp.train.update(optimizer="sgd", momentum=0.0, learning_rate=1e-3, warmup_steps=0,
                   decay="constant", grad_clip_norm=0.0, weight_decay=0.0)
  exp.finetune.head_learning_rate = 1.0
  tx, _ = finetune.make_optimizer(exp.train, exp.finetune, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(updates)}
  for name, u in flat.items():
    want = -1.0 if name.startswith("classifier") else -1e-3
    np.testing.assert_allclose(np.asarray(u.get_value() if hasattr(u, "get_value") else u),
                               want, rtol=1e-6, err_msg=name)


# ---- end to end ------------------------------------------------------------------------------
def _cfg(module, variant, init_from, **sections):
  cfg = module.get_config(variant)
  cfg.model.init_from = str(init_from)
  cfg.data.max_seq_len = 64
  for section, values in sections.items():
    for k, v in values.items():
      cfg[section][k] = v
  return cfg


def test_finetune_classify_then_eval_mode(tmp_path, bert_export, capsys):
  d, _ = bert_export
  wd = tmp_path / "genre"
  rep = loop.finetune(_cfg(finetune_genre, "tiny", d), str(wd))
  err = capsys.readouterr().err
  assert err.count("newly initialized") == 1 and err.count("not used") == 1
  assert "class balance (train/validation/test)" in err and "majority class" in err
  ev = json.loads((wd / "eval.json").read_text())
  for key in ("test_accuracy", "test_macro_f1", "test_per_class",
              "test_majority_baseline_accuracy", "test_confusion_matrix"):
    assert key in ev, key
  cm = ConfusionMatrix(np.asarray(ev["test_confusion_matrix"])).compute(sorted(ev["test_per_class"]))
  assert ev["test_macro_f1"] == pytest.approx(cm["macro_f1"])
  assert ev["test_accuracy"] == pytest.approx(np.trace(cm_m := np.asarray(
      ev["test_confusion_matrix"])) / cm_m.sum())
  assert set(ev["test_per_class"]) == set(rep["labels"])
  out = loop.evaluate(_cfg(finetune_genre, "tiny", d, eval={"split": "test"}), str(wd))
  assert out["test_accuracy"] == pytest.approx(ev["test_accuracy"])  # the kept best model
  assert out["test_scene_accuracy"] == pytest.approx(rep["test_scene_accuracy"])
  # The best model, exported in Hugging Face format (absolute positions: expressible).
  hf = json.loads((wd / "model" / "config.json").read_text())
  assert hf["architectures"] == ["BertForSequenceClassification"]
  assert hf["id2label"] == {str(i): n for i, n in enumerate(rep["labels"])}


def test_finetune_lora_exports_merged_and_saves_adapters(tmp_path, bert_export):
  d, _ = bert_export
  wd = tmp_path / "lora"
  loop.finetune(_cfg(finetune_genre, "lora,tiny", d), str(wd))
  assert (wd / "adapters" / "adapter_config.json").exists()
  cfg = json.loads((wd / "adapters" / "adapter_config.json").read_text())
  assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["q", "v"]
  merged = auto.build_model  # the export has no LoRA tensors: plain names
  del merged
  names = set(__import__("safetensors.numpy", fromlist=["load_file"]).load_file(
      str(wd / "model" / "model.safetensors")))
  assert not any("lora" in n for n in names) and any("classifier" in n for n in names)


def test_finetune_extractive_qa_reports_baseline(tmp_path, bert_export):
  d, _ = bert_export
  rep = loop.finetune(_cfg(finetune_who_speaks, "tiny", d), str(tmp_path / "qa"))
  for key in ("test_exact_match", "test_f1", "test_baseline_exact_match",
              "test_text_exact_match", "test_text_f1"):
    assert 0.0 <= rep[key] <= 1.0, key
  assert rep["test_baseline_exact_match"] > 0.3  # the "most frequent speaker" is often right


def test_finetune_sft_and_decoder_classifier(tmp_path, gpt_export):
  rep = loop.finetune(_cfg(finetune_next_speaker, "tiny", gpt_export), str(tmp_path / "sft"))
  assert rep["test_generated_examples"] == 8
  assert 0.0 <= rep["test_generated_rougeL"] <= 1.0 and rep["majority_response"]
  # A decoder classifier (GPT2ForSequenceClassification) on a JSONL file.
  path = tmp_path / "cls.jsonl"
  rng = np.random.default_rng(0)
  path.write_text("\n".join(
      json.dumps({"text": " ".join(["good"] * int(k + 1)), "label": lab,
                  "split": ("train", "train", "validation", "test")[i % 4]})
      for i, (k, lab) in enumerate(zip(rng.integers(0, 5, 60), ["pos", "neg"] * 30))))
  cfg = _cfg(finetune_genre, "tiny", gpt_export, data={"source": str(path)},
             finetune={"dataset": ""})
  rep = loop.finetune(cfg, str(tmp_path / "cls"))
  assert rep["labels"] == ["neg", "pos"] and "test_macro_f1" in rep


def test_finetune_token_classify_on_jsonl(tmp_path, bert_export):
  """Tag capitalized words: learnable from the word pieces, scored per word."""
  d, _ = bert_export
  rng = np.random.default_rng(0)
  vocab = ["Rome", "the", "King", "of", "France", "and", "a", "Duke", "lord", "sword"]
  path = tmp_path / "tags.jsonl"
  with open(path, "w") as f:
    for i in range(80):
      words = [vocab[j] for j in rng.integers(0, len(vocab), 8)]
      f.write(json.dumps({"tokens": words, "labels": ["CAP" if w[0].isupper() else "O"
                                                      for w in words],
                          "split": ("train", "train", "validation", "test")[i % 4]}) + "\n")
  cfg = _cfg(finetune_genre, "tiny", d, data={"source": str(path)},
             finetune={"dataset": ""}, train={"objective": "token_classify", "steps": 30,
                                              "learning_rate": 3e-3, "eval_every": 30})
  rep = loop.finetune(cfg, str(tmp_path / "tags"))
  assert rep["test_num_words"] == 20 * 8
  assert rep["test_accuracy"] > rep["test_majority_baseline_accuracy"]


# ---- bad input -------------------------------------------------------------------------------
def test_label_outside_the_label_names_is_one_line(tmp_path, bert_export):
  d, _ = bert_export
  path = tmp_path / "cls.jsonl"
  path.write_text(json.dumps({"text": "a b c", "label": "maybe", "split": "train"}) + "\n")
  cfg = _cfg(finetune_genre, "tiny", d, data={"source": str(path)},
             finetune={"dataset": "", "labels": ("yes", "no")})
  with pytest.raises(DataError, match=r"label 'maybe' is not one of finetune.labels") as e:
    tasks.get("classify").prepare_data(cfg, None, str(tmp_path), quiet)
  assert "\n" not in str(e.value)


def test_lora_target_matching_nothing_lists_the_modules(bert_export):
  _, pre = bert_export
  model = auto.build_model(pre.config.replace(architectures=["BertForSequenceClassification"],
                                              num_labels=3), seed=0)
  with pytest.raises(ConfigError) as e:
    lora.apply_lora(model, lora.LoRAConfig(targets=("qq",)))
  msg = str(e.value)
  assert "qq" in msg and "attn.q" in msg and "mlp.down" in msg and "\n" not in msg


@pytest.mark.parametrize("override,needle", [
    ({"finetune": {"freeze": "layer:2"}}, "finetune.freeze must be one of"),
    ({"train": {"objective": "classify"}, "model": {"init_from": ""}}, "set model.init_from"),
    ({"finetune": {"lora": ml_collections.ConfigDict(dict(rank=-1, alpha=16.0, dropout=0.0,
                                                         targets=("q",)))}},
     r"finetune.lora.rank must be in \[0"),
])
def test_bad_finetune_configs_are_one_line_errors(bert_export, override, needle):
  d, _ = bert_export
  cfg = _cfg(finetune_genre, "tiny", d, **override)
  with pytest.raises(ConfigError, match=needle) as e:
    experiment.validate(cfg)
  assert "\n" not in str(e.value)


def test_mismatched_model_keys_fail_before_training_naming_the_tensor(tmp_path, bert_export):
  d, _ = bert_export
  cfg = _cfg(finetune_genre, "tiny", d, model={"intermediate_size": 96})
  wd = tmp_path / "bad"
  with pytest.raises(ConfigError, match=r"tensor 'bert\.layers\.0\.mlp\.down\.kernel' has "
                                        r"shape \(64, 32\) in the checkpoint but \(96, 32\)"):
    loop.finetune(cfg, str(wd))
  assert not wd.exists()


def test_tokenizer_of_the_export_is_used(bert_export, tok):
  d, _ = bert_export
  assert Tokenizer.load(str(d)).vocab_size == tok.vocab_size
