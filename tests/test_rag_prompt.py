"""RAG prompts: fitting to the context window (lowest-ranked passages dropped first, the
question and instruction whole), few-shot examples, chat templates, bad templates."""

import json

import pytest

from jaxlm import ConfigError
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.retrieval.prompt import Template, fit_prompt

LINES = ["To be, or not to be, that is the question.",
         "Now is the winter of our discontent made glorious summer by this sun of York.",
         "All the world's a stage, and all the men and women merely players.",
         "Friends, Romans, countrymen, lend me your ears.",
         "If music be the food of love, play on.",
         "The quality of mercy is not strained."] * 20


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(LINES, kind="wordpiece", vocab_size=300)


def test_lowest_ranked_passages_are_dropped_and_the_rest_survive_whole(tok):
  t = Template(examples=(("Who lends ears?", "Romans [2]"),))
  question = "Which line speaks of winter?"
  passages = [LINES[i] for i in (1, 0, 2, 3, 4, 5)]  # best first
  full = fit_prompt(t, question, passages, tok, max_tokens=10_000)
  assert full.passages == tuple(range(6))
  budget = full.num_tokens - 5  # past the window: something must go
  fitted = fit_prompt(t, question, passages, tok, max_tokens=budget)
  assert fitted.num_tokens == len(tok.encode(fitted.text)) <= budget
  kept = len(fitted.passages)
  assert fitted.passages == tuple(range(kept)) and 0 < kept < 6  # a prefix of the ranking
  for rank in range(kept):  # kept passages whole, numbered by rank
    assert f"[{rank + 1}] {passages[rank]}" in fitted.text
  for rank in range(kept, 6):
    assert passages[rank] not in fitted.text
  assert fitted.text.startswith("Answer the question from the passages below")
  assert fitted.text.endswith(f"Question: {question}\nAnswer:")
  assert "Question: Who lends ears?\nAnswer: Romans [2]" in fitted.text
  # A tighter window drops more, never a part of one.
  tight = fit_prompt(t, question, passages, tok, max_tokens=fit_prompt(
      t, question, [], tok, max_tokens=10_000).num_tokens + 1)
  assert tight.passages == ()


def test_question_alone_too_long_is_an_error(tok):
  with pytest.raises(ConfigError, match=r"question alone take \d+ tokens, more than the 3"):
    fit_prompt(Template(), "Which line speaks of winter?", LINES[:2], tok, max_tokens=3)


def test_templates_from_strings_files_and_chat_configs(tmp_path, tok):
  path = tmp_path / "t.txt"
  path.write_text("Q: {question}\n{context}A:")
  t = Template.load(str(path))
  assert t.render("why?", ["one", "two"]) == "Q: why?\n[1] one\n[2] two\nA:"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
  chat = Template.load("{question}", tokenizer_dir=str(tmp_path))
  assert chat.render("hi", []) == "<|user|>hi</s><|assistant|>"


@pytest.mark.parametrize("spec, match", [
    ("{context} only", r"rag.template: the template has no \{question\} field"),
    ("{question} {answer}", r"rag.template: unknown field \{answer\}"),
    ("no_such_file.txt", r"neither a format string with \{question\} nor a file"),
])
def test_bad_templates(spec, match):
  with pytest.raises(ConfigError, match=match):
    Template.load(spec)
