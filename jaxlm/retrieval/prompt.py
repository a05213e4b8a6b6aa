"""Prompts for retrieval-augmented generation: an instruction, few-shot examples and
numbered passages, fitted to the generator's context window.

  t = Template()                                    # or Template(text=..., examples=...)
  p = fit_prompt(t, "Who speaks first?", passages, tokenizer, max_tokens=512 - 32)
  p.text, p.passages                                # the prompt; ranks of the kept passages

A template is a Python format string with the fields {question} (required), {context}
(the numbered passages) and {examples} (the few-shot block); `Template.load` takes such a
string or the path of a file holding one. Passages are given best first and the lowest
ranked go first when the prompt is too long; a passage is kept whole or dropped, never cut
mid-token, and the instruction, examples and question are never cut at all. When the
tokenizer directory's tokenizer_config.json has a `chat_template` (Jinja, as in
transformers), the prompt is rendered through it as one user message before it is
measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from collections.abc import Sequence

from jaxlm.errors import ConfigError

DEFAULT = ("Answer the question from the passages below, citing them by number.\n\n"
           "{examples}{context}\nQuestion: {question}\nAnswer:")
FIELDS = ("question", "context", "examples")


def _fields(text: str, key: str) -> set[str]:
  try:
    names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
  except ValueError as e:
    raise ConfigError(f"{key}: not a valid format string ({e})") from None
  unknown = sorted(names - set(FIELDS))
  if unknown:
    raise ConfigError(f"{key}: unknown field {{{unknown[0]}}}; known: "
                      + ", ".join("{" + f + "}" for f in FIELDS))
  return names


@dataclasses.dataclass(frozen=True)
class Template:
  """How a prompt is laid out (see the module docstring)."""

  text: str = DEFAULT
  passage: str = "[{n}] {text}\n"  # one retrieved passage; n counts from 1
  example: str = "Question: {question}\nAnswer: {answer}\n\n"
  examples: tuple[tuple[str, str], ...] = ()  # few-shot (question, answer) pairs
  chat_template: str | None = None  # Jinja, from an HF tokenizer_config.json

  def __post_init__(self):
    if "question" not in _fields(self.text, "rag.template"):
      raise ConfigError("rag.template: the template has no {question} field")
    object.__setattr__(self, "examples", tuple(tuple(e) for e in self.examples))
    for e in self.examples:
      if len(e) != 2:
        raise ConfigError(f"rag.examples: each example is a (question, answer) pair, got {e!r}")

  @classmethod
  def load(cls, spec: str | None = None, *, tokenizer_dir: str | None = None,
           examples: Sequence[tuple[str, str]] = ()) -> Template:
    """A template from a format string or a file path (None: the default), with the chat
    template of `tokenizer_dir` when it has one."""
    text = DEFAULT if spec is None else spec
    if spec is not None and "{" not in spec:
      if not os.path.isfile(spec):
        raise ConfigError(f"rag.template: {spec!r} is neither a format string with "
                          "{question} nor a file")
      with open(spec, encoding="utf-8") as f:
        text = f.read()
    return cls(text=text, examples=tuple(examples),
               chat_template=read_chat_template(tokenizer_dir) if tokenizer_dir else None)

  def render(self, question: str, passages: Sequence[str]) -> str:
    context = "".join(self.passage.format(n=i + 1, text=p.strip()) for i, p in
                      enumerate(passages))
    examples = "".join(self.example.format(question=q, answer=a) for q, a in self.examples)
    text = self.text.format(question=question, context=context, examples=examples)
    if self.chat_template is None:
      return text
    return render_chat(self.chat_template, [{"role": "user", "content": text}])


def read_chat_template(directory: str) -> str | None:
  """The `chat_template` of `directory`/tokenizer_config.json, if any."""
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: not readable JSON ({e})") from None
  tpl = cfg.get("chat_template")
  if isinstance(tpl, list):  # transformers' named templates: [{"name", "template"}]
    tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
  return tpl if isinstance(tpl, str) else None


def render_chat(chat_template: str, messages: list[dict]) -> str:
  """`messages` through a Jinja chat template, ending with the generation prompt."""
  import jinja2  # noqa: PLC0415 (imported when a chat template is used)
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  try:
    return env.from_string(chat_template).render(messages=messages, add_generation_prompt=True,
                                                 bos_token="", eos_token="")
  except jinja2.TemplateError as e:
    raise ConfigError(f"chat_template: cannot render ({e})") from None


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  passages: tuple[int, ...]  # ranks (positions in the given list) of the passages kept
  num_tokens: int


def fit_prompt(template: Template, question: str, passages: Sequence[str], tokenizer,
               max_tokens: int) -> Prompt:
  """The prompt with as many of the best-ranked passages as fit in `max_tokens` tokens
  (the generator's context less the tokens to generate)."""
  count = lambda text: len(tokenizer.encode(text))
  keep = list(range(len(passages)))
  while True:
    text = template.render(question, [passages[i] for i in keep])
    n = count(text)
    if n <= max_tokens:
      return Prompt(text, tuple(keep), n)
    if not keep:
      raise ConfigError(f"prompt: the instruction, examples and question alone take {n} "
                        f"tokens, more than the {max_tokens} the context leaves")
    keep.pop()  # the lowest-ranked passage goes first
